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
from collections.abc import Callable
from pathlib import Path

import torch

from ..errors import MissingFileError
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
    directory: str | os.PathLike,
    step: int,
    state: dict,
    runtime: Runtime,
    keep: int = 2,
    write_extra: Callable[[Path], None] | None = None,
) -> Path:
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
        raise MissingFileError(f"{pointer} names {path.name}, which has no state.pt: the checkpoint folder is damaged")
    return path


class CheckpointError(ValueError):
    """A training checkpoint that cannot be resumed: a damaged file, or one written by another kind of run."""


def read_state(file: str | os.PathLike, map_location="cpu", weights_only: bool = True, mmap: bool = False) -> dict:
    """`torch.load` of a checkpoint file, with every way the file can be broken (empty, truncated, not a torch
    file) turned into one `CheckpointError` that names it."""
    file = Path(file)
    if not file.is_file():
        raise CheckpointError(f"checkpoint file missing: {file}")
    if file.stat().st_size == 0:
        raise CheckpointError(
            f"checkpoint file {file} is empty (a crash while writing?): delete its folder "
            f"{file.parent} to resume from an older checkpoint, or start a new --output"
        )
    try:
        state = torch.load(file, map_location=map_location, weights_only=weights_only, mmap=mmap)
    except Exception as err:  # torch raises RuntimeError, EOFError, UnpicklingError, zipfile errors... for bad files
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"checkpoint file {file} is damaged or not a freevlm checkpoint ({first}): delete "
            f"{file.parent} to resume from an older checkpoint, or start a new --output"
        ) from err
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint file {file} holds a {type(state).__name__}, not a training state")
    return state


def check_state(state: dict, kind: str, path: str | os.PathLike, parts: dict[str, tuple[str, ...]]) -> None:
    """Refuse a checkpoint that another kind of run wrote (e.g. `train-exits --resume` in a finetune run folder);
    `parts`: the keys of state.pt each kind writes (its objective's `PARTS`)."""
    missing = [k for k in parts[kind] if k not in state]
    if missing:
        made_by = [name for name, keys in parts.items() if all(k in state for k in keys)]
        by = f"it was written by `freevlm {made_by[0]}`" if made_by else f"it lacks {', '.join(missing)}"
        raise CheckpointError(f"checkpoint {path} cannot be resumed by `freevlm {kind}`: {by}")


def check_resumable(output_dir: str | os.PathLike, resume: bool, kind: str, parts: dict[str, tuple[str, ...]]) -> None:
    """Before any weights load: a new run needs a run folder without checkpoints; a resumed one needs a complete,
    readable checkpoint of its own kind there. (The file is memory-mapped, not read, so this is cheap.)"""
    directory = Path(output_dir) / "checkpoints"
    path = latest_checkpoint(directory)
    if not resume:
        if path is not None:
            raise CheckpointError(
                f"{output_dir} already holds checkpoints of another run: add --resume to "
                "continue it, or pick another --output"
            )
        return
    if path is None:
        raise CheckpointError(f"--resume: no checkpoint under {directory}")
    check_state(read_state(path / "state.pt", mmap=True), kind, path, parts)


def load_checkpoint(path: str | os.PathLike, runtime: Runtime) -> dict:
    """The saved state; also restores this process's RNG (a warning if the run had fewer processes)."""
    path = Path(path)
    state = read_state(path / "state.pt", map_location=runtime.device)
    rng_file = path / f"rng-{runtime.rank}.pt"
    if rng_file.is_file():
        set_rng_state(read_state(rng_file, weights_only=False))
    else:
        logger.warning("%s has no RNG state for process %d: resuming with a fresh seed", path, runtime.rank)
    return state


def resume_or_start(
    directory: str | os.PathLike, runtime: Runtime, resume: bool, seed: int
) -> tuple[Path, dict] | None:
    """Resuming: the newest checkpoint's folder and state, RNG restored. Starting: None, after reseeding per process.

    A new run refuses a folder that already holds checkpoints: it would mix its checkpoints with the old run's.
    A new run creates `directory` (and so the run folder above it) before the first step.
    """
    path = latest_checkpoint(directory)
    if resume:
        if path is None:
            raise MissingFileError(f"resume: no checkpoint under {directory}")
        return path, load_checkpoint(path, runtime)
    if path is not None:
        raise FileExistsError(f"{directory} already holds checkpoints: resume, or pick another output_dir")
    if runtime.is_main:  # the run folder exists from the start, so whatever the run writes at its end has a place
        Path(directory).mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed + runtime.rank)  # dropout differs per process; a resumed run restores its RNG instead
    return None
