"""How the server's answers come out, in process (FastAPI's test client) on a tiny random BLIP-2: with
`stream_interval`, a stream's chunks carry several tokens each (their text joined, each one's id and exit layer in
order) and still add up to the plain answer and to `generate`'s; a plain answer, woken at its end only, is the
same, and a stop string still cuts it; the usage and the metrics count every token."""

import base64
import json
import re

import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from training_helpers import full_vocab_tokenizer, make_image_processor

from freevlm import EarlyExitVLM, ExitConfig
from freevlm.loading import load_exits, load_vlm
from freevlm.server.app import ServedModel, create_app
from freevlm.server.config import ServerConfig
from freevlm.tiny import tiny_blip2

MAX_TOKENS = 24
PROMPT = "the big red circle"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream")
    model = tiny_blip2("opt", seed=5, num_layers=6)
    ee = EarlyExitVLM.from_backbone(model, ExitConfig([1, 3, 4]))
    with torch.no_grad():  # sharper logits: tokens leave at different exits at threshold 0.1
        ee.backbone.final_norm_modules()[0].mul_(6)
    model.save_pretrained(root / "backbone")
    full_vocab_tokenizer().save_pretrained(root / "backbone")
    make_image_processor().save_pretrained(root / "backbone")
    ee.save_exits(root / "exits")
    image = root / "red.png"
    Image.new("RGB", (32, 32), (200, 40, 40)).save(image)
    bundle = load_vlm(root / "backbone")
    return bundle, load_exits(bundle.model, root / "exits"), image


def request(image, **options) -> dict:
    url = "data:image/png;base64," + base64.b64encode(image.read_bytes()).decode()
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": PROMPT}]
    body = {"model": "tiny", "messages": [{"role": "user", "content": content}], "max_tokens": MAX_TOKENS}
    return body | {"threshold": 0.1} | options


def stream(client, body: dict) -> list[dict]:
    with client.stream("POST", "/v1/chat/completions", json=body | {"stream": True}) as response:
        assert response.status_code == 200
        events = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(event) for event in events[:-1]]


def metric(client, name: str) -> float:
    return float(re.search(rf"^{re.escape(name)} (\S+)$", client.get("/metrics").text, re.M).group(1))


def test_chunks_of_several_tokens_add_up_to_the_answer(served):
    bundle, ee, image = served
    inputs = bundle.inputs([Image.open(image).convert("RGB")], [PROMPT])
    out = ee.generate(**inputs, max_new_tokens=MAX_TOKENS, threshold=0.1)
    tokens = out.sequences[0, inputs["input_ids"].shape[1] :].tolist()
    text, layers = bundle.decode(torch.tensor([tokens]))[0], out.exit_layers[0].tolist()
    assert len(set(layers)) > 1 and len(tokens) > 8, "the test sees no exits, or too short an answer"
    # 1 s between chunks: every token after the first is made within it, so they come in few chunks
    config = ServerConfig(max_batch=2, max_len=128, max_tokens=MAX_TOKENS, stream_interval=1.0)
    with TestClient(create_app(ServedModel(bundle, ee, "tiny"), config)) as client:
        plain = client.post("/v1/chat/completions", json=request(image)).json()
        assert plain["choices"][0]["message"]["content"] == text and plain["freevlm"]["exit_layers"] == layers
        assert plain["usage"]["completion_tokens"] == len(tokens)

        *token_chunks, final, usage = stream(client, request(image, stream_options={"include_usage": True}))
        token_chunks = [c for c in token_chunks if "freevlm" in c]  # not the role's chunk
        made = [c["freevlm"] for c in token_chunks]
        assert max(len(m["tokens"]) for m in made) > 1, "every chunk holds one token: nothing came together"
        assert [t for m in made for t in m["tokens"]] == tokens
        assert [layer for m in made for layer in m["exit_layers"]] == layers
        for chunk, m in zip(token_chunks, made):  # several tokens: each one's text too, joined the content
            assert len(m["exit_layers"]) == len(m["tokens"]) and len(m.get("texts", [0])) == len(m["tokens"])
            assert "".join(m.get("texts", [])) == (chunk["choices"][0]["delta"]["content"] if "texts" in m else "")
        assert "".join(c["choices"][0]["delta"].get("content") or "" for c in [*token_chunks, final]) == text
        assert final["choices"][0]["finish_reason"] == "length" and final["freevlm"]["exit_layers"] == layers
        assert usage["usage"]["completion_tokens"] == len(tokens)
        assert metric(client, "freevlm_completion_tokens_total") == 2 * len(tokens)
        assert metric(client, "freevlm_time_to_first_token_seconds_count") == 2

        # a stop string ends a plain answer too (it is woken for each token then), and a stream mid-chunk
        stop = text.split()[2]
        cut = text[: text.find(stop)]  # OpenAI stop: the text before it, as it is
        plain = client.post("/v1/chat/completions", json=request(image, stop=[stop])).json()
        assert plain["choices"][0]["message"]["content"] == cut and plain["choices"][0]["finish_reason"] == "stop"
        chunks = stream(client, request(image, stop=[stop]))
        assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]) == cut
