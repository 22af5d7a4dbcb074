"""`EvalOptions`: how an evaluation decodes and scores its records, apart from the exit rule, in one object."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..decoding.config import DecodeConfig
from ..methods import get_method
from .captions import tokenize
from .likelihood import OPTION_BATCH_SIZE

BATCH_SIZE = 8  # records per batch, unless the caller says


@dataclass(frozen=True)
class EvalOptions:
    """How an evaluation decodes and scores its records, whatever the exit rule: one set for `evaluate`,
    `evaluate_many`, `sweep`, calibration and the command line, as `DecodeConfig` is one set for `generate`.

    `config`: the decode options (None: the task's, `DecodeConfig()` for captions, `ANSWER_DECODING` for answers);
    the exit rule is `method`'s (at each run's threshold, or a forced layer). `prompt`: None, the task's (VisDial
    builds its own). `compare_full`: the full model decoded beside, for agreement and wall-clock ratios;
    `timing_repeats` > 1 keeps each batch's fastest of that many runs per mode (`evaluate_many` has no clock).
    Scoring: `metric` (VQA; "exact" for GQA), `spice`, `only` and `tokenizer` (captions, see `caption_metrics`),
    `option_batch_size` (VisDial's options per teacher-forced pass)."""

    config: DecodeConfig | None = None
    method: str = "free"
    prompt: str | None = None
    batch_size: int = BATCH_SIZE
    compare_full: bool = True
    timing_repeats: int = 1
    progress_bar: bool = False
    metric: str = "vqa"
    spice: bool | None = None
    only: Sequence[str] | None = None
    tokenizer: Callable = tokenize
    option_batch_size: int = OPTION_BATCH_SIZE

    def __post_init__(self) -> None:
        get_method(self.method)  # a ValueError naming the known ones
        for name in ("batch_size", "timing_repeats", "option_batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")

    def scoring(self, task: str) -> dict:
        """The keywords of `task`'s scoring function (`evaluate.TASKS`)."""
        if task == "captions":
            return dict(spice=self.spice, only=self.only, tokenizer=self.tokenizer)
        return {"metric": self.metric} if task == "vqa" else {}
