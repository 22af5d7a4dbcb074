"""Stage 2: FREE exit training. The backbone is frozen; each exit E_i is a generator, each D_i a discriminator.

Per batch (paper section 3.3):
  1. `EarlyExitVLM.forward`: the frozen backbone runs once (h_0..h_N on every position, no graph), each exit
     E_i over h_i of the whole sequence (exits are causal layers that attend over it);
  2. D step: sum_i BCE(D_i(h_N), 1) + BCE(D_i(E_i(h_i).detach()), 0);
  3. G step: sum_i  adv_weight * -log D_i(E_i(h_i))  +  anchor_weight * anchor_i, where the anchor is
     `ce` (labels), `kd` (KL to the final layer's soft labels) or `capfilt` (CE on CapFilt pseudo-captions).
Losses and features use text positions only (those that predict a target token): never query tokens, prompt, pad.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from ..exits import ExitConfig, FeatureDiscriminator
from ..model import EarlyExitVLM, ExitOutputs
from .common import LoopConfig, Runtime, autocast, logger, make_scheduler
from .data import CaptionDataset
from .loop import ExitObjective, token_means, train

ANCHORS = ("ce", "kd", "capfilt")
KD_DIRECTIONS = ("exit_to_final", "final_to_exit")


@dataclass
class ExitTrainConfig(LoopConfig):
    """Stage-2 settings. Defaults follow the paper where it says (Adam, batch 16, 3 epochs, D hidden 3072)."""

    output_dir: str = "runs/exits"
    exit_layers: tuple[int, ...] = ()
    init: str = "copy_last"
    anchor: str = "kd"
    adversarial: bool = True  # False: anchor only (the paper's "w/o adversarial" ablation)
    adv_weight: float = 1.0
    anchor_weight: float = 1.0
    temperature: float = 1.0  # kd only; the KL is scaled by T^2 so its gradient size does not depend on T
    kd_direction: str = "exit_to_final"  # paper eq. 5: KL(p_i || p_N); "final_to_exit" is Hinton's KL(p_N || p_i)
    disc_hidden: int = 3072
    disc_lr: float | None = None  # default: lr
    disc_r1: float = 0.0  # > 0: R1 penalty on D (not in the paper) so D and the exits settle instead of chasing
    d_warn_window: int = 200  # steps of D accuracy at ~100% or ~50% before warning

    def validate(self) -> None:
        super().validate()
        if self.anchor not in ANCHORS:
            raise ValueError(f"unknown anchor {self.anchor!r}, expected one of {ANCHORS}")
        if self.kd_direction not in KD_DIRECTIONS:
            raise ValueError(f"unknown kd_direction {self.kd_direction!r}, expected one of {KD_DIRECTIONS}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.disc_r1 < 0:
            raise ValueError(f"disc_r1 must be >= 0, got {self.disc_r1}")
        for name in ("disc_hidden", "d_warn_window"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")


def kd_loss(
    exit_logits: torch.Tensor, final_logits: torch.Tensor, temperature: float = 1.0, direction: str = "exit_to_final"
) -> torch.Tensor:
    """Mean over positions of the KL between exit and final-layer distributions at `temperature`, times T^2."""
    log_exit = F.log_softmax(exit_logits.float() / temperature, dim=-1)
    log_final = F.log_softmax(final_logits.float() / temperature, dim=-1)
    if direction == "exit_to_final":
        kl = (log_exit.exp() * (log_exit - log_final)).sum(-1)
    else:
        kl = (log_final.exp() * (log_final - log_exit)).sum(-1)
    return kl.mean() * temperature**2


def make_discriminators(ee: EarlyExitVLM, hidden: int) -> nn.ModuleDict:
    """One D_i per exit, keyed like `ee.exits`, in float32 on the backbone's device."""
    size = ee.backbone.hidden_size
    return nn.ModuleDict({k: FeatureDiscriminator(size, hidden) for k in ee.exits}).to(ee.backbone.device)


