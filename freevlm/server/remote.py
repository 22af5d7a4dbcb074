"""The scheduler in a process of its own, as `freevlm serve` runs it: the event loop (HTTP, JSON, images -> inputs,
streaming) and the decode steps no longer share one GIL, so the HTTP work runs on another core beside them.

    scheduler = SchedulerProcess(load, config)      # load: a picklable () -> ServedModel, run in the child
    app = create_app(scheduler.model, config, scheduler)

The child (multiprocessing's spawn: torch is not forked) loads the model and steps a `Scheduler` in its main thread:
between steps it takes the requests and cancels that came; after a step it sends every request's new tokens
`(token, exit layer, time)` and ends, in one message. The app process keeps the model without its weights
(`ServedModel.without_weights`: config, processor, tokenizer), all that reading requests and writing answers needs.
Its handles are `Handle`s fed by a reader thread, so `Relay` and `ChatService` work as over a `Scheduler` in a
thread; `submit` waits for the child's verdict without blocking the event loop (accepted, or the scheduler's own
`QueueFull` / `ValueError`). A writer thread sends, so that a request's pixels never block the loop while the child
is in a step. If the child dies, every request it held ends with an error and `alive` turns False.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import multiprocessing
import multiprocessing.util
import pickle
import queue
import signal
import threading
from collections.abc import Callable

import numpy as np
import torch

from ..serving import Handle, QueueFull, Scheduler
from ..serving.scheduler import WORK
from .config import ServerConfig
from .served import ServedModel

STOP = ("stop",)


class RemoteHandle(Handle):
    """A `Handle` whose request runs in the scheduler's process: cancelling it tells that process."""

    def __init__(self, request_id: int, owner: SchedulerProcess):
        super().__init__(request_id)
        self._owner = owner

    def cancel(self) -> None:
        if not (self.cancel_requested or self.done):
            self._owner._send(("cancel", self.request_id))
        super().cancel()


