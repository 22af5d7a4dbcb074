"""Each row's token, from the logits of the layer it left at: greedy or sampled, as Hugging Face's `generate` picks
it (repetition penalty, then temperature, top-k, top-p; then argmax or a draw).

What the exit decision reads is not touched: a policy sees an exit's raw logits (the confidence policy: the max
softmax probability of the unprocessed distribution), so a threshold and its calibration mean what they mean under
greedy decoding, and temperature cannot make an exit more or less confident. The token is then chosen from the
processed distribution of the layer the row left at.

Settings are per row, as tensors, so one batch mixes greedy rows with rows sampling at their own temperature, top-k,
top-p and penalty without a Python loop per row. Temperature and top-p are Hugging Face's own per-request warpers
(those of its continuous batching, run on the rows that use them); top-k is its `TopKLogitsWarper` with a k per row
(its per-request version sorts the whole vocabulary: a `topk` up to the largest k does); the penalty is its
`RepetitionPenaltyLogitsProcessor` with a per-row penalty over a `[rows, vocab]` mask of the tokens each row has
seen (its prompt and what it generated). A batch with one setting (`generate`'s) runs Hugging Face's scalar
operations instead, so that it matches Hugging Face bit for bit on every device. `tests/test_sampling.py` holds
each to Hugging Face's, row by row.

The draw: for one sample, `torch.multinomial(probs, 1)` is `argmax(probs / q)` with `q = empty_like(probs)
.exponential_()` (PyTorch's fast path: the exponential race, Gumbel-max in another form). Drawing `q` here lets a
batch draw it from one generator, exactly as Hugging Face's `generate` does (so a seeded sample equals
`model.generate(do_sample=True)` after `torch.manual_seed(seed)`), or each row from its own generator (one call per
generator: the scheduler's per-request seeds, so a request samples the same tokens whatever else is in the batch).
"""

from __future__ import annotations

import torch
from transformers.generation.continuous_batching.cb_logits_processors import (
    ContinuousBatchingTemperatureLogitsWarper,
    ContinuousBatchingTopPLogitsWarper,
)
from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

from .config import DecodeConfig

# Hugging Face's per-request warpers read their settings from the rows of one tensor (floats viewed as int32)
TEMPERATURE = ContinuousBatchingTemperatureLogitsWarper(TemperatureLogitsWarper(1.0))
TOP_P = ContinuousBatchingTopPLogitsWarper(TopPLogitsWarper(0.5))


def make_generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    """A generator seeded with `seed` on `device`; None (torch's global generator) without a seed."""
    return None if seed is None else torch.Generator(device).manual_seed(seed)


