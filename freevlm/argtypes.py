"""Argument types for the `freevlm` commands: every number, device and output path is checked when the command
line is parsed, before any file is read or any weights load, and refused with the valid range in the message.

argparse turns the `argparse.ArgumentTypeError` these raise into one line naming the option, and exit code 2:

    freevlm finetune: error: argument --lr: must be a finite number > 0, got 'inf'
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from pathlib import Path


def integer(low: int | None = None, high: int | None = None) -> Callable[[str], int]:
    """An int in [low, high] (either bound optional)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a whole number {_range(low, high)}, got {text!r}") from None
        if (low is not None and value < low) or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be a whole number {_range(low, high)}, got {text!r}")
        return value

    parse.__name__ = "integer"  # argparse names the type in its own messages
    return parse


def number(
    low: float | None = None, high: float | None = None, low_open: bool = False, high_open: bool = False
) -> Callable[[str], float]:
    """A finite float in the range from `low` to `high` (each bound optional, closed unless `*_open`)."""
    where = " " + _range(low, high, low_open, high_open) if low is not None or high is not None else ""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a finite number{where}, got {text!r}") from None
        bad = not math.isfinite(value)
        bad = bad or (low is not None and (value <= low if low_open else value < low))
        bad = bad or (high is not None and (value >= high if high_open else value > high))
        if bad:
            raise argparse.ArgumentTypeError(f"must be a finite number{where}, got {text!r}")
        return value

    parse.__name__ = "number"
    return parse


def _range(low, high, low_open: bool = False, high_open: bool = False) -> str:
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if low is not None:
        return f"{'>' if low_open else '>='} {low:g}"
    if high is not None:
        return f"{'<' if high_open else '<='} {high:g}"
    return ""


positive_int = integer(low=1)
nonnegative_int = integer(low=0)
positive_float = number(low=0, low_open=True)
nonnegative_float = number(low=0)
unit_interval = number(0, 1)  # probabilities, thresholds
fraction = number(0, 1, high_open=True)  # a share held out: 0 (none) up to, not including, everything
open_fraction = number(0, 1, low_open=True, high_open=True)
random_seed = integer(0, 2**64 - 1)  # what torch.manual_seed takes


def threshold_or_report(text: str) -> float | Path:
    """A threshold in [0, 1], or a `freevlm calibrate` report (a JSON file) whose certified threshold to use
    (`freevlm.calibration.reported_threshold` reads it once the model's folders are known)."""
    try:
        float(text)
    except ValueError:
        if Path(text).is_file():
            return Path(text)
        raise argparse.ArgumentTypeError(
            f"must be a number in [0, 1] or a `freevlm calibrate` report (a JSON file), got {text!r}"
        ) from None
    return unit_interval(text)


def device(text: str) -> str:
    """A torch device this machine has: cpu, cuda, cuda:N, mps."""
    import torch

    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"unknown device {text!r}: use cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(
                f"{text!r}: CUDA is not available (this PyTorch build or machine has no GPU)"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text!r}: there are only {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise argparse.ArgumentTypeError(f"{text!r}: MPS is not available on this machine")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise argparse.ArgumentTypeError(f"device {text!r} is not supported: use cpu, cuda, cuda:N or mps")
    return text


def input_path(text: str) -> str:
    """A file or folder the command reads (or, for calibration, writes): any text but an empty one, which would
    quietly mean the current folder."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must be a path, got an empty one")
    return text


def output_dir(text: str) -> str:
    """A folder to write into: may exist (as a folder) or not; an existing file, or a file on the way, is refused."""
    path = Path(_nonempty(text))
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is an existing file, not a folder")
    _check_parents(path, text)
    return text


def output_file(text: str) -> str:
    """A file to write: may exist (it is replaced) or not; a folder, or a file on the way, is refused."""
    path = Path(_nonempty(text))
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder: give the path of the file to write")
    _check_parents(path, text)
    return text


def _nonempty(text: str) -> str:
    """`text`, unless it is empty or a path the system cannot resolve (a symlink loop, a name too long)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must be a path, got an empty one")
    try:
        Path(text).resolve(strict=False).exists()
    except (OSError, RuntimeError) as err:  # RuntimeError: resolve()'s symlink loop before Python 3.13
        raise argparse.ArgumentTypeError(f"cannot write {text}: {getattr(err, 'strerror', None) or err}") from None
    return text


def _check_parents(path: Path, text: str) -> None:
    for parent in path.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise argparse.ArgumentTypeError(f"cannot write {text}: {parent} is a file, not a folder")
            return
