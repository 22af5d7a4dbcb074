"""Exit rules of the early-exit baselines FREE is compared with: DeeBERT's entropy, PABEE's patience, MuE's
hidden-state similarity (DeeBLIP and LeeBLIP also use `ConfidencePolicy`).

Patience and similarity compare a token's exits with each other, so they keep state per batch row within one
generation step. The state is held in tensors indexed by row id (no host sync per exit) and a row's state counts
as stale when the step changed or the exit is not deeper than the last one it saw, so one policy object can
serve several `generate` calls.
"""

from __future__ import annotations

import torch

from .policies import ExitPolicy, validate_threshold


class EntropyPolicy(ExitPolicy):
    """DeeBERT: leave at the first exit whose predictive entropy (nats) is below `threshold`.

    Threshold 0 never leaves early (an entropy is never negative); larger thresholds leave earlier.
    """

    def __init__(self, threshold: float):
        if not isinstance(threshold, (int, float)) or isinstance(threshold, bool) or not threshold >= 0.0:
            raise ValueError(f"entropy threshold must be a number >= 0 (nats), got {threshold!r}")
        self.threshold = float(threshold)

    def live_exits(self, exit_layers):
        return list(exit_layers) if self.threshold > 0.0 else []

    def needs_logits(self, layer):
        return True

    def decide(self, layer, logits, step, rows, hidden=None):
        return entropy(logits) < self.threshold


class _RowState:
    """Per-row (step, last exit layer) bookkeeping shared by the stateful policies."""

    def __init__(self):
        self.step = torch.empty(0, dtype=torch.long)
        self.layer = torch.empty(0, dtype=torch.long)
        self.sized_at = (-1, 0)  # (step, exit layer) of the last size check

    def ensure(
        self, rows: torch.Tensor, step: int, layer: int, extra: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Grow the row-indexed tensors (this and `extra`'s) to cover `rows`; returns `extra` grown.

        Checked at a token's first exit only (it sees every row the step will see): one host sync a step at most.
        """
        if (step == self.sized_at[0] and layer > self.sized_at[1]) or not len(rows):
            return extra
        self.sized_at = (step, layer)
        need = int(rows.max()) + 1
        if self.step.device != rows.device:
            self.step, self.layer = self.step.to(rows.device), self.layer.to(rows.device)
        if need > len(self.step):
            grow = need - len(self.step)
            self.step = torch.cat([self.step, self.step.new_full((grow,), -1)])
            self.layer = torch.cat([self.layer, self.layer.new_full((grow,), -1)])
            extra = {k: torch.cat([v, v.new_zeros((grow, *v.shape[1:]))]) for k, v in extra.items()}
        return extra

    def fresh(self, rows: torch.Tensor, layer: int, step: int) -> torch.Tensor:
        """Bool `[n]`: rows with no earlier exit in this step (their stored state belongs to another token)."""
        return (self.step[rows] != step) | (self.layer[rows] >= layer)

    def mark(self, rows: torch.Tensor, layer: int, step: int) -> None:
        self.step[rows] = step
        self.layer[rows] = layer


class PatiencePolicy(ExitPolicy):
    """PABEE: leave once the predicted token has stayed the same for `patience` consecutive exits.

    Patience 1 leaves at the first exit; patience 2 leaves exactly when two consecutive exits agree. (PABEE's
    patience t counts agreements between consecutive classifiers: t = patience - 1.) A token that never builds
    that run goes to the final layer.
    """

    def __init__(self, patience: int):
        if not isinstance(patience, int) or isinstance(patience, bool) or patience < 1:
            raise ValueError(f"patience must be a positive integer, got {patience!r}")
        self.patience = patience
        self._rows = _RowState()
        self._token = torch.empty(0, dtype=torch.long)
        self._run = torch.empty(0, dtype=torch.long)

    def live_exits(self, exit_layers):
        return list(exit_layers) if self.patience <= len(exit_layers) else []  # else no run can be long enough

    def needs_logits(self, layer):
        return True

    def decide(self, layer, logits, step, rows, hidden=None):
        grown = self._rows.ensure(
            rows, step, layer, {"token": self._token.to(rows.device), "run": self._run.to(rows.device)}
        )
        self._token, self._run = grown["token"], grown["run"]
        token = logits.argmax(dim=-1)
        same = ~self._rows.fresh(rows, layer, step) & (self._token[rows] == token)
        run = torch.where(same, self._run[rows] + 1, torch.ones_like(token))
        self._token[rows], self._run[rows] = token, run
        self._rows.mark(rows, layer, step)
        return run >= self.patience


class SimilarityPolicy(ExitPolicy):
    """MuE: leave when the cosine similarity between this exit's LM state and the previous exit's state (same
    token, same step) reaches `threshold`: the representation has saturated. The token then comes from that
    exit's state through the frozen final head (a `HeadExit`). The first exit has nothing to compare with.

    Threshold 1.0 never leaves early.
    """

    def __init__(self, threshold: float):
        self.threshold = validate_threshold(threshold)
        self._rows = _RowState()
        self._hidden = torch.empty(0, 0)

    def live_exits(self, exit_layers):
        return list(exit_layers) if self.threshold < 1.0 and len(exit_layers) > 1 else []

    def decide(self, layer, logits, step, rows, hidden=None):
        if hidden is None:
            raise ValueError("SimilarityPolicy needs the exit's hidden state")
        state = hidden.float()
        if self._hidden.shape[-1] != state.shape[-1] or self._hidden.device != state.device:
            self._hidden = state.new_zeros((len(self._rows.step), state.shape[-1]))
        self._hidden = self._rows.ensure(rows, step, layer, {"h": self._hidden})["h"]
        sim = torch.nn.functional.cosine_similarity(state, self._hidden[rows], dim=-1)
        leave = ~self._rows.fresh(rows, layer, step) & (sim >= self.threshold)
        self._hidden[rows] = state
        self._rows.mark(rows, layer, step)
        return leave


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) of softmax(logits) per row."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(dim=-1)