class TokenChooser:
    """How each of `rows` rows chooses its token (`set` per request), and the tokens each row has seen.

    `per_row_generators=False`: the batch draws from one generator, one `[rows, vocab]` noise tensor per step, as
    Hugging Face does (`generate`); True: each row from its own (the scheduler).
    """

    def __init__(self, rows: int, vocab: int, device: torch.device, per_row_generators: bool = False):
        self.rows, self.vocab, self.device, self.per_row = rows, vocab, device, per_row_generators
        self.temperature = torch.ones(rows, device=device)
        self.top_k = torch.full((rows,), vocab, dtype=torch.long, device=device)  # the whole vocabulary: off
        self.top_k_host = [vocab] * rows
        self.top_p = torch.ones(rows, device=device)
        self.penalty = torch.ones(rows, device=device)
        self.sampling = torch.zeros(rows, dtype=torch.bool, device=device)
        self.seen: torch.Tensor | None = None  # [rows, vocab] bool, made when a row first has a penalty
        # on the host, per row: which steps of the choice it needs (a step no row needs is skipped)
        self.uses = {name: [False] * rows for name in ("penalty", "sample", "temperature", "top_k", "top_p")}
        self.generators: list[torch.Generator | None] = [None] * rows
        self.shared: DecodeConfig | None = None  # the batch's one setting (without per-row generators)

    def set(
        self,
        rows: list[int],
        config: DecodeConfig,
        prompt_ids: torch.Tensor | None,
        prompt_mask: torch.Tensor | None,
        generator: torch.Generator | None,
    ) -> None:
        """Rows `rows` choose as `config` says from now on; `prompt_ids [len(rows), L]` are the tokens they start
        from (`prompt_mask`: which are real, not padding), which the repetition penalty counts as seen."""
        sample = config.do_sample
        uses = {
            "penalty": config.repetition_penalty != 1.0,
            "sample": sample,
            "temperature": sample and config.temperature != 1.0,
            "top_k": sample and config.top_k > 0,
            "top_p": sample and config.top_p < 1.0,
        }
        top_k = min(config.top_k, self.vocab) if uses["top_k"] else self.vocab
        for r in rows:
            for name, on in uses.items():
                self.uses[name][r] = on
            self.top_k_host[r], self.generators[r] = top_k, generator
        index = torch.tensor(rows, device=self.device)
        self.sampling[index] = sample
        self.temperature[index] = config.temperature if uses["temperature"] else 1.0
        self.top_k[index] = top_k
        self.top_p[index] = config.top_p if uses["top_p"] else 1.0
        self.penalty[index] = config.repetition_penalty
        if not self.per_row:
            self.shared = config
        if uses["penalty"]:
            if self.seen is None:
                self.seen = torch.zeros(self.rows, self.vocab, dtype=torch.bool, device=self.device)
            # ids beyond the head's vocabulary (and padding) land in an extra column that is dropped
            ids = prompt_ids.clamp(max=self.vocab).masked_fill(~prompt_mask.bool(), self.vocab)
            seen = torch.zeros(len(rows), self.vocab + 1, dtype=torch.bool, device=self.device)
            self.seen[index] = seen.scatter_(1, ids, True)[:, : self.vocab]

    def clear(self, row: int) -> None:
        """Row `row` holds no request: greedy, no draws."""
        self.set([row], DecodeConfig(), None, None, None)

    @staticmethod
    def needed(config: DecodeConfig) -> bool:
        """Whether `config` chooses other than by the raw logits' argmax."""
        return config.do_sample or config.repetition_penalty != 1.0

    def choose(self, logits: torch.Tensor, rows: torch.Tensor, rows_host: list[int] | None = None) -> torch.Tensor:
        """Token `[n]` of each of `rows` from its logits `[n, V]` (`rows_host`: the same rows on the host; None:
        read from `rows`). Greedy rows without a penalty get exactly `logits.argmax(-1)`."""
        rows_host = self._host(rows, rows_host)
        need = self._needs(rows_host)
        if not need["penalty"] and not need["sample"]:
            return logits.argmax(dim=-1)
        scores = self.process(logits, rows, rows_host)
        if not need["sample"]:
            return scores.argmax(dim=-1)
        drawn = (scores.softmax(dim=-1) / self._noise(scores, rows, rows_host)).argmax(dim=-1)
        return torch.where(self.sampling[rows], drawn, scores.argmax(dim=-1))

    def process(self, logits: torch.Tensor, rows: torch.Tensor, rows_host: list[int] | None = None) -> torch.Tensor:
        """The float32 scores `[n, V]` each of `rows` chooses from: Hugging Face's processors in its order."""
        rows_host = self._host(rows, rows_host)
        need = self._needs(rows_host)
        # one setting for the batch: Hugging Face's scalar operations, bit for bit on every device (a CUDA division
        # by a Python number multiplies by its reciprocal; top-p's 1 - p is computed in double)
        shared = self.shared
        scores = logits.float()  # Hugging Face processes a float32 copy
        if need["penalty"]:
            penalty = self.penalty[rows, None] if shared is None else float(shared.repetition_penalty)
            penalised = torch.where(scores < 0, scores * penalty, scores / penalty)
            scores = torch.where(self.seen[rows], penalised, scores)
        if need["temperature"] and shared is None:
            scores = TEMPERATURE(scores, self.temperature[rows].view(torch.int32))
        elif need["temperature"]:
            scores = TemperatureLogitsWarper(float(shared.temperature))(None, scores)
        if need["top_k"]:
            scores = self._on_rows("top_k", scores, rows, rows_host, self._top_k)
        if need["top_p"] and shared is None:
            top_p = lambda s, r: TOP_P(s, self.top_p[r].view(torch.int32))  # noqa: E731
            scores = self._on_rows("top_p", scores, rows, rows_host, top_p)
        elif need["top_p"]:
            scores = TopPLogitsWarper(shared.top_p)(None, scores)
        return scores

    def _on_rows(self, name: str, scores: torch.Tensor, rows: torch.Tensor, rows_host: list[int] | None, warp):
        """`warp(scores, rows)` on the rows that use `name` only: a sort of the vocabulary costs milliseconds per
        row on a CPU, and rows without top-p must keep even the tokens whose probability rounds to 0."""
        if rows_host is None or all(self.uses[name][r] for r in rows_host):
            return warp(scores, rows)
        at = torch.tensor([i for i, r in enumerate(rows_host) if self.uses[name][r]], device=scores.device)
        return scores.index_copy(0, at, warp(scores[at], rows[at]))

    def _top_k(self, scores: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Hugging Face's `TopKLogitsWarper` with a k per row: scores below the row's k-th largest become -inf (one
        `topk` up to the largest k of the batch, not a sort of the vocabulary)."""
        largest = max(self.top_k_host[r] for r in range(self.rows) if self.uses["top_k"][r])
        kth = torch.topk(scores, largest, dim=-1).values.gather(1, self.top_k[rows, None] - 1)
        return scores.masked_fill(scores < kth, -float("inf"))

    def _host(self, rows: torch.Tensor, rows_host: list[int] | None) -> list[int] | None:
        """The rows on the host where their settings may differ (None in a batch that shares one setting)."""
        return rows.tolist() if rows_host is None and self.per_row else rows_host

    def _needs(self, rows_host: list[int] | None) -> dict[str, bool]:
        """Which steps of the choice some of the rows need (the others are skipped)."""
        if rows_host is None:
            return {name: any(on) for name, on in self.uses.items()}
        return {name: any(on[r] for r in rows_host) for name, on in self.uses.items()}

    def _noise(self, scores: torch.Tensor, rows: torch.Tensor, rows_host: list[int] | None) -> torch.Tensor:
        """The exponential noise `q` of `torch.multinomial(probs, 1) = argmax(probs / q)` (see the module
        docstring): the batch's from one generator, or each sampling row's from its own (greedy rows: ones)."""
        if not self.per_row:
            noise = torch.empty(self.rows, scores.shape[-1], dtype=scores.dtype, device=scores.device)
            return noise.exponential_(generator=self.generators[0])[rows]
        noise = torch.ones_like(scores)
        for i, r in enumerate(rows_host):
            if self.uses["sample"][r]:
                noise[i].exponential_(generator=self.generators[r])
        return noise

    def observe(self, rows: torch.Tensor, tokens: torch.Tensor) -> None:
        """`rows` produced `tokens`: the penalty counts them as seen."""
        if self.seen is not None:
            self.seen[rows, tokens] = True
