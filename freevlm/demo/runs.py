"""How the demo decodes a split: batched quality runs on every request, and timed runs at batch 1 on the first
`timing_images` requests with the full model decoding the same request alternately (latency per request is what
exits buy; in a batch a step runs every layer as soon as one row needs it). Every speed in the report is measured
that one way (`Runner.quality_and_speed`)."""

from __future__ import annotations

from dataclasses import dataclass

from ..decoding.config import DecodeConfig
from ..eval.evaluate import EvalResult, evaluate_captioning, evaluate_vqa
from ..eval.speed import SpeedReport
from ..eval.sweep import choose_threshold
from ..loading import VLMBundle
from ..methods import get_method
from ..model import EarlyExitVLM
from . import stats
from .config import DemoConfig
from .progress import Progress

# runs that need one number, scored without Java (the same tokens as PTB's on shapes captions: tests/test_shapes.py)
CIDER_ONLY = {"only": ["CIDEr"], "spice": False, "tokenizer": stats.tokenize}


@dataclass
class Speed:
    """An early-exit run against the full model (`SpeedReport`'s names): batch 1, on the timed requests."""

    analytic_speedup: float  # the paper's: N / mean layers per token, an exit layer counting as one
    ideal_speedup: float | None  # parameters the full model touched / those early exit touched (exits, catch-up)
    decode_speedup: float | None  # measured: full seconds per decode step / early exit's
    wallclock_speedup: float | None  # measured end to end, prefill included
    mean_layers_per_token: float
    exit_histogram: dict[str, int]  # layer -> tokens that left there

    @classmethod
    def of(cls, s: SpeedReport) -> Speed:
        histogram = {str(k): v for k, v in s.exit_histogram.items()}
        speedups = (s.analytic_speedup, s.ideal_speedup, s.decode_speedup, s.wallclock_speedup)
        return cls(*speedups, s.mean_layers_per_token, histogram)


@dataclass
class Runner:
    """Decodes and scores splits with the demo's settings, each run under a progress bar named for it."""

    bundle: VLMBundle
    cfg: DemoConfig
    progress: Progress
    num_layers: int

    @property
    def decoding(self) -> DecodeConfig:
        return DecodeConfig(max_new_tokens=self.cfg.max_new_tokens)

    @property
    def fast(self) -> dict:
        """Batched quality runs (no full-model twin: batch rows cannot be timed one by one)."""
        return {"batch_size": self.cfg.eval_batch, "config": self.decoding, "compare_full": False}

    @property
    def cider(self) -> dict:
        """Batched runs that need one number."""
        return self.fast | CIDER_ONLY

    @property
    def timing(self) -> dict:
        """Timed runs: batch 1, early exit and full model alternating (pass the first `timing_images` records)."""
        return {"batch_size": 1, "config": self.decoding, "timing_repeats": self.cfg.timing_repeats}

    def captions(self, name: str, ee: EarlyExitVLM, records, *args, **kwargs) -> EvalResult:
        with self.progress.ticking(self.bundle, name, len(records)) as processor:
            return evaluate_captioning(ee, processor, records, *args, **kwargs)

    def vqa(self, name: str, ee: EarlyExitVLM, records, *args, **kwargs) -> EvalResult:
        with self.progress.ticking(self.bundle, name, len(records)) as processor:
            return evaluate_vqa(ee, processor, records, *args, **kwargs)

    def full(self, name: str, ee: EarlyExitVLM, records) -> EvalResult:
        """The full model's captions (every token at the final layer), every metric scored."""
        return self.captions(f"{name} full model", ee, records, layer=self.num_layers, **self.fast)

    def quality_and_speed(
        self, split: str, ee: EarlyExitVLM, records, threshold: float, method: str = "free", all_metrics: bool = False
    ) -> tuple[EvalResult, EvalResult]:
        """(quality on every record, batched; speed at batch 1): the one protocol of every table. Only the main
        table scores every metric: METEOR's Java scorer costs more than decoding a small split."""
        quality = self.fast if all_metrics else self.cider
        run = self.captions(f"{split} {method}", ee, records, threshold, method=method, **quality)
        timed_records = records[: self.cfg.timing_images]
        name = f"{split} {method} vs full, batch 1"
        timed = self.captions(name, ee, timed_records, threshold, method=method, **CIDER_ONLY, **self.timing)
        return run, timed

    def choose_threshold(self, ee: EarlyExitVLM, dev, method: str = "free") -> tuple[float, list[EvalResult]]:
        """The best mean dev CIDEr over the method's grid (FREE's: `cfg.thresholds`), and every run of the grid."""
        grid = self.cfg.thresholds if method == "free" else get_method(method).thresholds
        runs = [self.captions(f"dev {method} threshold {t:g}", ee, dev, t, method=method, **self.cider) for t in grid]
        return choose_threshold(runs), runs
