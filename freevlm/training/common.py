"""The training loop's parts: its config, processes (Accelerate), data order, LR schedule, autocast, the
divergence guard and progress.

Gradients are averaged across processes explicitly (one all-reduce of the flattened gradients per optimizer step)
rather than through DDP: exit training alternates two optimizers over modules that are not called through their
own `forward`, which DDP's hooks do not follow.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, fields

import torch
from torch.utils.data import DataLoader, Dataset

logger = logging.getLogger("freevlm.training")

SCHEDULES = ("constant", "linear", "cosine")
PRECISIONS = ("no", "bf16", "fp16")


class TrainingDiverged(RuntimeError):
    """Too many steps with non-finite losses: training stopped instead of writing NaN weights."""


@dataclass
class LoopConfig:
    """Settings every training loop has. `max_steps` (if set) overrides `epochs`."""

    output_dir: str = "runs/train"
    epochs: int = 3
    max_steps: int | None = None
    batch_size: int = 16  # per process
    lr: float = 1e-5
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: str = "cosine"
    grad_clip: float | None = 1.0
    seed: int = 0
    precision: str = "no"
    cpu: bool = False  # force CPU even where an accelerator is present
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 10
    eval_every: int = 0  # 0: evaluate on the dev split only at the end
    num_workers: int = 0
    max_nonfinite_steps: int = 10
    resume: bool = False
    progress: bool = True
    tensorboard: bool = True

    def validate(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}, expected one of {SCHEDULES}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r}, expected one of {PRECISIONS}")
        if self.max_steps is None and self.epochs < 1:
            raise ValueError(f"epochs must be >= 1 (or set max_steps), got {self.epochs}: nothing would be trained")
        for name in ("batch_size", "max_steps", "checkpoint_every", "log_every", "keep_checkpoints"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "eval_every", "num_workers", "max_nonfinite_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        # every float setting of every loop (rates, weights, temperatures...): NaN or inf trains garbage silently
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{f.name} must be a finite number, got {value}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.weight_decay < 0 or (self.grad_clip is not None and self.grad_clip < 0):
            raise ValueError(f"weight_decay and grad_clip must be >= 0, got {self.weight_decay}, {self.grad_clip}")


class Runtime:
    """This process's place in the run: device, rank, world size, and the few collectives the loops need."""

    def __init__(self, cpu: bool = False):
        from accelerate import Accelerator

        self.accelerator = Accelerator(cpu=cpu)
        if self.accelerator.num_processes > 1:  # before the interpreter tears down (see eval/processes.py)
            atexit.register(self.accelerator.state.destroy_process_group)
        self.device = self.accelerator.device
        self.rank = self.accelerator.process_index
        self.world = self.accelerator.num_processes
        self.is_main = self.accelerator.is_main_process

    def barrier(self) -> None:
        self.accelerator.wait_for_everyone()

    def average_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Mean of every gradient over processes, in one all-reduce (missing gradients count as zero)."""
        if self.world == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        flat = self.accelerator.reduce(flat, reduction="mean")
        offset = 0
        for p, g in zip(params, grads):
            p.grad = flat[offset : offset + g.numel()].view_as(p).to(p.dtype)
            offset += g.numel()

    def broadcast_(self, tensors: list[torch.Tensor]) -> None:
        """Make every process start from rank 0's weights."""
        if self.world == 1:
            return
        for t in tensors:
            torch.distributed.broadcast(t.data, src=0)

    def any(self, flag: bool) -> bool:
        """True on every process if it is true on any (so all processes skip a step together)."""
        if self.world == 1:
            return flag
        value = torch.tensor([float(flag)], device=self.device)
        return bool(self.accelerator.reduce(value, reduction="sum").item() > 0)

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        return values if self.world == 1 else self.accelerator.reduce(values.to(self.device), reduction="sum")


def steps_per_epoch(num_records: int, batch_size: int, world: int) -> int:
    per_step = batch_size * world
    steps = num_records // per_step
    if steps == 0:
        raise ValueError(
            f"the training set has {num_records} records, fewer than one step needs "
            f"(batch_size {batch_size} x {world} process(es) = {per_step})"
        )
    return steps


