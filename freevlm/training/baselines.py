"""Training of the baselines' exits on the frozen backbone: DeeBLIP, PABEE-BLIP, LeeBLIP (MuE trains nothing).

All three attach a vocabulary-sized linear classifier per exit (`LinearExit`, on the frozen-normed h_i) and differ
in the loss, over text positions only:
  - DeeBLIP (DeeBERT's second stage): sum_i CE_i.
  - PABEE-BLIP (PABEE): sum_i i * CE_i / sum_i i, the weight of an exit proportional to its layer index i.
    (PABEE trains its backbone too; on a frozen one the exits share no parameter, so under Adam the weights
    barely change the updates and PABEE-BLIP's exits come out close to DeeBLIP's: the methods differ at inference.)
  - LeeBLIP (LeeBERT): sum_i CE_i + w_i * KD_i, KD_i = T^2 KL(p_N^T || p_i^T) from the final layer. The weights
    w_i = exp(a_i) are learned by LeeBERT's cross-level optimisation: after each step of the exits, a_i moves
    down the gradient of the CE on a held-out meta batch through a one-step look-ahead. The loss is linear in
    w_i, so that gradient is exact and cheap: dL_meta/dw_i = -lr * <grad L_meta(theta'), grad KD_i(theta)>
    (a weight grows while its distillation pulls the exit where held-out data wants it).
Each is an objective of the one training loop (`training.loop`), so these runs save and resume like FREE's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, Subset

from ..exits import ExitConfig
from ..files import write_text_atomic
from ..methods import trainable_parameters
from ..model import EarlyExitVLM, ExitOutputs
from .common import LoopConfig, Runtime, autocast, batch_stream, make_scheduler
from .data import CaptionCollator, CaptionDataset
from .exits import evaluate_exits, kd_loss
from .loop import ExitObjective, token_means, train

BASELINES = ("deeblip", "pabee", "leeblip")


@dataclass
class BaselineTrainConfig(LoopConfig):
    """Settings of one baseline's exit training; the loop's own settings are stage 2's."""

    output_dir: str = "runs/baseline"
    method: str = "deeblip"
    exit_layers: tuple[int, ...] = ()
    lr: float = 1e-4
    temperature: float = 1.0  # LeeBLIP's distillation temperature
    weight_lr: float = 1e-2  # LeeBLIP: Adam learning rate of the log distillation weights a_i
    meta_fraction: float = 0.1  # LeeBLIP: training records held out as meta batches for the weights

    def validate(self) -> None:
        super().validate()
        if self.method not in BASELINES:
            raise ValueError(f"unknown baseline {self.method!r}, expected one of {BASELINES} (MuE trains nothing)")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.method == "leeblip" and not 0 < self.meta_fraction < 1:
            raise ValueError(f"meta_fraction must be in (0, 1), got {self.meta_fraction}")


class DistillationWeights(nn.Module):
    """LeeBLIP's learned per-exit distillation weights w_i = exp(a_i), starting at 1."""

    def __init__(self, keys: list[str]):
        super().__init__()
        self.log_weights = nn.ParameterDict({k: nn.Parameter(torch.zeros(())) for k in keys})

    def weights(self) -> dict[str, torch.Tensor]:
        return {k: a.exp() for k, a in self.log_weights.items()}


