"""The one training loop (the recipe) and what a method plugs into it (the objective).

The loop owns what every run shares: processes (Accelerate), seeding, resume, the data order, logging, dev
evaluation, atomic checkpoints and the result on disk. An `Objective` owns the method: its modules, optimizers
and schedulers under their checkpoint keys, one training step, its extra scalars, its dev metrics and its
products. Stage 1 fine-tuning (`finetune.py`), FREE's GAN (`exits.py`) and the baselines (`baselines.py`) are
objectives; the loop never knows which one it runs.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

from ..files import write_text_atomic
from ..model import CheckpointMismatchError, EarlyExitVLM, ExitOutputs, check_fingerprint
from .checkpoint import resume_or_start, save_checkpoint
from .common import DivergenceGuard, LoopConfig, Progress, Runtime, batch_stream, logger, total_steps
from .data import CaptionCollator

# settings that may change on resume without a warning: they say how long to run and how to show it
RESUMABLE_CHANGES = ("resume", "max_steps", "epochs", "progress")


class Objective:
    """A training method. Built after the loop seeds the RNG with `config.seed` (initial weights depend on it);
    `data` is what the loop iterates. `PARTS` names the attributes that have a state (modules, optimizers,
    schedulers, the loss scaler): the base class saves and restores each under its name, and a checkpoint that
    lacks one was written by another kind of run (`checkpoint.check_state`)."""

    PARTS: tuple[str, ...] = ("scaler",)
    ee: EarlyExitVLM  # the model it trains through (its backbone's config lays out the batches)

    def __init__(self, config: LoopConfig, runtime: Runtime, data: Dataset):
        self.config, self.runtime, self.data = config, runtime, data
        self.total = total_steps(config, len(data), runtime.world)
        self.scaler = torch.amp.GradScaler(runtime.device.type, enabled=config.precision == "fp16")
        self.guard = DivergenceGuard(config.max_nonfinite_steps)

    def state_dict(self) -> dict:
        return {key: getattr(self, key).state_dict() for key in self.PARTS}

    def load_state_dict(self, state: dict, path: Path) -> None:
        """Restore a checkpoint's state; subclasses first refuse one made for other modules."""
        for key in self.PARTS:
            getattr(self, key).load_state_dict(state[key])

    def begin(self, step: int) -> None:
        """Put the trained modules in train mode before step `step` (the first, or the one resumed at)."""

    def step(self, batch: dict, step: int) -> tuple[dict[str, float] | None, dict[str, torch.Tensor]]:
        """One training step: (progress-bar values, None if the step was skipped; losses to log as `train/...`)."""
        raise NotImplementedError

    def scalars(self, means: dict[str, float]) -> dict[str, float]:
        """Scalars logged beside the losses' means over processes (learning rates, derived totals)."""
        return {}

    def evaluate(self, dataset: Dataset) -> dict[str, float]:
        raise NotImplementedError

    def save(self, folder: Path) -> None:
        """What a checkpoint folder carries beside `state.pt` (main process only)."""

    def finish(self, out_dir: Path):
        """The trained result, written to `out_dir` by the main process; returned on every process."""
        raise NotImplementedError

    def optimizer_step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer, params: list[nn.Parameter]) -> None:
        """Backward, average gradients over processes, unscale, clip, step."""
        optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.runtime.average_gradients(params)
        self.scaler.unscale_(optimizer)
        if self.config.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, self.config.grad_clip)
        self.scaler.step(optimizer)


class ExitObjective(Objective):
    """Exits trained on a frozen backbone (FREE and the baselines): checkpoints carry the exits and what they were
    made for, and every checkpoint folder and the run folder hold `exits/`, loadable with `from_pretrained`."""

    PARTS = (*Objective.PARTS, "exits")

    def __init__(self, model: nn.Module, exit_config, config: LoopConfig, runtime: Runtime, data: Dataset):
        super().__init__(config, runtime, data)
        model.to(runtime.device).eval().requires_grad_(False)  # the backbone is frozen in stage 2
        self.ee = EarlyExitVLM(model, exit_config)
        self.exits = self.ee.exits

    def state_dict(self) -> dict:
        return {"exit_layers": self.ee.exit_layers, "backbone": self.ee.backbone.fingerprint(), **super().state_dict()}

    def load_state_dict(self, state: dict, path: Path) -> None:
        if list(state["exit_layers"]) != self.ee.exit_layers:
            raise CheckpointMismatchError(
                f"checkpoint {path} has exits at layers {list(state['exit_layers'])}, but this run asks for "
                f"{self.ee.exit_layers}: use the same exit layers to resume, or start a new output_dir"
            )
        check_fingerprint(state["backbone"], self.ee.backbone.fingerprint(), path)
        super().load_state_dict(state, path)

    def begin(self, step: int) -> None:
        self.ee.exits.train()

    def save(self, folder: Path) -> None:
        self.ee.save_exits(folder / "exits")

    def finish(self, out_dir: Path) -> EarlyExitVLM:
        if self.runtime.is_main:
            self.save(out_dir)
        self.ee.eval()
        return self.ee


