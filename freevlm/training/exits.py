"""Stage 2: FREE exit training. The backbone is frozen; each exit E_i is a generator, each D_i a discriminator.

Per batch (paper section 3.3):
  1. the frozen backbone runs once under `no_grad`: h_0..h_N on every position;
  2. E_i(h_i) for every exit, on the whole sequence (exits are causal layers that attend over it);
  3. D step: sum_i BCE(D_i(h_N), 1) + BCE(D_i(E_i(h_i).detach()), 0);
  4. G step: sum_i  adv_weight * -log D_i(E_i(h_i))  +  anchor_weight * anchor_i, where the anchor is
     `ce` (labels), `kd` (KL to the final layer's soft labels) or `capfilt` (CE on CapFilt pseudo-captions).
Losses and features use text positions only (those that predict a target token): never query tokens, prompt, pad.
"""

from __future__ import annotations

import json
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..exits import ExitConfig, ExitLayer, FeatureDiscriminator
from ..model import CheckpointMismatchError, EarlyExitVLM, check_fingerprint
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


def kd_loss(exit_logits: torch.Tensor, final_logits: torch.Tensor, temperature: float = 1.0,
            direction: str = "exit_to_final") -> torch.Tensor:  # fmt: skip
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


def exit_features(
    ee: EarlyExitVLM, states: list[torch.Tensor], ctx, mask: torch.Tensor, text: torch.Tensor
) -> dict[str, torch.Tensor]:
    """E_i(h_i) at text positions, `[n_text, H]` per exit; h_i itself for exits without a layer (linear, head)."""
    return {
        k: (
            ee.backbone.run_layer(e.layer, states[e.at], ctx, None, mask, None)
            if isinstance(e, ExitLayer)
            else states[e.at]
        )[text]
        for k, e in ee.exits.items()
    }


def backbone_features(ee: EarlyExitVLM, batch: dict[str, torch.Tensor]):
    """h_0..h_N of the frozen backbone (no graph), its context and attention mask."""
    with torch.no_grad():
        return ee.backbone.features(
            batch["pixel_values"], batch["input_ids"], batch["attention_mask"], batch.get("decoder_input_ids")
        )


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
        loss = loss + F.binary_cross_entropy_with_logits(d_real, torch.ones_like(d_real)) \
            + F.binary_cross_entropy_with_logits(d_fake, torch.zeros_like(d_fake))  # fmt: skip
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


@torch.no_grad()
def evaluate_exits(
    ee: EarlyExitVLM, dataset: CaptionDataset, batch_size: int = 16, runtime: Runtime | None = None,
    discriminators: nn.ModuleDict | None = None,
) -> dict[str, float]:  # fmt: skip
    """Held-out `kl/exit_i` = KL(p_i || p_N) per text token, `token_acc/exit_i` and `token_acc/final`
    (argmax against the target token), token-weighted over the whole set (and over processes).

    With `discriminators`, also each D_i's held-out `d_acc/exit_i` and `d_loss/exit_i` (h_N vs E_i(h_i)): the
    training batch's D accuracy mixes D's progress with the exits' last move, this one does not."""
    rank, world = (runtime.rank, runtime.world) if runtime is not None else (0, 1)
    collate = CaptionCollator.for_model(ee.backbone.config)
    was_training = ee.training
    ee.eval()
    keys = list(ee.exits)
    kinds = ["kl", "token_acc"] + (["d_acc", "d_loss"] if discriminators is not None else [])
    names = [f"{kind}/exit_{k}" for kind in kinds for k in keys] + ["token_acc/final"]
    sums = dict.fromkeys(names, 0.0)
    tokens = 0
    indices = list(range(rank, len(dataset), world))
    for start in range(0, len(indices), batch_size):
        batch = collate([dataset[i] for i in indices[start : start + batch_size]])
        batch = {k: v.to(ee.backbone.device) for k, v in batch.items()}
        states, ctx, mask = backbone_features(ee, batch)
        text = batch["targets"] != IGNORE
        targets = batch["targets"][text]
        n = len(targets)
        final_logits = ee.backbone.head(states[-1][text]).float()
        fakes = exit_features(ee, states, ctx, mask, text)
        for k, feats in fakes.items():
            logits = ee.exits[k].logits(ee.backbone, feats).float()
            sums[f"kl/exit_{k}"] += kd_loss(logits, final_logits).item() * n
            sums[f"token_acc/exit_{k}"] += (logits.argmax(-1) == targets).sum().item()
            if discriminators is not None:
                loss, acc = discriminator_loss(discriminators, states[-1][text], {k: feats})
                sums[f"d_loss/exit_{k}"] += loss.item() * n
                sums[f"d_acc/exit_{k}"] += acc[k].item() * n
        sums["token_acc/final"] += (final_logits.argmax(-1) == targets).sum().item()
        tokens += n
    totals = torch.tensor([*sums.values(), tokens], dtype=torch.float64)
    if runtime is not None:
        totals = runtime.sum(totals).cpu()
    ee.train(was_training)
    n = max(totals[-1].item(), 1.0)
    return {name: totals[j].item() / n for j, name in enumerate(names)}


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
                logger.warning("step %d: discriminator of exit %s has been ~100%% accurate for %d steps: the exit's "
                               "features are easy to tell from h_N (generator collapse?)", step, k, self.window)  # fmt: skip
            if max(abs(a - 0.5) for a in hist) <= 0.02 and (k, "chance") not in self.warned:
                self.warned.add((k, "chance"))
                logger.warning("step %d: discriminator of exit %s has been at ~50%% accuracy for %d steps: it "
                               "learns nothing or the exits outrun it (see bench/bench_discriminator.py)", step, k,
                               self.window)  # fmt: skip