def per_exit_losses(
    out: ExitOutputs, temperature: float = 1.0
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """CE_i against the labels and KD_i = T^2 KL(p_N || p_i) per exit."""
    ce = {k: F.cross_entropy(v.float(), out.targets) for k, v in out.logits.items()}
    kd = {k: kd_loss(v, out.final_logits, temperature, "final_to_exit") for k, v in out.logits.items()}
    return ce, kd


def baseline_loss(
    method: str,
    ce: dict[str, torch.Tensor],
    kd: dict[str, torch.Tensor],
    kd_weights: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """The method's training objective from its per-exit terms (keys are exit layers)."""
    if method == "deeblip":
        return sum(ce.values())
    if method == "pabee":
        return sum(int(k) * v for k, v in ce.items()) / sum(int(k) for k in ce)
    if method == "leeblip":
        if kd_weights is None:
            raise ValueError("LeeBLIP's loss needs the distillation weights")
        return sum(ce[k] + kd_weights[k] * kd[k] for k in ce)
    raise ValueError(f"unknown baseline {method!r}, expected one of {BASELINES}")


def evaluate_baseline(
    ee: EarlyExitVLM, dataset: Dataset, temperature: float = 1.0, batch_size: int = 16, runtime: Runtime | None = None
) -> dict[str, float]:
    """Held-out `ce/exit_i`, `kd/exit_i` (KL(p_N || p_i) at `temperature`, x T^2) per text token, plus stage 2's
    `kl/exit_i` and token accuracies; token-weighted over the set."""
    names = [f"{kind}/exit_{k}" for kind in ("ce", "kd") for k in ee.exits]

    def sums(out: ExitOutputs) -> dict[str, float]:
        ce, kd = per_exit_losses(out, temperature)
        n = len(out.targets)
        return {
            f"{kind}/exit_{k}": v.item() * n for kind, losses in (("ce", ce), ("kd", kd)) for k, v in losses.items()
        }

    return token_means(ee, dataset, names, sums, batch_size, runtime) | evaluate_exits(ee, dataset, batch_size, runtime)


def split_meta(dataset: CaptionDataset, fraction: float, seed: int) -> tuple[Subset, Subset]:
    """(train part, meta part): a seeded `fraction` of the records set aside for LeeBLIP's weight updates."""
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed)).tolist()
    n_meta = max(1, round(fraction * len(dataset)))
    return Subset(dataset, sorted(order[n_meta:])), Subset(dataset, sorted(order[:n_meta]))


