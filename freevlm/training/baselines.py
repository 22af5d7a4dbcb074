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
The backbone runs once per batch under `no_grad` (h_0..h_N); checkpoints, resume, logging and the data order are
stage 2's (`training.exits`), so these runs save and load like FREE's.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Subset

from ..exits import ExitConfig
from ..methods import trainable_parameters
from ..model import EarlyExitVLM
from .checkpoint import resume_or_start, save_checkpoint
from .common import (
    DivergenceGuard,
    LoopConfig,
    Progress,
    Runtime,
    autocast,
    batch_stream,
    grad_scaler,
    logger,
    make_scheduler,
    optimizer_step,
    total_steps,
)
from .data import IGNORE, CaptionCollator, CaptionDataset
from .exits import _check_resume, backbone_features, evaluate_exits, exit_features, kd_loss

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


def exit_logits(
    ee: EarlyExitVLM, batch: dict[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """(logits per exit, final-layer logits, targets) at the text positions of `batch`."""
    states, ctx, mask = backbone_features(ee, batch)
    text = batch["targets"] != IGNORE
    feats = exit_features(ee, states, ctx, mask, text)
    with torch.no_grad():
        final = ee.backbone.head(states[-1][text])
    return {k: ee.exits[k].logits(ee.backbone, f) for k, f in feats.items()}, final, batch["targets"][text]


def per_exit_losses(logits: dict[str, torch.Tensor], final: torch.Tensor, targets: torch.Tensor,
                    temperature: float = 1.0) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:  # fmt: skip
    """CE_i against the labels and KD_i = T^2 KL(p_N || p_i) per exit."""
    ce = {k: F.cross_entropy(v.float(), targets) for k, v in logits.items()}
    kd = {k: kd_loss(v, final, temperature, "final_to_exit") for k, v in logits.items()}
    return ce, kd


def baseline_loss(method: str, ce: dict[str, torch.Tensor], kd: dict[str, torch.Tensor],
                  kd_weights: dict[str, torch.Tensor] | None = None) -> torch.Tensor:  # fmt: skip
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


@torch.no_grad()
def evaluate_baseline(ee: EarlyExitVLM, dataset: CaptionDataset, temperature: float = 1.0, batch_size: int = 16,
                      runtime: Runtime | None = None) -> dict[str, float]:  # fmt: skip
    """Held-out `ce/exit_i`, `kd/exit_i` (KL(p_N || p_i) at `temperature`, x T^2) per text token, plus stage 2's
    `kl/exit_i` and token accuracies; token-weighted over the set."""
    rank, world = (runtime.rank, runtime.world) if runtime is not None else (0, 1)
    collate = CaptionCollator.for_model(ee.backbone.config)
    was_training = ee.training
    ee.eval()
    keys = list(ee.exits)
    sums = torch.zeros(2 * len(keys) + 1, dtype=torch.float64)
    indices = list(range(rank, len(dataset), world))
    for start in range(0, len(indices), batch_size):
        batch = collate([dataset[i] for i in indices[start : start + batch_size]])
        logits, final, targets = exit_logits(ee, {k: v.to(ee.backbone.device) for k, v in batch.items()})
        ce, kd = per_exit_losses(logits, final, targets, temperature)
        for j, k in enumerate(keys):
            sums[j] += ce[k].double() * len(targets)
            sums[len(keys) + j] += kd[k].double() * len(targets)
        sums[-1] += len(targets)
    if runtime is not None:
        sums = runtime.sum(sums).cpu()
    ee.train(was_training)
    n = max(sums[-1].item(), 1.0)
    out = {f"ce/exit_{k}": sums[j].item() / n for j, k in enumerate(keys)}
    out.update({f"kd/exit_{k}": sums[len(keys) + j].item() / n for j, k in enumerate(keys)})
    return out | evaluate_exits(ee, dataset, batch_size, runtime)


def split_meta(dataset: CaptionDataset, fraction: float, seed: int) -> tuple[Subset, Subset]:
    """(train part, meta part): a seeded `fraction` of the records set aside for LeeBLIP's weight updates."""
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed)).tolist()
    n_meta = max(1, round(fraction * len(dataset)))
    return Subset(dataset, sorted(order[n_meta:])), Subset(dataset, sorted(order[:n_meta]))


