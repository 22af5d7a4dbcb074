"""`DecodeConfig`: every option of `EarlyExitVLM.generate` and its default, in one dataclass checked once, like
Hugging Face's `GenerationConfig`. Searches read what they need from the config, so an option cannot get lost on
the way; whatever else reads a decode default (evaluation, the command line) reads it here."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from .engine import BATCH_POLICIES, KV_MODES
from .policies import ExitPolicy, validate_threshold

MODES = ("full", "early_exit", "speculative")


@dataclass
class DecodeConfig:
    """How to decode (see `EarlyExitVLM.generate` for what each option does).

    `eos_token_id` / `pad_token_id` may be None (the model's generation config decides); searches get them
    resolved: `eos_token_id` a list, `pad_token_id` an int. `static` (None: the engine decides from the device)
    selects the engine's static-shape path.

    Token choice (`decoding/sampling.py`), as Hugging Face's `generate`: `repetition_penalty` applies to greedy and
    sampled tokens; `temperature`, `top_k` (0: off) and `top_p` shape the distribution `do_sample=True` draws from
    (greedy takes its argmax, which none of them moves); `seed` seeds the draw (None: torch's global generator).
    Unlike Hugging Face's `GenerationConfig`, `top_k` defaults to 0 (off), as OpenAI's API and vLLM do.
    """

    max_new_tokens: int = 30
    num_beams: int = 1
    threshold: float = 0.8
    mode: str = "early_exit"
    kv: str = "recompute"
    policy: ExitPolicy | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    batch_policy: str = "auto"
    max_draft: int = 6
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    return_engine: bool = False
    static: bool | None = None
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None

    def validate(self) -> None:
        """Raise a `ValueError` naming the first bad option and what it may be."""
        for name in ("max_new_tokens", "num_beams", "max_draft"):
            _check_positive_int(name, getattr(self, name))
        validate_threshold(self.threshold)
        _check_choice("mode", self.mode, MODES)
        _check_choice("kv", self.kv, KV_MODES)
        _check_choice("batch_policy", self.batch_policy, BATCH_POLICIES)
        if self.policy is not None and not isinstance(self.policy, ExitPolicy):
            raise ValueError(f"policy must be an ExitPolicy (freevlm.decoding.policies) or None, got {self.policy!r}")
        eos = [self.eos_token_id] if isinstance(self.eos_token_id, int) else self.eos_token_id
        if eos is not None and not (isinstance(eos, (list, tuple)) and all(_is_int(t) and t >= 0 for t in eos)):
            raise ValueError(f"eos_token_id must be a token id, a list of them, or None, got {self.eos_token_id!r}")
        if self.pad_token_id is not None and not (_is_int(self.pad_token_id) and self.pad_token_id >= 0):
            raise ValueError(f"pad_token_id must be a token id or None, got {self.pad_token_id!r}")
        _check_number("length_penalty", self.length_penalty, "that is finite", lambda v: True)  # NaN: beams at random
        _check_choice("early_stopping", self.early_stopping, (True, False, "never"))
        _check_choice("return_engine", self.return_engine, (True, False))
        _check_choice("static", self.static, (True, False, None))
        self._validate_sampling()
        if self.mode == "speculative":
            self._validate_speculative()

    def _validate_sampling(self) -> None:
        _check_choice("do_sample", self.do_sample, (True, False))
        _check_number("temperature", self.temperature, "> 0", lambda v: v > 0)
        _check_number("top_p", self.top_p, "in (0, 1]", lambda v: 0 < v <= 1)
        if not _is_int(self.top_k) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0: off), got {self.top_k!r}")
        _check_number("repetition_penalty", self.repetition_penalty, "> 0", lambda v: v > 0)
        if self.seed is not None and not (_is_int(self.seed) and 0 <= self.seed < 2**64):
            raise ValueError(f"seed must be an integer in [0, 2**64) or None, got {self.seed!r}")
        if self.num_beams > 1 or self.mode == "speculative":  # both choose by log-probabilities / greedy checks
            search = "beam search (num_beams > 1)" if self.num_beams > 1 else "mode='speculative'"
            for name, off in (("do_sample", False), ("repetition_penalty", 1.0)):
                if getattr(self, name) != off:
                    raise ValueError(f"{name}={getattr(self, name)!r} does not apply to {search}")

    def _validate_speculative(self) -> None:
        if self.num_beams > 1 or self.policy is not None:
            raise ValueError("mode='speculative' is greedy with the confidence policy: no num_beams, no policy")
        if self.kv != "recompute":
            raise ValueError("mode='speculative' verifies drafts by recomputing them: it needs kv='recompute'")
        if self.batch_policy == "ride_along":  # rows at different slots never share a step to ride along in
            raise ValueError(
                "batch_policy='ride_along' does not apply to mode='speculative': use 'per_row' or 'slowest' (or 'auto')"
            )

    def update(self, **kwargs) -> dict:
        """Set the options among `kwargs` (in place: call it on a copy); returns the other keywords, as Hugging
        Face's `GenerationConfig.update` does."""
        names = {f.name for f in fields(self)}
        for name, value in kwargs.items():
            if name in names:
                setattr(self, name, value)
        return {name: value for name, value in kwargs.items() if name not in names}


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_positive_int(name: str, value) -> None:
    if not _is_int(value) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _check_number(name: str, value, rule: str, ok) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or not ok(value):
        raise ValueError(f"{name} must be a number {rule}, got {value!r}")


def _check_choice(name: str, value, allowed: tuple) -> None:
    # `is`, not `==`: 1 == True and 0 == False, but early_stopping=1 is not a documented value
    if not any(value is a or (isinstance(a, str) and value == a) for a in allowed):
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
