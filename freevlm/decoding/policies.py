"""Exit policies: at each exit a token reaches, decide whether it leaves there.

The engine asks a policy which exits it may consult (`live_exits`: only those exit layers are run and kept
cached), then, exit by exit, whether each row's token leaves. A policy that needs the exit's vocabulary logits says
so (`needs_logits`); otherwise the engine skips the head until a token actually leaves.
"""

from __future__ import annotations

import torch


class ExitPolicy:
    """Never leaves early: every token goes through all LM layers."""

    def live_exits(self, exit_layers: list[int]) -> list[int]:
        return []

    def validate(self, exit_layers: list[int], num_layers: int) -> None:
        """Raise a clear error if this policy cannot work with these exits."""

    def needs_logits(self, layer: int) -> bool:
        return False

    def decide(
        self, layer: int, logits: torch.Tensor | None, step: int, rows: torch.Tensor, hidden: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Bool `[n]`: which of `rows` (batch row ids) leave at exit `layer` for generation step `step`.

        `logits` `[n, V]` are the exit's (None unless `needs_logits`); `hidden` `[n, H]` is the LM state the exit
        read (h_layer of the current token), for policies that compare states across layers.
        """
        return torch.zeros(len(rows), dtype=torch.bool, device=rows.device)


class ConfidencePolicy(ExitPolicy):
    """FREE / DeeBERT: leave at the first exit whose max softmax probability is >= threshold.

    Threshold 1.0 never leaves early (exits are not even run), even where a probability rounds to 1.0.
    """

    def __init__(self, threshold: float):
        self.threshold = validate_threshold(threshold)

    def live_exits(self, exit_layers):
        return [] if self.threshold >= 1.0 else list(exit_layers)

    def needs_logits(self, layer):
        return True

    def decide(self, layer, logits, step, rows, hidden=None):
        return max_probability(logits) >= self.threshold


class FixedSchedulePolicy(ExitPolicy):
    """Every token leaves at a layer given in advance: one layer for all steps, or one per step (cycled).

    For benchmarks and the per-layer quality curve (force every token out at each exit in turn). A layer equal to
    the LM depth means the final layer.
    """

    def __init__(self, layers: int | list[int]):
        self.schedule = [layers] if isinstance(layers, int) else list(layers)
        if not self.schedule:
            raise ValueError("FixedSchedulePolicy needs at least one layer")

    def validate(self, exit_layers: list[int], num_layers: int) -> None:
        unknown = sorted({x for x in self.schedule if x not in exit_layers and x != num_layers})
        if unknown:
            raise ValueError(f"forced exit layers {unknown} have no exit (exits: {exit_layers}, final: {num_layers})")

    def live_exits(self, exit_layers):
        return [i for i in exit_layers if i in self.schedule]

    def decide(self, layer, logits, step, rows, hidden=None):
        target = self.schedule[step % len(self.schedule)]
        return torch.full((len(rows),), layer == target, dtype=torch.bool, device=rows.device)


class Copies(ExitPolicy):
    """One batch of B rows decoded once per policy, side by side: copy g (rows g*B .. (g+1)*B - 1) leaves where
    `policies[g]` says, which sees its rows numbered 0..B-1 and is asked only at its own live exits, as it would be
    alone. Given this policy, `generate` encodes image and prompt once for every copy (a threshold sweep's shared
    work) and returns the copies' rows one after another."""

    def __init__(self, policies: list[ExitPolicy]):
        if not policies or not all(isinstance(p, ExitPolicy) for p in policies):
            raise ValueError(f"Copies needs a list of ExitPolicy, got {policies!r}")
        self.policies = list(policies)
        self.rows_per_copy = 1  # B, set when a request starts
        self._live: list[set[int]] = [set() for _ in self.policies]

    def validate(self, exit_layers: list[int], num_layers: int) -> None:
        for policy in self.policies:
            policy.validate(exit_layers, num_layers)

    def live_exits(self, exit_layers):
        self._live = [set(p.live_exits(exit_layers)) for p in self.policies]
        return sorted(set().union(*self._live))

    def needs_logits(self, layer):
        return any(layer in live and p.needs_logits(layer) for p, live in zip(self.policies, self._live))

    def decide(self, layer, logits, step, rows, hidden=None):
        leave = torch.zeros(len(rows), dtype=torch.bool, device=rows.device)
        copy = rows // self.rows_per_copy
        for g, (policy, live) in enumerate(zip(self.policies, self._live)):
            mine = (copy == g).nonzero().squeeze(1) if layer in live else None
            if mine is None or not len(mine):
                continue
            own_logits = None if logits is None else logits[mine]
            own_hidden = None if hidden is None else hidden[mine]
            own_rows = rows[mine] - g * self.rows_per_copy
            leave[mine] = policy.decide(layer, own_logits, step, own_rows, own_hidden)
        return leave


def max_probability(logits: torch.Tensor) -> torch.Tensor:
    """max softmax probability per row, without materialising the softmax: 1 / sum(exp(l - max l)).

    Five operations, in place where they can be (a decision is paid at every exit a token passes); the values are
    bitwise those of `1.0 / torch.exp(logits - logits.max(-1, keepdim=True).values).sum(-1)`."""
    logits = logits.float()
    return (logits - logits.amax(dim=-1, keepdim=True)).exp_().sum(dim=-1).reciprocal_()


def validate_threshold(threshold: float) -> float:
    if not isinstance(threshold, (int, float)) or isinstance(threshold, bool) or not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be a number in [0, 1], got {threshold!r}")
    return float(threshold)
