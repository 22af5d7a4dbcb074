"""Continuous batching with early exits: a scheduler whose requests join and leave the running batch at every step.

`Scheduler` (scheduler.py) takes requests and runs the loop; `Handle` (handle.py) streams a request's
`(token, exit layer)` and cancels it; `RowEngine` (rows.py) keeps every row's K/V at its own positions and runs one
step for all rows."""

from .handle import Completion, Handle, QueueFull, TokenEvent
from .rows import RowEngine
from .scheduler import Scheduler

__all__ = ["Completion", "Handle", "QueueFull", "RowEngine", "Scheduler", "TokenEvent"]
