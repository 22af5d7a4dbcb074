"""What a caller holds for a submitted request: a stream of `(token, exit layer)` as the scheduler makes them, a
way to cancel, and the whole answer at the end. Safe to read from any thread while the scheduler runs in another."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field


class QueueFull(RuntimeError):
    """The scheduler's waiting queue is full: the request was not taken; try again later."""


@dataclass(frozen=True)
class TokenEvent:
    token: int
    exit_layer: int  # the LM layer the token left at (num_layers: the final layer)


@dataclass
class Completion:
    """A finished request: its tokens and exit layers, why it ended, and when things happened (`time.perf_counter`)."""

    tokens: list[int]
    exit_layers: list[int]
    finish_reason: str  # "eos", "stop" (a stop sequence), "length" (max_new_tokens) or "cancelled"
    submitted: float
    first_token: float | None
    finished: float
    timings: list[float] = field(default_factory=list)  # when each token was out

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.submitted

    @property
    def time_per_output_token(self) -> float | None:
        """Mean seconds between tokens after the first (None with fewer than two)."""
        if len(self.timings) < 2:
            return None
        return (self.timings[-1] - self.timings[0]) / (len(self.timings) - 1)


class Handle:
    """A submitted request. Iterate it for `TokenEvent`s as they come (blocks until the next one or the end);
    `cancel()` frees its row at the next step boundary; `result()` waits for the `Completion`."""

    def __init__(self, request_id: int):
        self.request_id = request_id
        self.tokens: list[int] = []
        self.exit_layers: list[int] = []
        self.timings: list[float] = []  # when each token was out (`time.perf_counter`)
        self.finish_reason: str | None = None
        self.submitted = time.perf_counter()
        self._events: queue.SimpleQueue[TokenEvent | None] = queue.SimpleQueue()
        self._done = threading.Event()
        self._cancel = threading.Event()
        self._error: BaseException | None = None
        self._watchers: list[Callable[[], None]] = []
        self._watch_lock = threading.Lock()

    def __iter__(self) -> Iterator[TokenEvent]:
        while (event := self._events.get()) is not None:
            yield event
        self._events.put(None)  # a second iteration ends at once
        if self._error is not None:
            raise self._error

    def poll(self) -> tuple[list[TokenEvent], bool]:
        """The events that came since the last poll, without blocking, and whether the request has ended (for an
        event loop that must not block: see `watch`). Use either `poll` or iteration, not both."""
        events = []
        while True:
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                return events, False
            if event is None:
                self._events.put(None)
                return events, True
            events.append(event)

    def watch(self, callback: Callable[[], None]) -> None:
        """Call `callback()` after every event and at the end, in the scheduler's thread (keep it short: an asyncio
        server passes `loop.call_soon_threadsafe(...)`); called once now, for what came before."""
        with self._watch_lock:
            self._watchers.append(callback)
        callback()

    def cancel(self) -> None:
        self._cancel.set()

    @property
    def cancel_requested(self) -> bool:
        return self._cancel.is_set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def result(self, timeout: float | None = None) -> Completion:
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.request_id} did not finish within {timeout} s")
        if self._error is not None:
            raise self._error
        first = self.timings[0] if self.timings else None
        return Completion(
            list(self.tokens),
            list(self.exit_layers),
            self.finish_reason,
            self.submitted,
            first,
            self._finished,
            list(self.timings),
        )

    # --- the scheduler's side ---------------------------------------------------------------------------------------
    def _emit(self, token: int, exit_layer: int, now: float) -> None:
        self.tokens.append(token)
        self.exit_layers.append(exit_layer)
        self.timings.append(now)
        self._events.put(TokenEvent(token, exit_layer))
        self._notify()

    def _finish(self, reason: str, error: BaseException | None = None) -> None:
        self.finish_reason, self._error = reason, error
        self._finished = time.perf_counter()
        self._done.set()
        self._events.put(None)
        self._notify()

    def _notify(self) -> None:
        with self._watch_lock:
            watchers = list(self._watchers)
        for callback in watchers:
            callback()
