"""Speed of early exits on a dataset, always as a ratio against the full model measured in the same run.

Each batch is decoded twice, early-exit and full (`mode="full"`), in alternating order (full first on even
batches, early-exit first on odd ones) so clock drift, thermal throttling and cache warm-up fall on both sides.
Reported: the paper's analytic speedup over all tokens, mean layers per token, the exit-layer histogram, the
ratio of parameters actually touched, and measured wall-clock speedups end to end and per decode step.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from ..decoding.generate import GenerateOutput, analytic_speedup


@dataclass
class SpeedReport:
    num_layers: int
    tokens: int  # generated tokens, EOS included
    exit_histogram: dict[int, int]  # LM layer -> tokens that left there (num_layers = final layer)
    mean_layers_per_token: float  # mean exit layer (num_layers for the final layer), as DecodeStats reports it
    analytic_speedup: float  # the paper's: N / mean layers used (an exit layer counts as one)
    seconds: dict[str, float]  # early exit: total / prefill / decode
    full_seconds: dict[str, float] | None = None  # the full model on the same inputs, same run
    ideal_speedup: float | None = None  # parameters touched by the full model / by early exit (engine counters)
    wallclock_speedup: float | None = None  # full seconds_total / early-exit seconds_total
    decode_speedup: float | None = None  # per decode step (lengths may differ): full s/step over early-exit s/step
    full_tokens: int | None = None
    batches: int = 0

    def as_dict(self) -> dict:
        out = dict(self.__dict__)
        out["exit_histogram"] = {str(k): v for k, v in self.exit_histogram.items()}
        return out


@dataclass
class SpeedMeter:
    """Accumulates paired (early-exit, full) `generate` outputs batch by batch."""

    num_layers: int
    exits: list[int] = field(default_factory=list)
    full_tokens: int = 0
    seconds: Counter = field(default_factory=Counter)
    full_seconds: Counter = field(default_factory=Counter)
    decode_steps: int = 0
    full_decode_steps: int = 0
    params: int = 0
    full_params: int = 0
    batches: int = 0
    paired: bool = True

    def add(self, out: GenerateOutput, full: GenerateOutput | None = None) -> None:
        self.batches += 1
        self.exits += [int(e) for e in out.exit_layers.flatten().tolist() if e >= 0]
        s = out.stats
        self.seconds.update(total=s.seconds_total, prefill=s.seconds_prefill, decode=s.seconds_decode)
        self.decode_steps += max(s.steps - 1, 0)
        self.params += s.work.params_touched
        if full is None:
            self.paired = False
            return
        f = full.stats
        self.full_tokens += int((full.exit_layers >= 0).sum())
        self.full_seconds.update(total=f.seconds_total, prefill=f.seconds_prefill, decode=f.seconds_decode)
        self.full_decode_steps += max(f.steps - 1, 0)
        self.full_params += f.work.params_touched

    def recount(
        self, exit_layers: list[list[int]], full_tokens: int, params: int | None = None, full_params: int | None = None
    ) -> None:
        """Count tokens (and, given, parameters touched) over every record (`exit_layers` per record; those other
        processes decoded or a resumed run had) rather than the batches timed here: the clocks stay this process's."""
        self.exits = [e for row in exit_layers for e in row]
        self.full_tokens = full_tokens
        if params is not None:
            self.params, self.full_params = params, full_params

    def report(self) -> SpeedReport:
        n = self.num_layers
        report = SpeedReport(
            num_layers=n,
            tokens=len(self.exits),
            exit_histogram=dict(sorted(Counter(self.exits).items())),
            mean_layers_per_token=sum(self.exits) / max(len(self.exits), 1),
            analytic_speedup=analytic_speedup(self.exits, n),
            seconds=dict(self.seconds),
            batches=self.batches,
        )
        if self.paired and self.full_params:  # counts: every record's after `recount`, a resumed run's included
            report.full_tokens = self.full_tokens
            report.ideal_speedup = _ratio(self.full_params, self.params)
        if self.paired and self.batches:  # clocks: the batches decoded here
            report.full_seconds = dict(self.full_seconds)
            report.wallclock_speedup = _ratio(self.full_seconds["total"], self.seconds["total"])
            per_step = _ratio(self.seconds["decode"], self.decode_steps)
            full_per_step = _ratio(self.full_seconds["decode"], self.full_decode_steps)
            report.decode_speedup = _ratio(full_per_step, per_step) if per_step and full_per_step else None
        return report


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None
