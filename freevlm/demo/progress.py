"""What the demo shows while it runs: a line per stage with the elapsed time, and a bar per training or evaluation
run (tqdm, and an `on_progress(name, step, total)` callback for tests and UIs)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from tqdm.auto import tqdm

from ..loading import VLMBundle
from ..training.common import progress_hook


@dataclass
class Progress:
    say: Callable[[str], None] = print
    on_progress: Callable[[str, int, int], None] | None = None
    show: bool = True  # tqdm bars (stage lines are printed either way)
    stages: dict[str, float] = field(default_factory=dict)  # seconds each finished stage took
    t0: float = field(default_factory=time.perf_counter)

    def elapsed(self) -> str:
        minutes, seconds = divmod(int(time.perf_counter() - self.t0), 60)
        return f"{minutes:2d}:{seconds:02d}"

    @contextlib.contextmanager
    def stage(self, name: str):
        """A line when a stage starts and one with its elapsed time when it ends; the time goes in the report."""
        self.say(f"[{self.elapsed()}] {name} ...")
        t0 = time.perf_counter()
        yield
        self.stages[name] = time.perf_counter() - t0
        self.say(f"[{self.elapsed()}] {name} done in {self.stages[name]:.0f}s")

    @contextlib.contextmanager
    def training(self, name: str):
        """Training loops inside report their steps: a tqdm bar named `name` and `on_progress(name, step, total)`."""
        callback = (lambda step, total, postfix: self.on_progress(name, step, total)) if self.on_progress else None
        with progress_hook(callback, desc=name):
            yield

    def bar(self, total: int, desc: str) -> tqdm:
        return tqdm(total=total, desc=desc, unit="img", dynamic_ncols=True, leave=False, disable=not self.show)

    @contextlib.contextmanager
    def ticking(self, bundle: VLMBundle, name: str, total: int):
        """The bundle as evaluation sees it, ticking a bar named `name` per prepared batch (see `Ticking`)."""
        callback = (lambda done: self.on_progress(name, done, total)) if self.on_progress else None
        processor = Ticking(bundle, self.bar(total, name), callback)
        try:
            yield processor
        finally:
            processor.close()


class Ticking:
    """The bundle as the evaluation loop sees it (`inputs`, `decode`, `tokenizer`), advancing a bar as each batch
    is prepared: evaluation shows progress without a hook in the evaluation loop."""

    def __init__(self, bundle: VLMBundle, bar: tqdm, callback: Callable[[int], None] | None = None):
        self.bundle, self.tokenizer, self.bar, self.callback = bundle, bundle.tokenizer, bar, callback
        self.done = self.pending = 0

    def inputs(self, images, prompts):
        self._advance()  # the previous batch is decoded once the next one is asked for
        self.pending = len(images)
        return self.bundle.inputs(images, prompts)

    def decode(self, token_ids):
        return self.bundle.decode(token_ids)

    def _advance(self) -> None:
        if self.pending:
            self.done += self.pending
            self.bar.update(self.pending)
            if self.callback is not None:
                self.callback(self.done)
            self.pending = 0

    def close(self) -> None:
        self._advance()
        self.bar.close()
