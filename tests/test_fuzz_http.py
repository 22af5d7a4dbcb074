"""`freevlm serve` fuzzed from its own OpenAPI schema with Schemathesis (issue 26): every operation FastAPI
publishes, with bodies, parameters and headers Schemathesis draws from the schema (and against it), sent to the app
served by uvicorn on loopback in a thread. No answer may be a 5xx, and the server still answers a good request
afterwards. Bounded: a fixed number of examples per operation, derandomized (tests/fuzzing.py)."""

from __future__ import annotations

import base64
import io
import socket
import threading
import time

import httpx
import pytest
import torch
from fuzzing import fuzz_settings
from hypothesis import given
from PIL import Image
from training_helpers import save_tiny_blip2

from freevlm import EarlyExitVLM, ExitConfig
from freevlm.tiny import tiny_blip2

uvicorn = pytest.importorskip("uvicorn")  # the serve extra
schemathesis = pytest.importorskip("schemathesis")
not_a_server_error = schemathesis.checks.not_a_server_error
pytestmark = pytest.mark.usefixtures("one_thread")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The app of `freevlm serve` over a tiny BLIP-2 with exits, on a loopback port, for the module."""
    from freevlm.loading import load_exits, load_vlm
    from freevlm.server.app import ServedModel, create_app
    from freevlm.server.config import ServerConfig

    root = tmp_path_factory.mktemp("http")
    save_tiny_blip2(root / "backbone")
    EarlyExitVLM.from_backbone(tiny_blip2("opt", seed=0), ExitConfig([1, 2])).save_exits(root / "exits")
    bundle = load_vlm(root / "backbone")
    model = ServedModel(bundle, load_exits(bundle.model, root / "exits"), "tiny")
    app = create_app(model, ServerConfig(max_batch=2, max_len=64, max_tokens=4, request_timeout=20.0))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    for _ in range(200):
        if server.started:
            break
        time.sleep(0.05)
    yield base
    server.should_exit = True
    thread.join(timeout=30)


def operations(server: str) -> list:
    """Every operation the server's OpenAPI schema publishes."""
    schema = schemathesis.openapi.from_url(f"{server}/openapi.json")
    return [result.ok() for result in schema.get_all_operations()]


def test_no_request_gets_a_server_error(server):
    """Each operation in turn, Schemathesis's strategy for it run by Hypothesis (its pytest plugin does not load
    under pytest 9, so the strategies are driven here)."""
    ops = operations(server)
    assert any(op.path == "/v1/chat/completions" for op in ops)
    for op in ops:

        @fuzz_settings(max_examples=25)
        @given(case=op.as_strategy())
        def check(case):
            if isinstance(case.body, dict) and "model" in case.body:  # the served name, so the body is read further
                case.body["model"] = "tiny"
            case.call_and_validate(base_url=server, checks=[not_a_server_error], timeout=30)

        check()


def test_a_good_request_is_answered_after_the_fuzzing(server):
    """Runs after the fuzz test above (pytest keeps a module's order): the server is still whole."""
    png = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(png, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()
    body = {
        "model": "tiny",
        "max_tokens": 3,
        "messages": [
            {
                "role": "user",
                "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "a"}],
            }
        ],
    }
    response = httpx.post(f"{server}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["role"] == "assistant"
    assert httpx.get(f"{server}/health", timeout=10).status_code == 200
    torch.set_num_threads(1)