def train_baseline(model: nn.Module, train_set: CaptionDataset, config: BaselineTrainConfig,
                   dev_set: CaptionDataset | None = None) -> EarlyExitVLM:  # fmt: skip
    """Attach linear exits at `config.exit_layers` to the frozen `model` and train them with `config.method`'s
    loss. Writes checkpoints, TensorBoard scalars, `<output_dir>/exits` (loadable with
    `EarlyExitVLM.from_pretrained`) and `<output_dir>/method.json` (method, trainable parameters, learned
    weights)."""
    config.validate()
    runtime = Runtime(cpu=config.cpu)
    out_dir, ckpt_dir = Path(config.output_dir), Path(config.output_dir) / "checkpoints"
    torch.manual_seed(config.seed)
    leeblip = config.method == "leeblip"
    if runtime.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)

    model.to(runtime.device).eval().requires_grad_(False)
    ee = EarlyExitVLM(model, ExitConfig(list(config.exit_layers), kind="linear"))
    keys = list(ee.exits)
    weights = DistillationWeights(keys).to(runtime.device)
    runtime.broadcast_(list(ee.exits.parameters()))
    params, w_params = list(ee.exits.parameters()), list(weights.parameters())
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    w_opt = torch.optim.Adam(w_params, lr=config.weight_lr)
    data, meta = split_meta(train_set, config.meta_fraction, config.seed) if leeblip else (train_set, None)
    if meta is not None and len(meta) < config.batch_size * runtime.world:
        raise ValueError(f"LeeBLIP's meta split has {len(meta)} records, fewer than one batch "
                         f"({config.batch_size} x {runtime.world} process(es)): raise meta_fraction")  # fmt: skip
    total = total_steps(config, len(data), runtime.world)
    sched = make_scheduler(opt, config, total)
    scaler = grad_scaler(config, runtime.device)
    guard = DivergenceGuard(config.max_nonfinite_steps)

    step = 0
    resumed = resume_or_start(ckpt_dir, runtime, config.resume, config.seed)
    if resumed is not None:
        path, state = resumed
        _check_resume(state, ee, config, path)
        if state["config"]["method"] != config.method:
            raise ValueError(f"checkpoint {path} was trained as {state['config']['method']!r}, not {config.method!r}")
        ee.exits.load_state_dict(state["exits"])
        weights.load_state_dict(state["weights"])
        for obj, key in ((opt, "opt"), (w_opt, "w_opt"), (sched, "sched"), (scaler, "scaler")):
            obj.load_state_dict(state[key])
        step, guard.skipped = state["step"], state["nonfinite_skipped"]
        logger.info("resumed from %s at step %d", path, step)

    ee.exits.train()
    collate = CaptionCollator.for_model(model.config)
    stream = batch_stream(data, collate, config, runtime, step)
    meta_stream = batch_stream(meta, collate, config, runtime, step) if leeblip else None
    progress = Progress(config, runtime, total, step, str(out_dir / "tensorboard"))

    while step < total:
        batch = next(stream)
        with autocast(config, runtime.device):
            logits, final, targets = exit_logits(ee, batch)
            ce, kd = per_exit_losses(logits, final, targets, config.temperature)
            w = {k: v.detach() for k, v in weights.weights().items()}
            loss = baseline_loss(config.method, ce, kd, w)
        ok = guard.ok({"exit loss": loss}, step, runtime)
        if ok:
            lr = sched.get_last_lr()[0]
            kd_grads = torch.autograd.grad(sum(kd.values()), params, retain_graph=True) if leeblip else None
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            optimizer_step(opt, params, scaler, runtime, config.grad_clip)
            scaler.update()
            sched.step()
            if leeblip:
                _update_weights(ee, weights, w_opt, next(meta_stream), kd_grads, params, lr, runtime, config)
        step += 1

        progress.step({"loss": loss.item()} if ok else None)
        if step % config.log_every == 0 or step == total:
            values = torch.stack([loss.detach(), *[ce[k].detach() for k in keys], *[kd[k].detach() for k in keys]])
            values = (runtime.sum(values.float()) / runtime.world).tolist()
            scalars = {
                "train/loss": values[0],
                "train/lr": sched.get_last_lr()[0],
                "train/nonfinite_skipped": guard.skipped,
            }
            scalars.update({f"train/ce/exit_{k}": values[1 + j] for j, k in enumerate(keys)})
            scalars.update({f"train/kd/exit_{k}": values[1 + len(keys) + j] for j, k in enumerate(keys)})
            if leeblip:
                scalars.update({f"train/kd_weight/exit_{k}": float(v.detach()) for k, v in weights.weights().items()})
            progress.scalars(scalars, step)
        if dev_set is not None and ((config.eval_every and step % config.eval_every == 0) or step == total):
            metrics = evaluate_baseline(ee, dev_set, config.temperature, config.batch_size, runtime)
            progress.scalars({f"dev/{k}": v for k, v in metrics.items()}, step)
            if runtime.is_main and step == total:
                (out_dir / "dev_metrics.json").write_text(json.dumps(metrics, indent=2))
        if step % config.checkpoint_every == 0 or step == total:
            state = {"step": step, "config": asdict(config), "exit_layers": ee.exit_layers,
                     "backbone": ee.backbone.fingerprint(), "exits": ee.exits.state_dict(),
                     "weights": weights.state_dict(), "opt": opt.state_dict(), "w_opt": w_opt.state_dict(),
                     "sched": sched.state_dict(), "scaler": scaler.state_dict(),
                     "nonfinite_skipped": guard.skipped}  # fmt: skip
            save_checkpoint(ckpt_dir, step, state, runtime, config.keep_checkpoints,
                            write_extra=lambda folder: ee.save_exits(folder / "exits"))  # fmt: skip

    progress.close()
    if runtime.is_main:
        ee.save_exits(out_dir / "exits")
        info = {"method": config.method, "exit_layers": ee.exit_layers,
                "trainable_parameters": trainable_parameters([ee.exits, weights] if leeblip else ee.exits)}  # fmt: skip
        if leeblip:
            info["kd_weights"] = {k: float(v.detach()) for k, v in weights.weights().items()}
        (out_dir / "method.json").write_text(json.dumps(info, indent=2))
    runtime.barrier()
    ee.eval()
    return ee