def train(make: Callable[[Runtime], Objective], config: LoopConfig, dev_set: Dataset | None = None):
    """Run `make(runtime)`'s objective for `config`: returns its result (`Objective.finish`).

    Writes checkpoints under `<output_dir>/checkpoints`, TensorBoard scalars under `<output_dir>/tensorboard`,
    `<output_dir>/dev_metrics.json` (with a dev set) and the objective's products.
    """
    config.validate()
    runtime = Runtime(cpu=config.cpu)
    out_dir, ckpt_dir = Path(config.output_dir), Path(config.output_dir) / "checkpoints"
    torch.manual_seed(config.seed)  # identical initial weights on every process
    objective = make(runtime)
    total, guard = objective.total, objective.guard

    step = 0
    resumed = resume_or_start(ckpt_dir, runtime, config.resume, config.seed)
    if resumed is not None:
        path, state = resumed
        objective.load_state_dict(state, path)
        step, guard.skipped = state["step"], state["nonfinite_skipped"]
        saved = state["config"]
        changed = sorted(k for k, v in asdict(config).items() if k not in RESUMABLE_CHANGES and saved.get(k) != v)
        if changed:
            logger.warning("resuming %s with changed settings: %s", path, ", ".join(changed))
        logger.info("resumed from %s at step %d", path, step)

    objective.begin(step)
    collate = CaptionCollator.for_model(objective.ee.backbone.config)
    stream = batch_stream(objective.data, collate, config, runtime, step)
    progress = Progress(config, runtime, total, step, str(out_dir / "tensorboard"))
    while step < total:
        postfix, losses = objective.step(next(stream), step)
        step += 1  # a skipped step still consumes its batch: reruns see the same batch at each step
        progress.step(postfix)
        if step % config.log_every == 0 or step == total:
            means = runtime.sum(torch.stack([v.detach().float() for v in losses.values()])) / runtime.world
            means = dict(zip(losses, means.tolist()))
            progress.scalars({**means, **objective.scalars(means), "train/nonfinite_skipped": guard.skipped}, step)
        if dev_set is not None and ((config.eval_every and step % config.eval_every == 0) or step == total):
            metrics = objective.evaluate(dev_set)
            progress.scalars({f"dev/{k}": v for k, v in metrics.items()}, step)
            if runtime.is_main and step == total:
                write_text_atomic(out_dir / "dev_metrics.json", json.dumps(metrics, indent=2))
        if step % config.checkpoint_every == 0 or step == total:
            state = {
                "step": step,
                "config": asdict(config),
                **objective.state_dict(),
                "nonfinite_skipped": guard.skipped,
            }
            save_checkpoint(ckpt_dir, step, state, runtime, config.keep_checkpoints, write_extra=objective.save)

    progress.close()
    result = objective.finish(out_dir)
    runtime.barrier()
    return result


@contextlib.contextmanager
def eval_mode(*modules: nn.Module):
    """Every submodule in eval mode within the block, then each one's own mode back (stage 1 trains only parts)."""
    saved = [(m, m.training) for root in modules for m in root.modules()]
    for root in modules:
        root.eval()
    try:
        yield
    finally:
        for module, mode in saved:
            module.training = mode


@torch.no_grad()
def token_means(
    ee: EarlyExitVLM,
    dataset: Dataset,
    names: list[str],
    sums: Callable[[ExitOutputs], dict[str, float]],
    batch_size: int = 16,
    runtime: Runtime | None = None,
) -> dict[str, float]:
    """Per text token over `dataset` (and over processes): each of `names` summed by `sums(ee(batch))` over the
    batches, divided by the number of text tokens."""
    rank, world = (runtime.rank, runtime.world) if runtime is not None else (0, 1)
    collate = CaptionCollator.for_model(ee.backbone.config)
    totals = torch.zeros(len(names) + 1, dtype=torch.float64)
    indices = list(range(rank, len(dataset), world))
    with eval_mode(ee, ee.model):
        for start in range(0, len(indices), batch_size):
            batch = collate([dataset[i] for i in indices[start : start + batch_size]])
            out = ee({k: v.to(ee.backbone.device) for k, v in batch.items()})
            values = sums(out)
            totals += torch.tensor([values[name] for name in names] + [len(out.targets)], dtype=torch.float64)
    if runtime is not None:
        totals = runtime.sum(totals).cpu()
    n = max(totals[-1].item(), 1.0)
    return {name: totals[j].item() / n for j, name in enumerate(names)}
