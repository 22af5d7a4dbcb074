"""The server's way from the scheduler's thread to the event loop (`Relay`) and its token chunks (`TokenChunks`),
without a model: handles are fed by hand from a thread, as the scheduler feeds them."""

import asyncio
import json
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


@pytest.mark.parametrize("model", ["freevlm-demo", '"?"', '100% "quoted" {x}', "?"])
def test_token_chunks_are_the_events_json_gives(model):
    envelope = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": model}
    chunks = TokenChunks(envelope)
    for delta, event in [(" a red", TokenEvent(5, 2)), ('"}\n\\', TokenEvent(7, 12)), ("", TokenEvent(0, 4))]:
        choice = {"index": 0, "delta": {"content": delta}, "finish_reason": None, "logprobs": None}
        made = {"tokens": [event.token], "exit_layers": [event.exit_layer]}
        expected = _sse(envelope | {"choices": [choice], "freevlm": made})
        got = chunks.chunk(delta, event)
        assert got.startswith("data: ") and got.endswith("\n\n")
        assert json.loads(got.removeprefix("data: ")) == json.loads(expected.removeprefix("data: "))
