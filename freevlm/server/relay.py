"""Tokens from the scheduler's thread to the event loop, one wake-up of the loop per decode step rather than one per
token per request.

The scheduler emits a step's tokens one request after another (`Handle._emit`, which calls the handle's watchers). A
watcher here only marks its request ready; the first mark since the loop last looked schedules a single
`call_soon_threadsafe`, which wakes every request marked by then. So a step of 16 rows costs the scheduler's thread
one cross-thread call and the loop one callback, where a call per token cost 16 of each.

A feed that only needs the whole answer (`every_token=False`: a plain, non-streamed request) is marked at its
handle's end alone: its tokens cost the loop nothing on their way.

    relay = Relay(asyncio.get_running_loop())
    feed = relay.feed(handle, deadline)
    while ...: await feed.wake.wait(); feed.wake.clear(); handle.poll()   # what ChatService.events does
"""

from __future__ import annotations

import asyncio
import contextlib
import threading

from ..serving import Handle


class Feed:
    """One request's side of the relay: `wake` is set when its handle has news (a token, or its end), every `tick`
    seconds and at `deadline` (`loop.time()`), so that the reader can check its client and its deadline with one
    timer per request, not one per token."""

    def __init__(self, relay: Relay, handle: Handle, deadline: float, tick: float):
        self.wake = asyncio.Event()
        self.handle, self.deadline = handle, deadline
        self.ticked = False  # set by the tick, for the reader to clear
        self._relay, self._tick = relay, tick
        self._timer: asyncio.TimerHandle | None = None

    def start(self, every_token: bool) -> None:
        self._arm()
        self.handle.watch(self._mark if every_token else self._mark_at_end)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()

    def _mark(self) -> None:  # in the scheduler's thread
        self._relay.mark(self)

    def _mark_at_end(self) -> None:  # in the scheduler's thread
        if self.handle.done:
            self._relay.mark(self)

    def _on_tick(self) -> None:
        self.ticked = True
        self.wake.set()
        self._arm()

    def _arm(self) -> None:
        now = self._relay.loop.time()
        when = now + self._tick if now >= self.deadline else min(now + self._tick, self.deadline)
        self._timer = self._relay.loop.call_at(when, self._on_tick)


class Relay:
    """Wakes the feeds of one event loop (see the module docstring)."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._ready: list[Feed] = []
        self._lock = threading.Lock()

    def feed(self, handle: Handle, deadline: float, tick: float = 1.0, every_token: bool = True) -> Feed:
        """A feed for `handle`, woken on its news (each token, or only its end: `every_token=False`), every `tick`
        seconds and at `deadline` (`loop.time()`); `close()` it when done."""
        feed = Feed(self, handle, deadline, tick)
        feed.start(every_token)
        return feed

    def mark(self, feed: Feed) -> None:
        """`feed` has news (any thread): wake it with the others at the loop's next turn."""
        with self._lock:
            first = not self._ready
            self._ready.append(feed)
        if first:
            with contextlib.suppress(RuntimeError):  # the loop has closed: nobody is listening
                self.loop.call_soon_threadsafe(self._wake)

    def _wake(self) -> None:
        with self._lock:
            ready, self._ready = self._ready, []
        for feed in ready:
            feed.wake.set()
