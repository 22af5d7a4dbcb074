"""`ServerConfig`: every option of `freevlm serve` and its default, in one place (the command line reads them here)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..decoding.config import DecodeConfig
from ..serving import Scheduler


@dataclass
class ServerConfig:
    """How the server batches, what it accepts, and how long it waits.

    `max_batch` rows of `max_len` slots (prompt + answer) decode together; at most `max_waiting` requests wait for a
    row, and one more is answered 429 with `Retry-After: retry_after`. Each scheduler iteration encodes at most
    `prefill_chunk` slots of the joining prompts (image tokens included) before its decode step, their images
    encoded together: more starts a burst of arrivals sooner (and encodes it in fewer, larger calls), and holds the
    running answers up longer meanwhile. `threshold` and `max_tokens` apply to a request that gives none (`threshold`
    None: the one certified for the model's exits where it records one, else `DecodeConfig`'s). `prompt`
    is the text used when a request's message has none (None: the model folder's recorded prompt, else ""). A
    request still unfinished `request_timeout` seconds after it came is cancelled. On SIGTERM the server takes no
    new connection and gives running requests `drain_seconds` to finish.
    """

    max_batch: int = 8
    max_len: int = 256
    max_waiting: int = 64
    prefill_chunk: int = 512  # the Scheduler's 64 is ~3 demo prompts: a burst of 16 would join over 5 iterations
    threshold: float | None = None
    max_tokens: int = DecodeConfig.max_new_tokens
    prompt: str | None = None
    request_timeout: float = 120.0
    retry_after: int = 1
    drain_seconds: float = 30.0
    # http(s) image URLs: fetched with this timeout and size cap, or refused when `image_urls` is False
    image_urls: bool = True
    image_url_timeout: float = 10.0
    max_image_bytes: int = 20 * 2**20

    def scheduler(self, ee) -> Scheduler:
        """The continuous batcher these settings describe, over `ee` (in the app's thread or a process of its own)."""
        return Scheduler(
            ee,
            max_batch=self.max_batch,
            max_len=self.max_len,
            max_waiting=self.max_waiting,
            prefill_chunk=self.prefill_chunk,
        )

    def default_threshold(self, model) -> tuple[float, str]:
        """The threshold of a request to `model` (a `ServedModel`) that gives none, and where it comes from: 1.0
        without exits, else `threshold`, else the one certified for the model's exits (`ServedModel.threshold`),
        else `DecodeConfig`'s."""
        if not model.has_exits:
            return 1.0, "no exits: every token runs the whole model"
        if self.threshold is not None:
            return self.threshold, "--threshold"
        if model.threshold is not None:
            return (
                model.threshold,
                f"certified (Learn-then-Test) for exits {list(model.exit_layers)}, recorded with the model",
            )
        return DecodeConfig.threshold, "the library's default; no certified threshold is recorded with the model"

    def validate(self) -> None:
        """A `ValueError` naming the first bad option."""
        for name in (
            "max_batch",
            "max_len",
            "max_waiting",
            "prefill_chunk",
            "max_tokens",
            "retry_after",
            "max_image_bytes",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("request_timeout", "drain_seconds", "image_url_timeout"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
        if self.threshold is not None and (
            not isinstance(self.threshold, (int, float)) or not 0 <= self.threshold <= 1
        ):
            raise ValueError(f"threshold must be in [0, 1], got {self.threshold!r}")
        if self.max_tokens >= self.max_len:
            raise ValueError(f"max_tokens={self.max_tokens} leaves no room for a prompt in max_len={self.max_len}")