def train_exits(model: nn.Module, train_set: CaptionDataset, config: ExitTrainConfig,
                dev_set: CaptionDataset | None = None) -> EarlyExitVLM:  # fmt: skip
    """Attach exits at `config.exit_layers` to the (frozen) BLIP-2 `model` and train them; returns the exits.

    Writes checkpoints under `<output_dir>/checkpoints`, TensorBoard scalars under `<output_dir>/tensorboard`, and
    the final exits (loadable with `EarlyExitVLM.from_pretrained`) under `<output_dir>/exits`.
    """
    config.validate()
    runtime = Runtime(cpu=config.cpu)
    out_dir, ckpt_dir = Path(config.output_dir), Path(config.output_dir) / "checkpoints"
    torch.manual_seed(config.seed)  # identical exits and discriminators on every process

    model.to(runtime.device).eval().requires_grad_(False)  # the backbone is frozen in stage 2
    ee = EarlyExitVLM(model, ExitConfig(list(config.exit_layers), config.init))
    discs = make_discriminators(ee, config.disc_hidden)
    runtime.broadcast_([*ee.exits.parameters(), *discs.parameters()])
    g_params, d_params = list(ee.exits.parameters()), list(discs.parameters())
    g_opt = torch.optim.AdamW(g_params, lr=config.lr, weight_decay=config.weight_decay)
    d_opt = torch.optim.AdamW(d_params, lr=config.disc_lr or config.lr, weight_decay=config.weight_decay)
    total = total_steps(config, len(train_set), runtime.world)
    g_sched, d_sched = make_scheduler(g_opt, config, total), make_scheduler(d_opt, config, total)
    scaler = grad_scaler(config, runtime.device)
    guard = DivergenceGuard(config.max_nonfinite_steps)

    step = 0
    resumed = resume_or_start(ckpt_dir, runtime, config.resume, config.seed)
    if resumed is not None:
        path, state = resumed
        _check_resume(state, ee, config, path)
        ee.exits.load_state_dict(state["exits"])
        discs.load_state_dict(state["discriminators"])
        for obj, key in (
            (g_opt, "g_opt"),
            (d_opt, "d_opt"),
            (g_sched, "g_sched"),
            (d_sched, "d_sched"),
            (scaler, "scaler"),
        ):
            obj.load_state_dict(state[key])
        step, guard.skipped = state["step"], state["nonfinite_skipped"]
        logger.info("resumed from %s at step %d", path, step)

    ee.exits.train()
    collate = CaptionCollator.for_model(model.config)
    stream = batch_stream(train_set, collate, config, runtime, step)
    progress = Progress(config, runtime, total, step, str(out_dir / "tensorboard"))
    monitor = DiscriminatorMonitor(list(ee.exits), config.d_warn_window)
    keys = list(ee.exits)

    while step < total:
        batch = next(stream)
        with autocast(config, runtime.device):
            states, ctx, mask = backbone_features(ee, batch)
            text = batch["targets"] != IGNORE
            real, targets = states[-1][text], batch["targets"][text]
            fakes = exit_features(ee, states, ctx, mask, text)
        zero = real.new_zeros((), dtype=torch.float32)

        # D step: h_N is real (label 1), E_i(h_i) detached is fake (label 0)
        d_loss, d_acc = zero, {}
        if config.adversarial:
            with autocast(config, runtime.device):
                d_loss, d_acc = discriminator_loss(discs, real, fakes, config.disc_r1)
        ok = guard.ok({"discriminator loss": d_loss}, step, runtime)
        if ok and config.adversarial:
            d_opt.zero_grad(set_to_none=True)
            scaler.scale(d_loss).backward()
            optimizer_step(d_opt, d_params, scaler, runtime, config.grad_clip)

        # G step: fool the updated D_i, anchored to the labels or to the final layer's soft labels
        adv, anchor = zero, zero
        if ok:
            with autocast(config, runtime.device):
                final_logits = ee.backbone.head(real) if config.anchor == "kd" else None
                if config.adversarial:
                    adv = adversarial_loss(discs, fakes)
                for fake in fakes.values():
                    logits = ee.backbone.head(fake)
                    if config.anchor == "kd":
                        anchor = anchor + kd_loss(logits, final_logits, config.temperature, config.kd_direction)
                    else:
                        anchor = anchor + F.cross_entropy(logits.float(), targets)
                g_loss = config.adv_weight * adv + config.anchor_weight * anchor
            ok = guard.ok({"generator loss": g_loss}, step, runtime)
        if ok:
            g_opt.zero_grad(set_to_none=True)
            scaler.scale(g_loss).backward()
            optimizer_step(g_opt, g_params, scaler, runtime, config.grad_clip)
            scaler.update()
            g_sched.step()
            if config.adversarial:
                d_sched.step()
        step += 1  # a skipped step still consumes its batch: reruns see the same batch at each step

        # bookkeeping: progress bar, TensorBoard, D monitor, dev evaluation, checkpoints
        progress.step({"d": d_loss.item(), "adv": adv.item(), config.anchor: anchor.item()} if ok else None)
        if ok and d_acc:
            monitor.update(dict(zip(d_acc, torch.stack(list(d_acc.values())).tolist())), step)
        if step % config.log_every == 0 or step == total:
            values = torch.stack([d_loss.detach(), adv.detach(), anchor.detach(), *[d_acc.get(k, zero) for k in keys]])
            values = (runtime.sum(values.float()) / runtime.world).tolist()
            scalars = {"train/d_loss": values[0], "train/g_adv_loss": values[1], "train/anchor_loss": values[2],
                       "train/g_loss": config.adv_weight * values[1] + config.anchor_weight * values[2],
                       "train/lr": g_sched.get_last_lr()[0], "train/nonfinite_skipped": guard.skipped}  # fmt: skip
            if config.adversarial:
                scalars.update({f"train/d_acc/exit_{k}": values[3 + j] for j, k in enumerate(keys)})
            progress.scalars(scalars, step)
        if dev_set is not None and ((config.eval_every and step % config.eval_every == 0) or step == total):
            metrics = evaluate_exits(ee, dev_set, config.batch_size, runtime, discs if config.adversarial else None)
            progress.scalars({f"dev/{k}": v for k, v in metrics.items()}, step)
            if runtime.is_main and step == total:
                (out_dir / "dev_metrics.json").write_text(json.dumps(metrics, indent=2))
        if step % config.checkpoint_every == 0 or step == total:
            state = {"step": step, "config": asdict(config), "exit_layers": ee.exit_layers,
                     "backbone": ee.backbone.fingerprint(), "exits": ee.exits.state_dict(),
                     "discriminators": discs.state_dict(), "g_opt": g_opt.state_dict(), "d_opt": d_opt.state_dict(),
                     "g_sched": g_sched.state_dict(), "d_sched": d_sched.state_dict(), "scaler": scaler.state_dict(),
                     "nonfinite_skipped": guard.skipped}  # fmt: skip
            save_checkpoint(ckpt_dir, step, state, runtime, config.keep_checkpoints,
                            write_extra=lambda folder: ee.save_exits(folder / "exits"))  # fmt: skip

    progress.close()
    if runtime.is_main:
        ee.save_exits(out_dir / "exits")
    runtime.barrier()
    ee.eval()
    return ee


def _check_resume(state: dict, ee: EarlyExitVLM, config: ExitTrainConfig, path: Path) -> None:
    """Refuse a checkpoint made for other exits or another backbone; note other changed settings."""
    if list(state["exit_layers"]) != ee.exit_layers:
        raise CheckpointMismatchError(
            f"checkpoint {path} has exits at layers {list(state['exit_layers'])}, but this run asks for "
            f"{ee.exit_layers}: use the same exit layers to resume, or start a new output_dir"
        )
    check_fingerprint(state["backbone"], ee.backbone.fingerprint(), path)
    saved, now = state["config"], asdict(config)
    changed = sorted(
        k for k in now if k not in ("resume", "max_steps", "epochs", "progress") and saved.get(k) != now[k]
    )
    if changed:
        logger.warning("resuming %s with changed settings: %s", path, ", ".join(changed))