class Baseline(ExitObjective):
    """DeeBLIP, PABEE-BLIP or LeeBLIP (`config.method`) on linear exits; LeeBLIP also learns its weights."""

    PARTS = (*ExitObjective.PARTS, "weights", "opt", "w_opt", "sched")

    def __init__(self, model: nn.Module, config: BaselineTrainConfig, runtime: Runtime, train_set: Dataset):
        self.leeblip = config.method == "leeblip"
        data, self.meta = (
            split_meta(train_set, config.meta_fraction, config.seed) if self.leeblip else (train_set, None)
        )
        if self.meta is not None and len(self.meta) < config.batch_size * runtime.world:
            raise ValueError(
                f"LeeBLIP's meta split has {len(self.meta)} records, fewer than one batch "
                f"({config.batch_size} x {runtime.world} process(es)): raise meta_fraction"
            )
        super().__init__(model, ExitConfig(list(config.exit_layers), kind="linear"), config, runtime, data)
        self.weights = DistillationWeights(list(self.ee.exits)).to(runtime.device)
        runtime.broadcast_(list(self.ee.exits.parameters()))
        self.params = list(self.ee.exits.parameters())
        self.opt = torch.optim.AdamW(self.params, lr=config.lr, weight_decay=config.weight_decay)
        self.w_opt = torch.optim.Adam(self.weights.parameters(), lr=config.weight_lr)
        self.sched = make_scheduler(self.opt, config, self.total)

    def load_state_dict(self, state: dict, path: Path) -> None:
        if state["config"]["method"] != self.config.method:
            raise ValueError(
                f"checkpoint {path} was trained as {state['config']['method']!r}, not {self.config.method!r}"
            )
        super().load_state_dict(state, path)

    def begin(self, step: int) -> None:
        super().begin(step)
        if self.leeblip:
            collate = CaptionCollator.for_model(self.ee.backbone.config)
            self.meta_stream = batch_stream(self.meta, collate, self.config, self.runtime, step)

    def step(self, batch: dict, step: int) -> tuple[dict[str, float] | None, dict[str, torch.Tensor]]:
        config = self.config
        with autocast(config, self.runtime.device):
            ce, kd = per_exit_losses(self.ee(batch), config.temperature)
            w = {k: v.detach() for k, v in self.weights.weights().items()}
            loss = baseline_loss(config.method, ce, kd, w)
        ok = self.guard.ok({"exit loss": loss}, step, self.runtime)
        if ok:
            lr = self.sched.get_last_lr()[0]
            kd_grads = torch.autograd.grad(sum(kd.values()), self.params, retain_graph=True) if self.leeblip else None
            self.optimizer_step(loss, self.opt, self.params)
            self.scaler.update()
            self.sched.step()
            if self.leeblip:
                self._update_weights(next(self.meta_stream), kd_grads, lr)
        losses = {
            "train/loss": loss,
            **{f"train/ce/exit_{k}": v for k, v in ce.items()},
            **{f"train/kd/exit_{k}": v for k, v in kd.items()},
        }
        return ({"loss": loss.item()} if ok else None), losses

    def scalars(self, means: dict[str, float]) -> dict[str, float]:
        scalars = {"train/lr": self.sched.get_last_lr()[0]}
        if self.leeblip:
            scalars.update({f"train/kd_weight/exit_{k}": float(v.detach()) for k, v in self.weights.weights().items()})
        return scalars

    def evaluate(self, dataset: Dataset) -> dict[str, float]:
        return evaluate_baseline(self.ee, dataset, self.config.temperature, self.config.batch_size, self.runtime)

    def finish(self, out_dir: Path) -> EarlyExitVLM:
        if self.runtime.is_main:
            info = {
                "method": self.config.method,
                "exit_layers": self.ee.exit_layers,
                "trainable_parameters": trainable_parameters(
                    [self.ee.exits, self.weights] if self.leeblip else self.ee.exits
                ),
            }
            if self.leeblip:
                info["kd_weights"] = {k: float(v.detach()) for k, v in self.weights.weights().items()}
            write_text_atomic(out_dir / "method.json", json.dumps(info, indent=2))
        return super().finish(out_dir)

    def _update_weights(self, meta_batch: dict, kd_grads: tuple[torch.Tensor, ...], lr: float) -> None:
        """LeeBERT's cross-level step: dL_meta/da_i = w_i * -lr * <grad_i CE_meta(theta'), grad_i KD_i(theta)>, with
        theta' the exits after this step and grad_i restricted to exit i's own parameters."""
        with autocast(self.config, self.runtime.device):
            out = self.ee(meta_batch)
            meta_loss = sum(F.cross_entropy(v.float(), out.targets) for v in out.logits.values())
        meta_grads = torch.autograd.grad(meta_loss, self.params)
        owner = {id(p): k for k, e in self.ee.exits.items() for p in e.parameters()}
        align = {k: torch.zeros((), device=self.runtime.device) for k in self.weights.log_weights}
        for p, g_meta, g_kd in zip(self.params, meta_grads, kd_grads):
            align[owner[id(p)]] = align[owner[id(p)]] + (g_meta.float() * g_kd.float()).sum()
        self.w_opt.zero_grad(set_to_none=True)
        for k, a in self.weights.log_weights.items():
            a.grad = (a.detach().exp() * -lr * align[k]).to(a.dtype)
        self.runtime.average_gradients(list(self.weights.parameters()))
        self.w_opt.step()


def train_baseline(
    model: nn.Module, train_set: CaptionDataset, config: BaselineTrainConfig, dev_set: CaptionDataset | None = None
) -> EarlyExitVLM:
    """Attach linear exits at `config.exit_layers` to the frozen `model` and train them with `config.method`'s
    loss. Writes `<output_dir>/exits` (loadable with `EarlyExitVLM.from_pretrained`) and
    `<output_dir>/method.json` (method, trainable parameters, learned weights) beside the loop's outputs."""
    return train(lambda runtime: Baseline(model, config, runtime, train_set), config, dev_set)