def discriminator_loss(
    discs: nn.ModuleDict, real: torch.Tensor, fakes: dict[str, torch.Tensor], r1: float = 0.0
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """D step: sum_i BCE(D_i(h_N), 1) + BCE(D_i(E_i(h_i)), 0), and each D_i's accuracy (mean of its accuracy on
    real and on fake features). Fakes are detached: this loss trains D only.

    `r1` > 0 adds (r1 / 2) * E||grad_h D_i(h_N)||^2 (Mescheder et al., 2018): without it the exits and D chase each
    other round h_N instead of settling (bench/bench_discriminator.py measures it)."""
    loss, acc = real.new_zeros((), dtype=torch.float32), {}
    real = real.detach().requires_grad_(r1 > 0)
    for k, fake in fakes.items():
        d_real, d_fake = discs[k](real).float(), discs[k](fake.detach()).float()
        loss = (
            loss
            + F.binary_cross_entropy_with_logits(d_real, torch.ones_like(d_real))
            + F.binary_cross_entropy_with_logits(d_fake, torch.zeros_like(d_fake))
        )
        if r1 > 0:
            (grad,) = torch.autograd.grad(d_real.sum(), real, create_graph=True)
            loss = loss + r1 / 2 * grad.float().pow(2).sum(-1).mean()
        acc[k] = 0.5 * ((d_real > 0).float().mean() + (d_fake < 0).float().mean()).detach()
    return loss, acc


def adversarial_loss(discs: nn.ModuleDict, fakes: dict[str, torch.Tensor]) -> torch.Tensor:
    """G's adversarial term sum_i -log D_i(E_i(h_i)). D's weights take no gradient: this loss trains the exits only."""
    discs.requires_grad_(False)
    loss = 0.0
    for k, fake in fakes.items():
        d_fake = discs[k](fake).float()
        loss = loss + F.binary_cross_entropy_with_logits(d_fake, torch.ones_like(d_fake))
    discs.requires_grad_(True)
    return loss


def evaluate_exits(
    ee: EarlyExitVLM,
    dataset: Dataset,
    batch_size: int = 16,
    runtime: Runtime | None = None,
    discriminators: nn.ModuleDict | None = None,
) -> dict[str, float]:
    """Held-out `kl/exit_i` = KL(p_i || p_N) per text token, `token_acc/exit_i` and `token_acc/final`
    (argmax against the target token), token-weighted over the whole set (and over processes).

    With `discriminators`, also each D_i's held-out `d_acc/exit_i` and `d_loss/exit_i` (h_N vs E_i(h_i)): the
    training batch's D accuracy mixes D's progress with the exits' last move, this one does not."""
    kinds = ["kl", "token_acc"] + (["d_acc", "d_loss"] if discriminators is not None else [])
    names = [f"{kind}/exit_{k}" for kind in kinds for k in ee.exits] + ["token_acc/final"]

    def sums(out: ExitOutputs) -> dict[str, float]:
        n, final_logits = len(out.targets), out.final_logits.float()
        values = {"token_acc/final": (final_logits.argmax(-1) == out.targets).sum().item()}
        for k, logits in out.logits.items():
            logits = logits.float()
            values[f"kl/exit_{k}"] = kd_loss(logits, final_logits).item() * n
            values[f"token_acc/exit_{k}"] = (logits.argmax(-1) == out.targets).sum().item()
            if discriminators is not None:
                loss, acc = discriminator_loss(discriminators, out.final_features, {k: out.features[k]})
                values[f"d_loss/exit_{k}"] = loss.item() * n
                values[f"d_acc/exit_{k}"] = acc[k].item() * n
        return values

    return token_means(ee, dataset, names, sums, batch_size, runtime)


class DiscriminatorMonitor:
    """Warns (once per exit and kind) when D_i's accuracy sits at ~100% — the exit cannot produce features D
    mistakes for h_N (generator collapse or too strong a D) — or at ~50% for `window` steps. 50% does not mean the
    exits match h_N: a D that learns but is outrun by the exits each step sits there too (bench/bench_discriminator.py
    tells the cases apart with a D trained on frozen exits)."""

    def __init__(self, keys: list[str], window: int):
        self.window = window
        self.history = {k: deque(maxlen=window) for k in keys}
        self.warned: set[tuple[str, str]] = set()

    def update(self, accuracy: dict[str, float], step: int) -> None:
        for k, acc in accuracy.items():
            hist = self.history[k]
            hist.append(acc)
            if len(hist) < self.window:
                continue
            if min(hist) >= 0.99 and (k, "high") not in self.warned:
                self.warned.add((k, "high"))
                logger.warning(
                    "step %d: discriminator of exit %s has been ~100%% accurate for %d steps: the exit's "
                    "features are easy to tell from h_N (generator collapse?)",
                    step,
                    k,
                    self.window,
                )
            if max(abs(a - 0.5) for a in hist) <= 0.02 and (k, "chance") not in self.warned:
                self.warned.add((k, "chance"))
                logger.warning(
                    "step %d: discriminator of exit %s has been at ~50%% accuracy for %d steps: it "
                    "learns nothing or the exits outrun it (see bench/bench_discriminator.py)",
                    step,
                    k,
                    self.window,
                )


class FreeGAN(ExitObjective):
    """FREE's objective: D_i against E_i, the exits anchored by `config.anchor`."""

    PARTS = (*ExitObjective.PARTS, "discriminators", "g_opt", "d_opt", "g_sched", "d_sched")

    def __init__(self, model: nn.Module, config: ExitTrainConfig, runtime: Runtime, data: Dataset):
        super().__init__(model, ExitConfig(list(config.exit_layers), config.init), config, runtime, data)
        self.discriminators = make_discriminators(self.ee, config.disc_hidden)
        runtime.broadcast_([*self.ee.exits.parameters(), *self.discriminators.parameters()])
        self.g_params, self.d_params = list(self.ee.exits.parameters()), list(self.discriminators.parameters())
        self.g_opt = torch.optim.AdamW(self.g_params, lr=config.lr, weight_decay=config.weight_decay)
        self.d_opt = torch.optim.AdamW(self.d_params, lr=config.disc_lr or config.lr, weight_decay=config.weight_decay)
        self.g_sched = make_scheduler(self.g_opt, config, self.total)
        self.d_sched = make_scheduler(self.d_opt, config, self.total)
        self.monitor = DiscriminatorMonitor(list(self.ee.exits), config.d_warn_window)

    def step(self, batch: dict, step: int) -> tuple[dict[str, float] | None, dict[str, torch.Tensor]]:
        config, device = self.config, self.runtime.device
        with autocast(config, device):
            out = self.ee(batch)
        zero = out.final_features.new_zeros((), dtype=torch.float32)

        # D step: h_N is real (label 1), E_i(h_i) detached is fake (label 0)
        d_loss, d_acc = zero, {}
        if config.adversarial:
            with autocast(config, device):
                d_loss, d_acc = discriminator_loss(
                    self.discriminators, out.final_features, out.features, config.disc_r1
                )
        ok = self.guard.ok({"discriminator loss": d_loss}, step, self.runtime)
        if ok and config.adversarial:
            self.optimizer_step(d_loss, self.d_opt, self.d_params)

        # G step: fool the updated D_i, anchored to the labels or to the final layer's soft labels
        adv, anchor = zero, zero
        if ok:
            with autocast(config, device):
                if config.adversarial:
                    adv = adversarial_loss(self.discriminators, out.features)
                for logits in out.logits.values():
                    if config.anchor == "kd":
                        anchor = anchor + kd_loss(logits, out.final_logits, config.temperature, config.kd_direction)
                    else:
                        anchor = anchor + F.cross_entropy(logits.float(), out.targets)
                g_loss = config.adv_weight * adv + config.anchor_weight * anchor
            ok = self.guard.ok({"generator loss": g_loss}, step, self.runtime)
        if ok:
            self.optimizer_step(g_loss, self.g_opt, self.g_params)
            self.scaler.update()
            self.g_sched.step()
            if config.adversarial:
                self.d_sched.step()
            if d_acc:
                self.monitor.update(dict(zip(d_acc, torch.stack(list(d_acc.values())).tolist())), step + 1)
        losses = {"train/d_loss": d_loss, "train/g_adv_loss": adv, "train/anchor_loss": anchor}
        if config.adversarial:
            losses.update({f"train/d_acc/exit_{k}": d_acc.get(k, zero) for k in self.ee.exits})
        return ({"d": d_loss.item(), "adv": adv.item(), config.anchor: anchor.item()} if ok else None), losses

    def scalars(self, means: dict[str, float]) -> dict[str, float]:
        config = self.config
        g_loss = config.adv_weight * means["train/g_adv_loss"] + config.anchor_weight * means["train/anchor_loss"]
        return {"train/g_loss": g_loss, "train/lr": self.g_sched.get_last_lr()[0]}

    def evaluate(self, dataset: Dataset) -> dict[str, float]:
        discs = self.discriminators if self.config.adversarial else None
        return evaluate_exits(self.ee, dataset, self.config.batch_size, self.runtime, discs)


def train_exits(
    model: nn.Module, train_set: CaptionDataset, config: ExitTrainConfig, dev_set: CaptionDataset | None = None
) -> EarlyExitVLM:
    """Attach exits at `config.exit_layers` to the (frozen) BLIP-2 `model` and train them; returns the exits,
    also written to `<output_dir>/exits` (loadable with `EarlyExitVLM.from_pretrained`)."""
    return train(lambda runtime: FreeGAN(model, config, runtime, train_set), config, dev_set)
