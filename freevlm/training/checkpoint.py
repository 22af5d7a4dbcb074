"""Training checkpoints: written atomically, resumed exactly.

Layout under `<output_dir>/checkpoints/`:

    step-00000100/state.pt      model/optimizer/scheduler/scaler state, step, config (main process)
    step-00000100/rng-<rank>.pt every process's RNG state (Python, torch CPU, CUDA)
    step-00000100/...           anything the trainer adds (stage 2: `exits/`, loadable with from_pretrained)
    latest                      the name of the newest complete checkpoint

A checkpoint is assembled in a hidden temporary folder and renamed into place, and `latest` is replaced
atomically after that, so a run killed at any moment leaves either the old or the new checkpoint, never half of one.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Callable

import torch

from .common import Runtime, logger

LATEST = "latest"


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    directory: str | os.PathLike, step: int, state: dict, runtime: Runtime, keep: int = 2,
    write_extra: Callable[[Path], None] | None = None,
) -> Path:  # fmt: skip
    """Write checkpoint `step` (collective: every process must call it); returns its folder."""
    directory = Path(directory)
    name = f"step-{step:08d}"
    final, tmp = directory / name, directory / f".{name}.tmp"
    if runtime.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        torch.save(state, tmp / "state.pt")
        if write_extra is not None:
            write_extra(tmp)
    runtime.barrier()
    torch.save(rng_state(), tmp / f"rng-{runtime.rank}.pt")
    runtime.barrier()
    if runtime.is_main:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        latest_tmp = directory / (LATEST + ".tmp")
        latest_tmp.write_text(name)
        os.replace(latest_tmp, directory / LATEST)
        for old in sorted(p for p in directory.glob("step-*") if p.is_dir())[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    runtime.barrier()
    return final


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint under `directory`, or None."""
    pointer = Path(directory) / LATEST
    if not pointer.is_file():
        return None
    path = Path(directory) / pointer.read_text().strip()
    if not (path / "state.pt").is_file():
        raise FileNotFoundError(f"{pointer} names {path.name}, which has no state.pt: the checkpoint folder is damaged")
    return path


def load_checkpoint(path: str | os.PathLike, runtime: Runtime) -> dict:
    """The saved state; also restores this process's RNG (a warning if the run had fewer processes)."""
    path = Path(path)
    state = torch.load(path / "state.pt", map_location=runtime.device, weights_only=True)
    rng_file = path / f"rng-{runtime.rank}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))
    else:
        logger.warning("%s has no RNG state for process %d: resuming with a fresh seed", path, runtime.rank)
    return state


def resume_or_start(
    directory: str | os.PathLike, runtime: Runtime, resume: bool, seed: int
) -> tuple[Path, dict] | None:
    """Resuming: the newest checkpoint's folder and state, RNG restored. Starting: None, after reseeding per process.

    A new run refuses a folder that already holds checkpoints: it would mix its checkpoints with the old run's.
    """
    path = latest_checkpoint(directory)
    if resume:
        if path is None:
            raise FileNotFoundError(f"resume: no checkpoint under {directory}")
        return path, load_checkpoint(path, runtime)
    if path is not None:
        raise FileExistsError(f"{directory} already holds checkpoints: resume, or pick another output_dir")
    torch.manual_seed(seed + runtime.rank)  # dropout differs per process; a resumed run restores its RNG instead
    return None
