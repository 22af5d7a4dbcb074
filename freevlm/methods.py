"""The early-exit methods freevlm compares on one backbone: FREE and the baselines of its paper.

A method = the kind of exit it attaches (trained by its objective in `freevlm.training`) and the rule that
decides where a token leaves. Its sweep "threshold" is that rule's knob (confidence, entropy in nats, patience,
cosine similarity); each method's default grid ends at the value that never leaves early, so every curve reaches
the full model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from .decoding.baseline_policies import EntropyPolicy, PatiencePolicy, SimilarityPolicy
from .decoding.policies import ConfidencePolicy, ExitPolicy, FixedSchedulePolicy

CONFIDENCE_GRID = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)  # the paper's grid


@dataclass(frozen=True)
class Method:
    name: str
    exit_kind: str  # ExitConfig.kind
    rule: str  # what the sweep threshold means
    make_policy: Callable[[float], ExitPolicy]
    thresholds: tuple[float, ...]

    def policy(self, threshold: float) -> ExitPolicy:
        return self.make_policy(threshold)


def _patience(value: float) -> ExitPolicy:
    if float(value) != int(value):
        raise ValueError(f"PABEE's threshold is a patience (a whole number of exits), got {value!r}")
    return PatiencePolicy(int(value))


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("free", "layer", "max probability >=", ConfidencePolicy, CONFIDENCE_GRID),
        Method("deeblip", "linear", "max probability >=", ConfidencePolicy, CONFIDENCE_GRID),
        Method("deeblip_entropy", "linear", "entropy (nats) <", EntropyPolicy, (3.0, 2.0, 1.0, 0.5, 0.25, 0.0)),
        Method("pabee", "linear", "patience (exits agreeing)", _patience, (1, 2, 3, 4, 5, 6, 1000)),
        Method("leeblip", "linear", "max probability >=", ConfidencePolicy, CONFIDENCE_GRID),
        Method("mue", "head", "cosine similarity >=", SimilarityPolicy, (0.8, 0.9, 0.95, 0.98, 0.99, 1.0)),
    )
}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}, expected one of {sorted(METHODS)}")
    return METHODS[name]


def exit_rule(method: str, threshold: float, layer: int | None = None) -> ExitPolicy:
    """`method`'s exit rule at `threshold`, or, with `layer`, every token out at that exit (the per-layer curve)."""
    return FixedSchedulePolicy(layer) if layer is not None else get_method(method).policy(threshold)


def trainable_parameters(modules: nn.Module | list[nn.Module]) -> int:
    """Parameters a method trains: those of `modules` that require gradients (shared tensors counted once)."""
    modules = modules if isinstance(modules, list) else [modules]
    seen: dict[int, int] = {}
    for m in modules:
        for p in m.parameters():
            if p.requires_grad:
                seen[id(p)] = p.numel()
    return sum(seen.values())
