"""`freevlm serve --replicas 2`: the server as a Ray Serve deployment of two replicas on this machine's CPUs (a local
Ray cluster of 2 CPUs and a 128 MiB object store, on loopback). Both replicas answer, every answer (plain or
streamed) equals a single server's for the same request, and SIGTERM stops the replicas and Ray and exits 0.
Ray starts once for the module (~30-60 s on 2 busy cores)."""

import asyncio
import json
import os
import signal
import time
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from test_server import LONG, MAX_TOKENS, PROMPTS, THRESHOLDS, Server, data_url, files, messages  # noqa: F401

from freevlm.cli import main
from freevlm.loading import load_exits, load_vlm
from freevlm.server.app import ServedModel, create_app
from freevlm.server.config import ServerConfig

pytest.importorskip("ray.serve", reason="Ray Serve (the serve extra's ray[serve]) is not installed")
pytestmark = pytest.mark.slow

REPLICA_HEADER = "x-freevlm-replica"


@pytest.fixture(scope="module")
def ray_server(files):  # noqa: F811
    server = Server(
        files,
        "--replicas",
        "2",
        "--replica-cpus",
        "1",
        "--max-batch",
        "4",
        "--max-len",
        "480",
        "--max-tokens",
        str(MAX_TOKENS),
    )
    try:
        server.wait(300)  # /health answers from the first replica ready: wait for the command to say all are
        log, deadline = Path(server.log.name), time.monotonic() + 120
        while "serving 2 replicas" not in log.read_text():
            assert server.process.poll() is None and time.monotonic() < deadline, server.output()
            time.sleep(0.2)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def single(files):  # noqa: F811
    """One server in this process, as `freevlm serve` without --replicas runs it."""
    bundle = load_vlm(files["backbone"])
    app = create_app(ServedModel(bundle, load_exits(bundle.model, files["exits"]), "tiny"), ServerConfig())
    with TestClient(app) as client:
        yield client


def body(image, prompt: str, threshold: float, stream: bool) -> dict:
    return {
        "model": "tiny",
        "messages": messages(data_url(image), prompt),
        "max_tokens": MAX_TOKENS,
        "threshold": threshold,
        "stream": stream,
    }


def read(response: httpx.Response) -> tuple[str, list[int]]:
    """An answer's text and exit layers, from a plain response or a stream's chunks."""
    if not response.headers["content-type"].startswith("text/event-stream"):
        out = response.json()
        return out["choices"][0]["message"]["content"], out["freevlm"]["exit_layers"]
    chunks = [json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: {")]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    layers = [layer for c in chunks[:-1] for layer in c.get("freevlm", {}).get("exit_layers", [])]
    assert chunks[-1]["freevlm"]["exit_layers"] == layers
    return text, layers


def test_two_replicas_answer_as_one_server(ray_server, single, files):  # noqa: F811
    cases = [
        (files["images"][i % 3], prompt, threshold, i % 2 == 1)
        for i, (prompt, threshold) in enumerate((p, t) for p in PROMPTS for t in THRESHOLDS)
    ]

    async def everyone():
        async with httpx.AsyncClient(base_url=ray_server.url, timeout=120) as client:
            return await asyncio.gather(*(client.post("/v1/chat/completions", json=body(*c)) for c in cases))

    responses = asyncio.run(everyone())
    assert [r.status_code for r in responses] == [200] * len(cases), [r.text for r in responses if r.is_error]
    answered = {r.headers[REPLICA_HEADER] for r in responses}
    assert len(answered) == 2, f"only replica {answered} answered {len(cases)} concurrent requests"
    expected = [read(single.post("/v1/chat/completions", json=body(*c))) for c in cases]
    assert len({layer for _, layers in expected for layer in layers}) > 1, "no early exit: the test sees no exits"
    assert [read(r) for r in responses] == expected
    page = httpx.get(ray_server.url)  # the live page comes with the app
    assert page.status_code == 200 and "<title>freevlm" in page.text
    ray_server.replica_pids = sorted(int(pid) for pid in answered)


def test_sigterm_drains_stops_replicas_and_ray_then_exits_0(ray_server, files):  # noqa: F811
    """Last to use the module's server: a stream running at SIGTERM still ends with [DONE]; then the replicas and
    Ray are gone and the command exits 0."""
    pids = getattr(ray_server, "replica_pids", [])
    request = body(files["images"][0], PROMPTS[0], 1.0, stream=True) | {"max_tokens": LONG}
    with (
        httpx.Client(base_url=ray_server.url, timeout=60) as client,
        client.stream("POST", "/v1/chat/completions", json=request) as response,
    ):
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
        ray_server.process.send_signal(signal.SIGTERM)
        rest = [line for line in lines if line]
    assert rest[-1] == "data: [DONE]", rest[-3:]
    final = json.loads(rest[-2].removeprefix("data: "))
    assert final["choices"][0]["finish_reason"] in ("stop", "length") and len(final["freevlm"]["exit_layers"]) > 1
    assert ray_server.process.wait(60) == 0, ray_server.output()
    ray_server.stop()
    for pid in pids:  # each replica's process has ended
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{ray_server.url}/health", timeout=2)


def test_refusals_before_ray_starts(files, tmp_path, capsys):  # noqa: F811
    assert main(["serve", "--backbone", str(files["backbone"]), "--replica-cpus", "2"]) == 2
    assert "--replica-cpus applies to --replicas N" in capsys.readouterr().err
    assert main(["serve", "--backbone", str(tmp_path / "missing"), "--replicas", "2"]) == 2
    assert "missing" in capsys.readouterr().err
