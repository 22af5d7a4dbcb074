"""The server's way from the scheduler's thread to the event loop (`Relay`) and its token chunks (`TokenChunks`),
without a model: handles are fed by hand from a thread, as the scheduler feeds them."""

import asyncio
import threading

import pytest

from freevlm.server.app import TokenChunks, _sse
from freevlm.server.relay import Relay
from freevlm.serving import Handle, TokenEvent


def test_a_step_of_tokens_wakes_the_loop_once_and_every_reader():
    async def run():
        loop = asyncio.get_running_loop()
        relay = Relay(loop)
        handles = [Handle(i) for i in range(16)]
        feeds = [relay.feed(h, deadline=loop.time() + 60) for h in handles]
        await asyncio.sleep(0)  # watching calls each watcher once: let that wake-up pass
        for feed in feeds:
            feed.wake.clear()
        calls = []
        threadsafe = loop.call_soon_threadsafe
        loop.call_soon_threadsafe = lambda *a: calls.append(a) or threadsafe(*a)

        def step():  # the scheduler's thread: a token for every row, then the last row's end
            for i, handle in enumerate(handles):
                handle._emit(100 + i, i % 4, 0.0)
            handles[-1]._finish("eos")

        thread = threading.Thread(target=step)
        thread.start()
        thread.join()
        await asyncio.sleep(0)
        assert len(calls) == 1 and all(feed.wake.is_set() for feed in feeds)
        polled = [h.poll() for h in handles]
        assert polled[0] == ([TokenEvent(100, 0)], False) and polled[-1] == ([TokenEvent(115, 3)], True)
        for feed in feeds:
            feed.close()

    asyncio.run(run())


def test_a_feed_wakes_at_its_deadline_and_every_tick_without_tokens():
    async def run():
        loop = asyncio.get_running_loop()
        relay = Relay(loop)
        start = loop.time()
        feed = relay.feed(Handle(1), deadline=start + 0.05, tick=10)
        await asyncio.sleep(0)
        feed.wake.clear()
        await asyncio.wait_for(feed.wake.wait(), 5)
        assert feed.ticked and loop.time() - start >= 0.05
        feed.close()
        ticking = relay.feed(Handle(2), deadline=start + 60, tick=0.02)
        await asyncio.sleep(0)
        ticking.wake.clear()
        await asyncio.wait_for(ticking.wake.wait(), 5)
        assert ticking.ticked
        ticking.close()

    asyncio.run(run())


def test_a_feed_for_the_whole_answer_wakes_at_its_end_only():
    async def run():
        loop = asyncio.get_running_loop()
        relay = Relay(loop)
        handle = Handle(1)
        feed = relay.feed(handle, deadline=loop.time() + 60, every_token=False)
        await asyncio.sleep(0)
        assert not feed.wake.is_set()  # watching calls the watcher once: nothing has come yet
        for i in range(3):
            await loop.run_in_executor(None, handle._emit, 10 + i, 2, 0.0)
            await asyncio.sleep(0)
            assert not feed.wake.is_set()
        await loop.run_in_executor(None, handle._finish, "eos")
        await asyncio.wait_for(feed.wake.wait(), 5)
        assert handle.poll() == ([TokenEvent(10 + i, 2) for i in range(3)], True)
        feed.close()

    asyncio.run(run())


@pytest.mark.parametrize("model", ["freevlm-demo", '"?"', '100% "quoted" {x}', "?"])
def test_token_chunks_are_the_events_json_gives(model):
    """A chunk of one token or of several: the text joined, each token's id, exit layer and text in order."""
    envelope = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": model}
    chunks = TokenChunks(envelope)
    cases = [
        ([" a red"], [TokenEvent(5, 2)]),
        (['"}\n\\'], [TokenEvent(7, 12)]),
        ([""], [TokenEvent(0, 4)]),
        ([" a", ' "red"', "", " circle"], [TokenEvent(5, 2), TokenEvent(9, 12), TokenEvent(0, 4), TokenEvent(3, 1)]),
    ]
    for deltas, events in cases:
        choice = {"index": 0, "delta": {"content": "".join(deltas)}, "finish_reason": None, "logprobs": None}
        made = {"tokens": [e.token for e in events], "exit_layers": [e.exit_layer for e in events]}
        made |= {"texts": deltas} if len(events) > 1 else {}
        expected = _sse(envelope | {"choices": [choice], "freevlm": made})
        got = chunks.chunk(deltas, events)
        assert got.startswith("data: ") and got.endswith("\n\n")
        assert got == expected  # byte for byte: what json.dumps would send
