"""`freevlm serve` as a real process on loopback, talked to with the official `openai` client and `httpx`: answers
equal `freevlm caption`'s under concurrent clients, streams carry exit layers, bad requests get OpenAI error objects
while other requests go on, a full queue answers 429, a client that disconnects frees its row, requests time out,
and SIGTERM drains and exits 0. Two servers per module (~10 s to start each) on a tiny random BLIP-2."""

import asyncio
import base64
import http.server
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import typing
import zlib
from pathlib import Path

import httpx
import openai
import pytest
import torch
from PIL import Image
from training_helpers import full_vocab_tokenizer, make_image_processor

from freevlm import EarlyExitVLM, ExitConfig
from freevlm.cli import main
from freevlm.data.images import load_image
from freevlm.loading import TrainingPrompt, load_exits, load_vlm
from freevlm.tiny import tiny_blip2

ROOT = Path(__file__).resolve().parents[1]
MAX_TOKENS = 12
LONG = 440  # tokens: a request that runs for a while (the tiny OPT has 512 positions)
# prompts whose greedy answers differ on the tiny model; thresholds at which its tokens leave at different exits
PROMPTS = ["a photo of", "what color is the shape", "the big red circle", "small blue"]
THRESHOLDS = [0.0, 0.1, 0.3, 1.0]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    model = tiny_blip2("opt", seed=5, num_layers=6)
    ee = EarlyExitVLM.from_backbone(model, ExitConfig([1, 3, 4]))
    with torch.no_grad():  # sharper logits: confident exits at some thresholds, not at others
        ee.backbone.final_norm_modules()[0].mul_(6)
    model.save_pretrained(root / "backbone")
    full_vocab_tokenizer().save_pretrained(root / "backbone")
    make_image_processor().save_pretrained(root / "backbone")
    TrainingPrompt(PROMPTS[3]).save_pretrained(root / "backbone")  # what a request with no text gets
    ee.save_exits(root / "exits")
    images = []
    for i, color in enumerate(["red", "green", "blue"]):
        path = root / f"{color}.png"
        Image.new("RGB", (32, 32), (60 * i, 255 - 80 * i, 40)).save(path)
        images.append(path)
    return {"backbone": root / "backbone", "exits": root / "exits", "images": images, "root": root}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`freevlm serve` in a subprocess; `wait()` until /health answers."""

    def __init__(self, files, *args: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
        command = [sys.executable, "-m", "freevlm.cli", "serve", "--backbone", str(files["backbone"])]
        command += ["--exits", str(files["exits"]), "--name", "tiny", "--port", str(self.port), *args]
        self.log = open(files["root"] / f"server-{self.port}.log", "w")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(command, env=env, stdout=self.log, stderr=subprocess.STDOUT)

    def wait(self, seconds: float = 120) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"the server exited: {self.output()}"
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        raise AssertionError(f"the server did not start in {seconds} s: {self.output()}")

    def output(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text()[-3000:]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.log.close()

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="none", max_retries=0)

    def async_client(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key="none", max_retries=0, timeout=60)

    def wait_idle(self, seconds: float = 5) -> None:
        """Until no request runs or waits (a cancelled one leaves at the scheduler's next step)."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            health = httpx.get(f"{self.url}/health").json()
            if health["running"] == health["waiting"] == 0:
                return
            time.sleep(0.02)
        raise AssertionError(f"the server is still busy after {seconds} s: {health}")

    def metric(self, name: str) -> float:
        text = httpx.get(f"{self.url}/metrics").text
        found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
        return float(found.group(1)) if found else 0.0


@pytest.fixture(scope="module")
def servers(files):
    """Both servers, started side by side: four rows with room for LONG tokens; and one row, one waiting request,
    a 0.8 s timeout, no image URLs (for 429, timeouts and refusals), decoding in a thread of its process (the first
    decodes in a process of its own, as `freevlm serve` does by default)."""
    started = [
        Server(files, "--max-batch", "4", "--max-len", "480", "--max-tokens", str(MAX_TOKENS)),
        Server(
            files,
            "--max-batch",
            "1",
            "--max-queue",
            "1",
            "--max-len",
            "480",
            "--request-timeout",
            "0.8",
            "--no-image-urls",
            "--scheduler-thread",
        ),
    ]
    try:
        for server in started:
            server.wait()
        yield started
    finally:
        for server in started:
            server.stop()


@pytest.fixture(scope="module")
def server(servers):
    return servers[0]


@pytest.fixture(scope="module")
def small_server(servers):
    return servers[1]


def data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def messages(url: str, prompt: str | None) -> list[dict]:
    content = [{"type": "image_url", "image_url": {"url": url}}]
    if prompt is not None:
        content.append({"type": "text", "text": prompt})
    return [{"role": "user", "content": content}]


@pytest.fixture(scope="module")
def local(files):
    """The served model, loaded here as `freevlm caption` loads it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    bundle = load_vlm(files["backbone"])
    yield bundle, load_exits(bundle.model, files["exits"])
    torch.set_num_threads(threads)


def expected(local, image: Path, prompt: str, threshold: float = 0.8, **sampling) -> tuple[str, list[int]]:
    """The answer and exit layers `freevlm caption` gives (its steps, on a model loaded once; checked against the
    command itself in the first test); with `sampling` options, what `generate` samples with them."""
    bundle, ee = local
    inputs = bundle.inputs([load_image(image)], [prompt])
    out = ee.generate(**inputs, max_new_tokens=MAX_TOKENS, threshold=threshold, **sampling)
    new = out.sequences[0, inputs["input_ids"].shape[1] :]
    return bundle.decode(new[None])[0], out.exit_layers[0].tolist()


def first_token(lines) -> str:
    """The first event of a stream that carries a token (the one before, the role, comes before the request has a
    row)."""
    return next(line for line in lines if '"tokens"' in line)


def caption(files, image: Path, prompt: str, threshold: float, max_tokens: int, capsys) -> tuple[str, list[int]]:
    """What `freevlm caption --trace` prints: the answer and each token's exit layer."""
    args = ["caption", "--backbone", str(files["backbone"]), "--exits", str(files["exits"]), "--image", str(image)]
    args += ["--prompt", prompt, "--threshold", str(threshold), "--max-new-tokens", str(max_tokens), "--trace"]
    capsys.readouterr()
    assert main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    text = lines[0].removeprefix(f"{image}: ")
    return text, [int(line.rsplit(" ", 1)[1]) for line in lines[1:] if re.search(r"  layer \d+$", line)]


def test_serve_alone_says_how_to_make_the_demo_model(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FREEVLM_CACHE", str(tmp_path))
    assert main(["serve"]) == 2
    err = capsys.readouterr().err
    assert f"no trained demo model in {tmp_path}" in err and "freevlm demo --quick" in err


def test_models_health_and_one_answer(server, files, local, capsys):
    client = server.client()
    assert [m.id for m in client.models.list().data] == ["tiny"]
    health = httpx.get(f"{server.url}/health").json()
    assert health["status"] == "ok" and health["running"] == 0
    image = files["images"][0]
    out = client.chat.completions.create(
        model="tiny",
        messages=messages(data_url(image), PROMPTS[0]),
        max_tokens=MAX_TOKENS,
        extra_body={"threshold": 0.1},
    )
    text, layers = caption(files, image, PROMPTS[0], 0.1, MAX_TOKENS, capsys)
    assert expected(local, image, PROMPTS[0], 0.1) == (text, layers)
    assert out.choices[0].message.content == text and out.freevlm["exit_layers"] == layers
    assert out.usage.completion_tokens == len(layers) and out.usage.prompt_tokens > 0
    assert out.choices[0].finish_reason in ("stop", "length")
    summary = out.freevlm
    assert summary["num_layers"] == 6 and summary["mean_layers_per_token"] == pytest.approx(sum(layers) / len(layers))


def test_answers_equal_caption_under_concurrent_clients(server, files, local):
    """Every (image, prompt, threshold) at once, half of them streamed, each twice: each answer and its exit
    layers are `freevlm caption`'s for the same inputs; a stream's deltas and chunk exit layers add up to it."""
    cases = [
        (files["images"][i % 3], prompt, threshold)
        for i, (prompt, threshold) in enumerate((p, t) for p in PROMPTS for t in THRESHOLDS)
    ]
    answers = [expected(local, *case) for case in cases]
    assert len({layer for _, layers in answers for layer in layers}) > 1, "no early exit: the test sees no exits"
    assert len({text for text, _ in answers}) > 3

    async def ask(client, image, prompt, threshold, stream):
        options = dict(model="tiny", messages=messages(data_url(image), prompt), max_tokens=MAX_TOKENS)
        options["extra_body"] = {"threshold": threshold}
        if not stream:
            out = await client.chat.completions.create(**options)
            return out.choices[0].message.content, out.freevlm["exit_layers"]
        chunks = [c async for c in await client.chat.completions.create(**options, stream=True)]
        text = "".join(c.choices[0].delta.content or "" for c in chunks)
        layers = [layer for c in chunks[:-1] for layer in (getattr(c, "freevlm", None) or {}).get("exit_layers", [])]
        made = [c.freevlm for c in chunks[:-1] if getattr(c, "freevlm", None)]
        assert all(len(m["tokens"]) == len(m["exit_layers"]) > 0 for m in made), made  # the tokens that came at once
        assert chunks[-1].choices[0].finish_reason in ("stop", "length")
        assert chunks[-1].freevlm["exit_layers"] == layers
        return text, layers

    async def everyone():
        client = server.async_client()
        jobs = [ask(client, *case, stream) for stream in (False, True) for case in cases]
        return await asyncio.gather(*jobs)

    assert asyncio.run(everyone()) == answers + answers


def test_seeded_sampling_is_reproducible_under_load(server, files, local):
    """temperature > 0 samples (top_p, seed as OpenAI's): a seeded request gets what `generate` samples with the
    same seed alone, whatever else runs beside it; temperature 0 stays greedy."""
    image, prompt = files["images"][0], PROMPTS[1]
    cases = [(None, 0.3), (7, 0.3), (8, 0.3), (7, 1.0), (8, 1.0)]  # (seed, threshold); None: greedy

    def sampling(seed):
        return {} if seed is None else {"do_sample": True, "temperature": 1.5, "top_p": 0.9, "seed": seed}

    answers = [expected(local, image, prompt, threshold, **sampling(seed)) for seed, threshold in cases]
    assert answers[1] != answers[2] and answers[1][0] != answers[0][0], (
        "the seeds change nothing: the test sees nothing"
    )

    async def ask(client, seed, threshold):
        options = {"temperature": 0} if seed is None else {"temperature": 1.5, "top_p": 0.9, "seed": seed}
        out = await client.chat.completions.create(
            model="tiny",
            messages=messages(data_url(image), prompt),
            max_tokens=MAX_TOKENS,
            extra_body={"threshold": threshold},
            **options,
        )
        return out.choices[0].message.content, out.freevlm["exit_layers"]

    async def everyone():
        client = server.async_client()
        return await asyncio.gather(*[ask(client, *case) for case in cases + cases])

    assert asyncio.run(everyone()) == answers + answers


def test_stream_usage_and_stop_strings(server, files, local):
    image, prompt = files["images"][1], PROMPTS[1]
    text, _ = expected(local, image, prompt, 1.0)
    words = text.split()
    assert len(words) > 3
    stop = words[2]
    cut = text[: text.find(stop)]
    client = server.client()
    options = dict(model="tiny", messages=messages(data_url(image), prompt), max_tokens=MAX_TOKENS, stop=[stop])
    out = client.chat.completions.create(**options, extra_body={"threshold": 1.0})
    assert out.choices[0].message.content == cut and out.choices[0].finish_reason == "stop"
    chunks = list(
        client.chat.completions.create(
            **options, extra_body={"threshold": 1.0}, stream=True, stream_options={"include_usage": True}
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == cut
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == out.usage.completion_tokens


def test_a_request_without_text_gets_the_folders_prompt(server, files, local):
    image = files["images"][2]
    out = server.client().chat.completions.create(model="tiny", messages=messages(data_url(image), None))
    assert out.choices[0].message.content == expected(local, image, PROMPTS[3])[0]


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height: PIL's decompression-bomb check reads only the header."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def test_bad_requests_get_openai_errors_and_others_go_on(server, files, local):
    image = files["images"][2]
    good = {"model": "tiny", "messages": messages(data_url(image), PROMPTS[2]), "max_tokens": MAX_TOKENS}
    bomb = "data:image/png;base64," + base64.b64encode(_png_header_only(14000, 14000)).decode()
    bad = [  # (body, status, param or None, words in the message)
        ("{not json", 400, None, "not valid JSON"),
        (good | {"messages": [{"role": "user", "content": "no image here"}]}, 400, "messages", "no image"),
        (good | {"messages": messages("data:image/png;base64,@@@", None)}, 400, "messages", "base64"),
        (good | {"messages": messages("data:image/png;base64,aGVsbG8=", None)}, 400, "messages", "cannot read image"),
        (good | {"messages": messages(bomb, None)}, 400, "messages", "too large to decode safely"),
        (good | {"messages": messages("ftp://x/y.png", None)}, 400, "messages", "data: or http(s) URL"),
        (
            good | {"messages": [{"role": "system", "content": "be brief"}, *good["messages"]]},
            400,
            "messages",
            "no chat template",
        ),
        (good | {"messages": good["messages"] * 2}, 400, "messages", "2 images"),
        (good | {"max_tokens": 600}, 400, "max_tokens", "512 positions"),
        (good | {"max_tokens": 500}, 400, "max_tokens", "max_len=480"),
        (good | {"max_tokens": -1}, 400, "max_tokens", "greater than or equal to 1"),
        (good | {"threshold": 1.5}, 400, "threshold", "less than or equal to 1"),
        (good | {"model": "gpt-4o"}, 404, "model", "'gpt-4o' is not served here"),
        (good | {"n": 2}, 400, "n", "one answer per request"),
        (good | {"logprobs": True}, 400, "logprobs", "unsupported parameter"),
        (good | {"mode": "speculative"}, 400, "mode", "mode='speculative' is not supported"),
        (good | {"temperature": 0.7, "seed": -1}, 400, "seed", "seed must be an integer"),
        (good | {"temperature": 2.5}, 400, "temperature", "less than or equal to 2"),
        ({"model": "tiny"}, 400, "messages", "missing"),
    ]

    async def run():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            answer = asyncio.create_task(client.post("/v1/chat/completions", json=good))
            refusals = [
                client.post(
                    "/v1/chat/completions",
                    content=b if isinstance(b, str) else json.dumps(b),
                    headers={"content-type": "application/json"},
                )
                for b, *_ in bad
            ]
            return await answer, await asyncio.gather(*refusals)

    answer, refusals = asyncio.run(run())
    for (_, status, param, words), response in zip(bad, refusals):
        error = response.json()["error"]
        assert response.status_code == status, (words, response.text)
        assert set(error) == {"message", "type", "param", "code"} and words in error["message"], error
        assert error["param"] == param, error
    assert answer.status_code == 200
    assert answer.json()["choices"][0]["message"]["content"] == expected(local, image, PROMPTS[2])[0]


class ImageHandler(http.server.BaseHTTPRequestHandler):
    """Serves /ok.png (an image), /big.png (over the server's cap) and 404 for anything else."""

    files: typing.ClassVar[dict[str, bytes]] = {}

    def do_GET(self):
        body = self.files.get(self.path)
        self.send_response(200 if body is not None else 404)
        self.end_headers()
        self.wfile.write(body or b"")

    def log_message(self, *args):
        pass


def test_image_urls_fetched_on_loopback_or_refused(server, small_server, files, local):
    image = files["images"][0]
    ImageHandler.files = {"/ok.png": image.read_bytes(), "/big.png": b"\0" * (21 * 2**20)}
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), ImageHandler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        client = server.client()
        out = client.chat.completions.create(model="tiny", messages=messages(f"{base}/ok.png", PROMPTS[0]))
        assert out.choices[0].message.content == expected(local, image, PROMPTS[0])[0]
        for path, words in [("/big.png", "over 20971520 bytes"), ("/missing.png", "HTTP 404")]:
            with pytest.raises(openai.BadRequestError, match=words):
                client.chat.completions.create(model="tiny", messages=messages(base + path, PROMPTS[0]))
        with pytest.raises(openai.BadRequestError, match="does not fetch image URLs"):
            small_server.client().chat.completions.create(model="tiny", messages=messages(f"{base}/ok.png", "a"))
    finally:
        httpd.shutdown()


def scheduler_processes(server: Server) -> list[int]:
    """The server's child processes that multiprocessing spawned (its scheduler's; not the resource tracker)."""
    pid = server.process.pid
    children = [int(c) for task in Path(f"/proc/{pid}/task").iterdir() for c in (task / "children").read_text().split()]
    return [c for c in children if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_each_server_decodes_where_it_was_told(server, small_server, files):
    """By default the scheduler's process decodes (the CPU of a long answer is spent there, not in the server's
    process); with --scheduler-thread there is no such process."""
    body = {"model": "tiny", "messages": messages(data_url(files["images"][0]), PROMPTS[0]), "max_tokens": LONG}
    [child] = scheduler_processes(server)
    before = cpu_seconds(child), cpu_seconds(server.process.pid)
    answer = httpx.post(f"{server.url}/v1/chat/completions", json=body | {"threshold": 1.0}, timeout=60).json()
    child_cpu, app_cpu = cpu_seconds(child) - before[0], cpu_seconds(server.process.pid) - before[1]
    assert len(answer["freevlm"]["exit_layers"]) > 100 and child_cpu > 2 * app_cpu, (child_cpu, app_cpu)
    assert scheduler_processes(small_server) == []


def test_client_disconnect_frees_its_row(server, files):
    cancelled = server.metric('freevlm_requests_total{outcome="cancelled"}')
    body = {"model": "tiny", "messages": messages(data_url(files["images"][0]), PROMPTS[0]), "max_tokens": LONG}
    with (
        httpx.Client(base_url=server.url, timeout=30) as client,
        client.stream("POST", "/v1/chat/completions", json=body | {"stream": True, "threshold": 1.0}) as response,
    ):
        lines = response.iter_lines()
        assert '"tokens"' in first_token(lines)
        assert httpx.get(f"{server.url}/health").json()["running"] == 1
    server.wait_idle()
    assert server.metric('freevlm_requests_total{outcome="cancelled"}') == cancelled + 1


def test_full_queue_429_and_timeouts(small_server, files):
    """One row and one waiting place: while a long request holds the row, of five more sent at once one waits and
    four are refused at once with 429. The waiting one cannot finish within the 0.8 s timeout: it waits for the row,
    then needs as long again (LONG tokens take well over 0.4 s: ~2 ms each even on an idle CPU), so it gets 504."""
    body = {"model": "tiny", "messages": messages(data_url(files["images"][0]), PROMPTS[0]), "max_tokens": LONG}

    async def burst():
        async with httpx.AsyncClient(base_url=small_server.url, timeout=30) as client:
            first = asyncio.create_task(client.post("/v1/chat/completions", json=body))
            while (await client.get("/health")).json()["running"] == 0:  # the row is taken: the queue is empty
                await asyncio.sleep(0.005)
            rest = await asyncio.gather(*[client.post("/v1/chat/completions", json=body) for _ in range(5)])
            return [await first, *rest]

    responses = asyncio.run(burst())
    statuses = sorted(r.status_code for r in responses)
    assert statuses.count(429) == 4 and statuses.count(504) >= 1 and set(statuses) <= {200, 429, 504}, statuses
    for response in responses:
        if response.status_code == 429:
            error = response.json()["error"]
            assert response.headers["retry-after"] == "1" and error["type"] == "rate_limit_error"
        elif response.status_code == 504:
            error = response.json()["error"]
            assert error["type"] == "timeout" and "0.8 s" in error["message"]
    small_server.wait_idle()

    async def stream_behind_another():  # a stream that times out ends with an error event, then [DONE]
        async with (
            httpx.AsyncClient(base_url=small_server.url, timeout=30) as client,
            client.stream("POST", "/v1/chat/completions", json=body | {"stream": True}) as first,
        ):
            async for line in first.aiter_lines():  # its first token: it holds the row, the queue is empty
                if '"tokens"' in line:
                    break
            return (await client.post("/v1/chat/completions", json=body | {"stream": True})).text

    events = asyncio.run(stream_behind_another()).split("\n\n")
    assert '"type": "timeout"' in events[-3] and events[-2] == "data: [DONE]", events[-3:]


@pytest.mark.parametrize("which", [0, 1], ids=["scheduler-process", "scheduler-thread"])
def test_metrics(servers, which, files):
    """Each counter moves by exactly what one answer and one refusal give it (the module's servers have answered
    others before: the test reads every metric before and after), whether the scheduler decodes in a process of
    its own (its counts relayed) or in a thread of the server's."""
    server = servers[which]
    body = {
        "model": "tiny",
        "messages": messages(data_url(files["images"][0]), PROMPTS[0]),
        "max_tokens": 4,
        "threshold": 0.0,
    }
    server.wait_idle()
    names = (
        'freevlm_requests_total{outcome="success"}',
        'freevlm_requests_total{outcome="invalid"}',
        "freevlm_prompt_tokens_total",
        "freevlm_completion_tokens_total",
        'freevlm_exit_layer_bucket{le="1.0"}',
        "freevlm_exit_layer_count",
        "freevlm_layers_per_token_count",
        "freevlm_time_to_first_token_seconds_count",
        "freevlm_time_per_output_token_seconds_count",
    )
    before = {name: server.metric(name) for name in names}  # 0 where none was counted yet
    work_names = ("decode_steps", "decode_rows", "layer_calls", "slot_layers")
    before_work = {f"freevlm_{name}_total": server.metric(f"freevlm_{name}_total") for name in work_names}
    answer = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)
    assert answer.status_code == 200
    assert httpx.post(f"{server.url}/v1/chat/completions", json={"model": "tiny"}, timeout=60).status_code == 400
    server.wait_idle()
    text = httpx.get(f"{server.url}/metrics").text
    for name in (*names, "freevlm_requests_running", "freevlm_requests_waiting"):
        assert re.search(rf"^{re.escape(name)} ", text, re.M), name
    usage, layers = answer.json()["usage"], answer.json()["freevlm"]["exit_layers"]
    assert usage["completion_tokens"] == len(layers) > 1
    expected = {
        'freevlm_requests_total{outcome="success"}': 1,
        'freevlm_requests_total{outcome="invalid"}': 1,
        "freevlm_prompt_tokens_total": usage["prompt_tokens"],
        "freevlm_completion_tokens_total": usage["completion_tokens"],
        'freevlm_exit_layer_bucket{le="1.0"}': sum(layer <= 1 for layer in layers),
        "freevlm_exit_layer_count": len(layers),
        "freevlm_layers_per_token_count": 1,
        "freevlm_time_to_first_token_seconds_count": 1,
        "freevlm_time_per_output_token_seconds_count": 1,
    }
    assert {name: server.metric(name) - before[name] for name in names} == expected
    assert server.metric("freevlm_requests_running") == server.metric("freevlm_requests_waiting") == 0
    # the decode steps' work: one row, a step for each token after the first (its prompt's window gave that one);
    # at threshold 0 every token leaves at the first exit, so a step runs the layers below it and its exit layer
    exit_at = layers[0]
    assert set(layers) == {exit_at}
    steps = len(layers) - 1
    work = {name: server.metric(name) - before_work[name] for name in before_work}
    assert work == {
        "freevlm_decode_steps_total": steps,
        "freevlm_decode_rows_total": steps,
        "freevlm_layer_calls_total": steps * (exit_at + 1),
        "freevlm_slot_layers_total": steps * (exit_at + 1),
    }


def test_sigterm_drains_running_requests_then_exits_0(server, files):
    """Last in the module: it stops the module's server."""
    [scheduler] = scheduler_processes(server)
    body = {"model": "tiny", "messages": messages(data_url(files["images"][0]), PROMPTS[0]), "max_tokens": LONG}
    with (
        httpx.Client(base_url=server.url, timeout=30) as client,
        client.stream("POST", "/v1/chat/completions", json=body | {"stream": True, "threshold": 1.0}) as response,
    ):
        lines = response.iter_lines()
        assert '"tokens"' in first_token(lines)
        server.process.send_signal(signal.SIGTERM)
        rest = [line for line in lines if line]
    assert rest[-1] == "data: [DONE]"
    final = json.loads(rest[-2].removeprefix("data: "))
    assert final["choices"][0]["finish_reason"] in ("stop", "length") and len(final["freevlm"]["exit_layers"]) > 1
    assert server.process.wait(30) == 0
    assert not Path(f"/proc/{scheduler}").exists()  # the scheduler's process ended with the server
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{server.url}/health")