class SchedulerProcess:
    """A `Scheduler` in a child process, with the face `ChatService` uses (see the module docstring): `submit` (a
    coroutine here), `running`, `waiting`, `work`, `alive`, `start`, `stop`. Construction loads the model in the
    child and waits for it; `model` is then the served model without its weights."""

    def __init__(self, load: Callable[[], ServedModel], config: ServerConfig):
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self._process = context.Process(
            target=run_scheduler,
            args=(child, load, config, torch.get_num_threads()),
            name="freevlm-scheduler",
            daemon=True,
        )
        self._process.start()
        child.close()
        # an app that exits without `stop` (uvicorn never started it, an error) closes the pipe, which ends the child
        # (it ignores SIGTERM): before multiprocessing's exit handler waits for it
        multiprocessing.util.Finalize(self, self._conn.close, exitpriority=0)
        try:
            kind, value = pickle.loads(self._conn.recv_bytes())
        except EOFError:
            self._process.join()
            raise RuntimeError(
                f"the scheduler's process exited with code {self._process.exitcode} while loading the model"
            ) from None
        if kind == "failed":
            self._process.join()
            raise value
        self.model: ServedModel = value
        self.running = self.waiting = 0  # as the child last reported
        self.work = dict.fromkeys(WORK, 0)  # `Scheduler.work`, likewise
        self._ids = itertools.count(1)
        self._pending: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Future, RemoteHandle]] = {}
        self._handles: dict[int, RemoteHandle] = {}
        self._lock = threading.Lock()
        self._outbox: queue.SimpleQueue[tuple | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._ended = False

    # --- the app's side -------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the threads that talk to the child."""
        if self._threads:
            return
        self._threads = [
            threading.Thread(target=self._read, name="freevlm-scheduler-reader", daemon=True),
            threading.Thread(target=self._write, name="freevlm-scheduler-writer", daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        """Stop the child (requests still running in it end with an error) and the threads."""
        if self._threads:
            self._send(STOP)
        else:
            with contextlib.suppress(OSError):  # the child has gone already
                self._conn.send_bytes(pickle.dumps(STOP))
        self._process.join(30)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()
        self._outbox.put(None)
        for thread in self._threads:
            thread.join()
        self._conn.close()

    @property
    def alive(self) -> bool:
        return not self._ended and self._process.is_alive()

    @property
    def pid(self) -> int:
        return self._process.pid

    async def submit(self, **request) -> RemoteHandle:
        """As `Scheduler.submit` with keywords (its `QueueFull` and `ValueError` too), checked and queued in the
        child; a `RuntimeError` if the child has ended."""
        loop = asyncio.get_running_loop()
        handle = RemoteHandle(next(self._ids), self)
        verdict = loop.create_future()
        with self._lock:  # the reader settles every pending verdict when the child ends: none is left waiting
            if self._ended:
                raise RuntimeError("the scheduler's process has ended")
            self._pending[handle.request_id] = (loop, verdict, handle)
        request = {k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in request.items()}
        self._send(("submit", handle.request_id, request))
        try:
            await verdict
        except asyncio.CancelledError:  # the client went while the child decided: free what it may have queued
            handle.cancel()
            raise
        return handle

    def _send(self, message: tuple) -> None:
        self._outbox.put(message)

    def _write(self) -> None:
        while (message := self._outbox.get()) is not None:
            try:
                self._conn.send_bytes(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))
            except OSError:  # the child has gone: the reader ends its requests
                return

    def _read(self) -> None:
        try:
            while True:
                kind, *rest = pickle.loads(self._conn.recv_bytes())
                if kind == "verdict":
                    self._verdict(*rest)
                else:
                    self._update(*rest)
        except (EOFError, OSError):
            pass
        gone = RuntimeError("the scheduler's process has ended")
        with self._lock:
            self._ended = True
            pending, self._pending = self._pending, {}
        for loop, verdict, _ in pending.values():
            _settle(loop, verdict, gone)
        for handle in self._handles.values():
            handle._finish("error", gone)
        self._handles.clear()

    def _verdict(self, request_id: int, error: BaseException | None, running: int, waiting: int) -> None:
        self.running, self.waiting = running, waiting
        with self._lock:
            loop, verdict, handle = self._pending.pop(request_id)
        if error is None:
            self._handles[request_id] = handle
        _settle(loop, verdict, error)

    def _update(self, updates: list[tuple], running: int, waiting: int, work: dict[str, int]) -> None:
        """A step's news: each request's new tokens and its end, and the steps' work so far. The tokens' times are
        the child's `time.perf_counter`, the system's monotonic clock, which this process reads alike
        (`Handle.submitted`)."""
        for request_id, events, end in updates:
            handle = self._handles[request_id]
            for token, layer, when in events:
                handle._emit(token, layer, when)
            if end is not None:
                del self._handles[request_id]
                handle._finish(*end)
        self.running, self.waiting, self.work = running, waiting, work


def _settle(loop: asyncio.AbstractEventLoop, future: asyncio.Future, error: BaseException | None) -> None:
    """Resolve a submit's future from the reader thread (an error: raised by the awaiting submit)."""

    def settle() -> None:
        if not future.done():
            future.set_result(None) if error is None else future.set_exception(error)

    with contextlib.suppress(RuntimeError):  # the loop has closed: nobody waits
        loop.call_soon_threadsafe(settle)


def _portable(error: BaseException | None) -> BaseException | None:
    """An error as it can cross to the other process (one that does not pickle: as a RuntimeError with its text)."""
    if error is None:
        return None
    try:
        pickle.dumps(error)
        return error
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")


# --- the child's side -----------------------------------------------------------------------------------------------
def run_scheduler(conn, load: Callable[[], ServedModel], config: ServerConfig, threads: int) -> None:
    """The child's main: load the model, say so (or why not), then step the scheduler until told to stop or until
    the app process is gone. SIGINT and SIGTERM are the app's to handle: it drains, then stops this process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    torch.set_num_threads(threads)
    try:
        model = load()
        scheduler = config.scheduler(model.ee)
    except BaseException as err:
        conn.send_bytes(pickle.dumps(("failed", _portable(err))))
        return
    conn.send_bytes(pickle.dumps(("ready", model.without_weights())))
    try:
        _step_loop(conn, scheduler)
    except EOFError:  # the app process has gone
        return


def _step_loop(conn, scheduler: Scheduler) -> None:
    live: dict[int, list] = {}  # request id -> [its handle here, tokens sent]
    reported = (0, 0)
    while True:
        while conn.poll(None if scheduler.idle else 0):  # idle: wait for a request
            kind, *rest = pickle.loads(conn.recv_bytes())
            if kind == "stop":
                return
            if kind == "cancel":
                if rest[0] in live:
                    live[rest[0]][0].cancel()
                continue
            request_id, request = rest
            request = {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in request.items()}
            error = None
            try:
                live[request_id] = [scheduler.submit(**request), 0]
            except (QueueFull, ValueError) as err:
                error = err
            reported = (scheduler.running, scheduler.waiting)
            conn.send_bytes(pickle.dumps(("verdict", request_id, _portable(error), *reported)))
        try:
            scheduler.step()
        except BaseException as err:  # a failed step fails every request in it, as `Scheduler.start`'s loop does
            failed = [(request_id, [], ("error", _portable(err))) for request_id in live]
            conn.send_bytes(pickle.dumps(("update", failed, 0, 0, scheduler.work)))
            raise
        updates = []
        for request_id, entry in list(live.items()):
            handle, sent = entry
            made = len(handle.tokens)
            if made == sent and not handle.done:
                continue
            events = list(zip(handle.tokens[sent:], handle.exit_layers[sent:], handle.timings[sent:]))
            entry[1] = made
            end = None
            if handle.done:
                end = (handle.finish_reason, _portable(handle._error))
                del live[request_id]
            updates.append((request_id, events, end))
        counts = (scheduler.running, scheduler.waiting)
        if updates or counts != reported:
            reported = counts
            message = ("update", updates, *counts, scheduler.work)
            conn.send_bytes(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))
