"""The processes an evaluation runs on: one, or several started by `accelerate launch`.

Batches are dealt out round robin (batch b to process b mod N), so every batch holds the records it holds in a
one-process run and decodes to the same outputs; after each round every process's outputs are gathered. Accelerate's
`PartialState` (what training's `Accelerator` stands on) says which process this is, `gather_object` collects.
The process group is destroyed at exit, before the interpreter tears down: left to the interpreter, gloo's threads
were destroyed still running, and a finished run died of `std::terminate` (SIGABRT) about one time in four.
"""

from __future__ import annotations

import atexit
from dataclasses import dataclass


@dataclass(frozen=True)
class Processes:
    rank: int = 0
    world: int = 1

    @classmethod
    def start(cls, device: str) -> tuple[Processes, str]:
        """Join the processes `accelerate launch` started (as CPU processes when `device` is "cpu": Accelerate
        counts them only when told so, once, before anything else asks); returns them and the device this process
        runs on ("cuda" under several processes: each process's own GPU)."""
        from accelerate import PartialState

        state = PartialState(cpu=device == "cpu")
        if state.num_processes > 1:
            atexit.register(state.destroy_process_group)
            if device == "cuda":
                device = str(state.device)
        return cls(state.process_index, state.num_processes), device

    @classmethod
    def current(cls) -> Processes:
        """This process's place among those `accelerate launch` started (one process without it; CPU processes
        are counted only after `start("cpu")`)."""
        from accelerate import PartialState

        state = PartialState()
        return cls(state.process_index, state.num_processes)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def rounds(self, items: int) -> int:
        """Rounds that deal `items` out one per process per round."""
        return -(-items // self.world)

    def mine(self, items: list, round_: int):
        """This process's item of round `round_` (None once they run out: the process still joins the gather)."""
        i = round_ * self.world + self.rank
        return items[i] if i < len(items) else None

    def gather(self, rows: list) -> list:
        """Every process's `rows`, concatenated in rank order, on every process."""
        if self.world == 1:
            return list(rows)
        from accelerate.utils import gather_object

        return gather_object(rows)

    def broadcast(self, value):
        """The main process's `value`, on every process."""
        if self.world == 1:
            return value
        from accelerate.utils import broadcast_object_list

        return broadcast_object_list([value])[0]
