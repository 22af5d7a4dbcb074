"""The scheduler in a process of its own (`SchedulerProcess`, what `freevlm serve` runs), driven here as the app
drives it: its answers are an in-process `Scheduler`'s, token by token; its refusals are the scheduler's own
(`QueueFull`, `ValueError`); a cancel frees the row; the app's side holds no weights; and when the child dies, the
requests it held end with an error instead of waiting forever. On the tiny BLIP-2 of test_server.py."""

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import pytest
from test_server import PROMPTS, ROOT, files  # noqa: F401

from freevlm.commands.serve import load_served_model
from freevlm.data.images import load_image
from freevlm.loading import load_exits, load_vlm
from freevlm.server.config import ServerConfig
from freevlm.server.remote import SchedulerProcess
from freevlm.serving import QueueFull, Scheduler

LONG = 440  # tokens: a request that runs for a while (the tiny OPT has 512 positions)


@pytest.fixture(scope="module")
def remote(files):  # noqa: F811
    """A SchedulerProcess of one row and one waiting place, loading the model as `freevlm serve` does."""
    args = argparse.Namespace(backbone=files["backbone"], exits=files["exits"], name="tiny", device="cpu")
    scheduler = SchedulerProcess(
        partial(load_served_model, args), ServerConfig(max_batch=1, max_len=512, max_waiting=1)
    )
    scheduler.start()
    yield scheduler
    scheduler.stop()


def request(model, image, prompt: str, **options) -> dict:
    inputs = model.bundle.inputs([load_image(image)], [prompt])
    return {**inputs, "threshold": 0.3, "max_new_tokens": 8, **options}


async def answers(remote, requests: list[dict]) -> list:
    """Each request submitted to the child in turn (it takes one at a time), and its `Completion`."""
    done = []
    for r in requests:
        handle = await remote.submit(**r)
        done.append(await asyncio.to_thread(handle.result, 60))
    return done


def test_answers_equal_an_in_process_scheduler(remote, files):  # noqa: F811
    """Tokens, exit layers and finish reasons, over the pipe, as a `Scheduler` in this process gives them."""
    requests = [request(remote.model, files["images"][i % 3], p) for i, p in enumerate(PROMPTS)]
    got = asyncio.run(answers(remote, requests))
    bundle = load_vlm(files["backbone"])
    local = Scheduler(load_exits(bundle.model, files["exits"]), max_batch=1)
    handles = [local.submit(**r) for r in requests]
    local.run_until_idle()
    for mine, theirs in zip(got, [h.result() for h in handles]):
        assert (mine.tokens, mine.exit_layers, mine.finish_reason) == (
            theirs.tokens,
            theirs.exit_layers,
            theirs.finish_reason,
        )
        assert len(mine.timings) == len(mine.tokens) and mine.submitted <= mine.timings[0] <= mine.finished
    assert len({tuple(c.tokens) for c in got}) > 1  # the prompts' answers differ: the test tells them apart


def test_the_app_side_holds_no_weights(remote):
    model = remote.model
    assert model.ee is None and sum(p.numel() for p in model.bundle.model.parameters()) == 0
    assert model.name == "tiny" and model.num_layers == 6 and model.exit_layers == (1, 3, 4)


def test_refusals_cancels_and_counts(remote, files):  # noqa: F811
    """A request that can never fit: the scheduler's ValueError. With the one row taken and the one waiting place
    filled (the second is sent once the first holds the row, or both would wait), a third: QueueFull. Cancelling
    frees the row and the place (the child's counts come back to 0)."""

    async def run():
        with pytest.raises(ValueError, match="max_new_tokens"):
            await remote.submit(**request(remote.model, files["images"][0], "a", max_new_tokens=10_000))
        first = await remote.submit(**request(remote.model, files["images"][0], "a", max_new_tokens=LONG))
        assert await counts(remote, (1, 0))  # the first holds the row before the second takes the waiting place
        second = await remote.submit(**request(remote.model, files["images"][1], "b", max_new_tokens=LONG))
        with pytest.raises(QueueFull):
            await remote.submit(**request(remote.model, files["images"][2], "c"))
        assert await counts(remote, (1, 1))
        first.cancel(), second.cancel()
        assert await counts(remote, (0, 0))
        assert first.result(10).finish_reason == second.result(10).finish_reason == "cancelled"
        assert len(first.tokens) < LONG

    asyncio.run(run())


async def counts(remote, expected: tuple[int, int], seconds: float = 10) -> bool:
    deadline = time.monotonic() + seconds
    while (remote.running, remote.waiting) != expected and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    return (remote.running, remote.waiting) == expected


def test_a_dead_child_ends_its_requests_with_an_error(files):  # noqa: F811
    args = argparse.Namespace(backbone=files["backbone"], exits=files["exits"], name="tiny", device="cpu")
    scheduler = SchedulerProcess(partial(load_served_model, args), ServerConfig(max_batch=1, max_len=512))
    scheduler.start()

    async def run():
        handle = await scheduler.submit(**request(scheduler.model, files["images"][0], "a", max_new_tokens=LONG))
        while not handle.tokens:
            await asyncio.sleep(0.01)
        os.kill(scheduler.pid, signal.SIGKILL)
        with pytest.raises(RuntimeError, match="process has ended"):
            await asyncio.to_thread(handle.result, 10)
        assert handle.finish_reason == "error" and not scheduler.alive
        with pytest.raises(RuntimeError, match="process has ended"):
            await scheduler.submit(**request(scheduler.model, files["images"][0], "a"))

    try:
        asyncio.run(run())
    finally:
        scheduler.stop()


def test_an_app_that_exits_without_stopping_it_ends_the_child(files):  # noqa: F811
    """The child ignores SIGTERM (the app drains first, then stops it): a process that exits without `stop` (uvicorn
    never ran its lifespan) must still end it, not wait for it forever at exit."""
    args = dict(backbone=str(files["backbone"]), exits=str(files["exits"]), name="tiny", device="cpu")
    code = (
        "import argparse, functools\n"
        "from freevlm.commands.serve import load_served_model\n"
        "from freevlm.server.config import ServerConfig\n"
        "from freevlm.server.remote import SchedulerProcess\n"
        f"load = functools.partial(load_served_model, argparse.Namespace(**{args!r}))\n"
        "scheduler = SchedulerProcess(load, ServerConfig())  # held until the end, as by an app\n"
        "print(scheduler.pid, flush=True)\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    assert not Path(f"/proc/{int(run.stdout.split()[-1])}").exists()