def _update_weights(ee: EarlyExitVLM, weights: DistillationWeights, w_opt: torch.optim.Optimizer, meta_batch: dict,
                    kd_grads: tuple[torch.Tensor, ...], params: list[nn.Parameter], lr: float, runtime: Runtime,
                    config: BaselineTrainConfig) -> None:  # fmt: skip
    """LeeBERT's cross-level step: dL_meta/da_i = w_i * -lr * <grad_i CE_meta(theta'), grad_i KD_i(theta)>, with
    theta' the exits after this step and grad_i restricted to exit i's own parameters."""
    with autocast(config, runtime.device):
        logits, _, targets = exit_logits(ee, meta_batch)
        meta_loss = sum(F.cross_entropy(v.float(), targets) for v in logits.values())
    meta_grads = torch.autograd.grad(meta_loss, params)
    owner = {id(p): k for k, e in ee.exits.items() for p in e.parameters()}
    align = {k: torch.zeros((), device=runtime.device) for k in weights.log_weights}
    for p, g_meta, g_kd in zip(params, meta_grads, kd_grads):
        align[owner[id(p)]] = align[owner[id(p)]] + (g_meta.float() * g_kd.float()).sum()
    w_opt.zero_grad(set_to_none=True)
    for k, a in weights.log_weights.items():
        a.grad = (a.detach().exp() * -lr * align[k]).to(a.dtype)
    runtime.average_gradients(list(weights.parameters()))
    w_opt.step()