def epoch_batches(num_records: int, batch_size: int, seed: int, epoch: int, rank: int, world: int) -> list[list[int]]:
    """This process's index batches for `epoch`: a permutation fixed by (seed, epoch), split by rank, last partial
    step dropped. Depending on nothing else is what makes resuming mid-epoch exact."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(num_records, generator=gen).tolist()
    per_step = batch_size * world
    return [
        order[s * per_step + rank * batch_size : s * per_step + (rank + 1) * batch_size]
        for s in range(steps_per_epoch(num_records, batch_size, world))
    ]


def batch_stream(dataset: Dataset, collate, config: LoopConfig, runtime: Runtime, start_step: int) -> Iterator[dict]:
    """Batches from `start_step` on, forever (epoch after epoch); the global RNG is never touched."""
    spe = steps_per_epoch(len(dataset), config.batch_size, runtime.world)
    epoch, offset = divmod(start_step, spe)
    while True:
        batches = epoch_batches(len(dataset), config.batch_size, config.seed, epoch, runtime.rank, runtime.world)
        loader = DataLoader(
            dataset,
            batch_sampler=batches[offset:],
            collate_fn=collate,
            num_workers=config.num_workers,
            generator=torch.Generator().manual_seed(config.seed + epoch),  # else DataLoader draws from the global RNG
        )
        for batch in loader:
            yield {k: v.to(runtime.device) for k, v in batch.items()}
        epoch, offset = epoch + 1, 0


def total_steps(config: LoopConfig, num_records: int, world: int) -> int:
    """`max_steps`, else `epochs` epochs; either way a batch too large for the data is refused here, before the run
    folder is made (with `max_steps` too)."""
    per_epoch = steps_per_epoch(num_records, config.batch_size, world)
    return config.max_steps if config.max_steps is not None else config.epochs * per_epoch


def make_scheduler(
    optimizer: torch.optim.Optimizer, config: LoopConfig, total: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, then constant, linear or cosine decay to zero at `total` steps."""
    warmup, kind = config.warmup_steps, config.schedule

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if kind == "linear":
            return 1.0 - progress
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def autocast(config: LoopConfig, device: torch.device):
    """bf16/fp16 autocast on `device`, or nothing."""
    if config.precision == "no":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if config.precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


class DivergenceGuard:
    """Skips (and counts) steps whose losses are not finite; raises `TrainingDiverged` past `max_skipped`."""

    def __init__(self, max_skipped: int, skipped: int = 0):
        self.max_skipped = max_skipped
        self.skipped = skipped

    def ok(self, losses: dict[str, torch.Tensor], step: int, runtime: Runtime) -> bool:
        bad = [name for name, value in losses.items() if not torch.isfinite(value.detach()).all()]
        if not runtime.any(bool(bad)):
            return True
        self.skipped += 1
        where = ", ".join(bad) if bad else "a loss on another process"
        logger.warning("step %d: non-finite %s, step skipped (%d skipped so far)", step, where, self.skipped)
        if self.skipped > self.max_skipped:
            raise TrainingDiverged(
                f"training diverged: {self.skipped} steps had non-finite losses (last at step {step}: {where}), "
                f"more than max_nonfinite_steps={self.max_skipped}; lower the learning rate or use bf16/fp32"
            )
        return False


_listeners: list = []  # (callback, bar description) pairs installed by `progress_hook`


@contextlib.contextmanager
def progress_hook(callback=None, desc: str | None = None):
    """Within the block, every training loop calls `callback(step, total, postfix)` after each step and names its
    bar `desc`: how a caller (the demo) shows and tests progress without a field in the checkpointed config."""
    entry = (callback, desc)
    _listeners.append(entry)
    try:
        yield
    finally:
        _listeners.remove(entry)


class Progress:
    """tqdm bar + TensorBoard scalars (+ `progress_hook` callbacks), on the main process only."""

    def __init__(self, config: LoopConfig, runtime: Runtime, total: int, start: int, log_dir: str):
        self.bar = self.writer = None
        self.step_count, self.total = start, total
        self.callbacks = [cb for cb, _ in _listeners if cb is not None] if runtime.is_main else []
        if not runtime.is_main:
            return
        if config.progress:
            from tqdm.auto import tqdm

            desc = next((d for _, d in reversed(_listeners) if d), "train")
            self.bar = tqdm(total=total, initial=start, desc=desc, dynamic_ncols=True)
        if config.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir)

    def step(self, postfix: dict[str, float] | None = None) -> None:
        self.step_count += 1
        for callback in self.callbacks:
            callback(self.step_count, self.total, postfix or {})
        if self.bar is not None:
            self.bar.update(1)
            if postfix:
                self.bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
