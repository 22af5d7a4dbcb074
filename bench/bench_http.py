"""`freevlm serve` under load: the official `openai` async client against a server on loopback, at 1, 4, 16 and 64
concurrent clients, early exits and threshold 1.0 side by side, and the library's scheduler on the same workload in
this process, so the HTTP layer's cost is a ratio measured in one run.

    cd bench && PYTHONPATH=.. python bench_http.py [--concurrency 1 4 16 64] [--threshold 0.6] [--seconds 60]

What each side of the comparison at 16 concurrent does for a request:
- HTTP (the server's processes): read the request (HTTP, JSON, pydantic), base64-decode its PNG, decode the image
  and make the model's inputs (processor, tokenizer), send them to the scheduler's process, which submits them to
  its `Scheduler` and decodes them with the others, and send a server-sent event per token (the text delta and exit
  layer, as JSON) and the summary at the end (`--plain`: the whole answer at once, the event loop woken at its end
  only); `--compare-thread` adds a second server that decodes in a thread of its one process (`freevlm serve
  --scheduler-thread`), taking turns with the first and the library;
- library, like for like (this process): decode the same PNG bytes and make the inputs with the same processor
  and prompt, submit them to a `Scheduler` with the same options, and step it;
- library, inputs ready (as bench_serving.py does): the same with every request's inputs made before the clock.
So HTTP / like-for-like is what HTTP costs; HTTP / inputs ready adds what making a request's inputs costs. The two
sides take turns (--repeats times each, for each threshold), so that both see the same machine load; each side's
tokens per CPU second is its total over its turns.

The model is the demo's (`freevlm demo`'s trained backbone and FREE's exits, from FREEVLM_CACHE or the default
cache, served as `freevlm serve` alone serves it) captioning the demo's test images after its prompt, EOS on;
without a cache, the demo's architecture with random weights and exits, saved to a temporary folder (its answers
run to --max-tokens). Each client sends streamed requests one after another; a level stops after --requests
requests or --seconds, whichever comes first. As vLLM's benchmark_serving.py warms up before it times, the first
--warmup requests of each level (default one per client: the burst of every client at once into an idle server)
are sent and left out of the TTFT and latency percentiles; they are printed apart, and with the others, so nothing
is hidden (their tokens count in tokens/s). --ramp-up-s starts the HTTP clients one by one. Printed per level:
output tokens/s, time to first token and end-to-end latency p50/p99, errors, mean exit layer; then the goals
(HTTP tokens/s at 16 concurrent within 10% of the library's; no errors at 64 concurrent with a queue of 64; p99
TTFT at 16 concurrent <= 3x its p50).

Throughput is printed per wall-clock second (what users see: the goal's tokens/s) and per CPU second of the
processes that serve (the server's two, its scheduler's included, read from /proc, with its event loop's share: the
main thread's; this process's for the library): on a machine shared with other jobs the wall clock of a busy second
varies several-fold between runs, CPU seconds far less; and a server whose scheduler has a process of its own is
faster in wall-clock time only while a second core is free for its HTTP work (the benchmark's clients take CPU too).
Both use --threads PyTorch threads (default 1). The server's CPU is split by thread, so that a gap can be placed: the
event loop (HTTP, JSON, streaming), the scheduler's thread (the busiest other one: decoding, as the library's loop
does in this process's main thread) and the rest (the worker that makes inputs, which the library does too, and the
threads that talk to the scheduler's process).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai
import torch

from freevlm.data import shapes
from freevlm.demo.config import DemoConfig, default_cache
from freevlm.eval.evaluate import CAPTION_PROMPT
from freevlm.server.config import ServerConfig

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Level:
    tokens: int
    wall: float
    cpu: float  # seconds of CPU the decoding process spent
    ttft: list[float]
    latency: list[float]
    errors: int
    exit_layers: list[int]
    loop_cpu: float | None = None  # of `cpu`, the server's main thread's: its event loop (HTTP levels)
    decode_cpu: float | None = None  # of `cpu`, the server's busiest other thread's: the scheduler's (HTTP levels)
    burst_ttft: list[float] = field(default_factory=list)  # the warm-up requests' (the first burst), not in `ttft`

    @property
    def decode_tokens_per_cpu_second(self) -> float:
        """Tokens per CPU second of the server's scheduler thread alone (HTTP levels)."""
        return self.tokens / self.decode_cpu if self.decode_cpu else float("nan")

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.wall

    @property
    def tokens_per_cpu_second(self) -> float:
        return self.tokens / self.cpu if self.cpu else float("nan")


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def images(count: int) -> list[bytes]:
    out = []
    for i in range(count):
        buffer = io.BytesIO()
        shapes.render(shapes.make_example("test", i % DemoConfig.test_images).scene).save(buffer, format="PNG")
        out.append(buffer.getvalue())
    return out


def model_folders(tmp: Path) -> tuple[list[str], str]:
    """`freevlm serve` arguments for the model, and its name: the demo's cache, or a random demo-sized model."""
    from freevlm.demo.train import trained_model

    for cfg in (DemoConfig(), DemoConfig.quick_config()):
        if trained_model(cfg) is not None:
            return [], f"the demo's trained model (cache {default_cache()})"
    from freevlm import EarlyExitVLM, ExitConfig
    from freevlm.demo.backbone import build_backbone, save_backbone

    bundle = build_backbone("opt")
    save_backbone(bundle, tmp / "backbone")
    EarlyExitVLM(bundle.model, ExitConfig(list(DemoConfig.exit_layers))).save_exits(tmp / "exits")
    args = ["--backbone", str(tmp / "backbone"), "--exits", str(tmp / "exits"), "--name", "freevlm-demo"]
    return args, "a random model of the demo's architecture (no demo cache)"


def process_tree(pid: int) -> list[int]:
    """A process and its descendants (the server's: its scheduler's process, multiprocessing's resource tracker)."""
    children = [
        int(child) for task in Path(f"/proc/{pid}/task").iterdir() for child in (task / "children").read_text().split()
    ]
    return [pid, *(p for child in children for p in process_tree(child))]


def thread_cpu_seconds(pid: int) -> dict[int, float]:
    """CPU seconds of each thread of a process and its descendants, by thread id."""
    return {
        int(task.name): cpu_seconds(process, int(task.name))
        for process in process_tree(pid)
        for task in Path(f"/proc/{process}/task").iterdir()
    }


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of a process and its descendants (the threads that ended too)."""
    return sum(cpu_seconds(process) for process in process_tree(pid))


def cpu_seconds(pid: int, thread: int | None = None) -> float:
    """User + system CPU seconds of a process, or of one of its threads, from /proc (Linux)."""
    stat = Path(f"/proc/{pid}/stat" if thread is None else f"/proc/{pid}/task/{thread}/stat")
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Server:
    def __init__(self, model_args: list[str], args: argparse.Namespace, *options: str):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONPATH=str(ROOT))
        command = [sys.executable, "-m", "freevlm.cli", "serve", *model_args, "--port", str(self.port)]
        command += ["--max-batch", str(args.max_batch), "--max-queue", str(args.max_queue), "--max-len", "128"]
        command += ["--max-tokens", str(args.max_tokens), "--prefill-chunk", str(args.prefill_chunk), *options]
        self.process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"the server exited with {self.process.returncode}: run `freevlm serve` to see why")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    self.model = httpx.get(f"{self.url}/v1/models").json()["data"][0]["id"]
                    return
            except httpx.HTTPError:
                time.sleep(0.5)
        raise SystemExit("the server did not start within 300 s")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(60)


async def http_level(server: Server, urls: list[str], concurrency: int, threshold: float, args) -> Level:
    client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=120)
    warmup = concurrency if args.warmup is None else args.warmup
    count = warmup + min(args.requests, max(16, 4 * concurrency))
    start, stop_at = time.perf_counter(), time.perf_counter() + args.seconds
    next_index, ttft, burst_ttft, latency, layers, tokens, errors = 0, [], [], [], [], 0, 0

    async def one(i: int) -> None:
        nonlocal tokens, errors
        t0 = time.perf_counter()
        first = None
        try:
            answer = await client.chat.completions.create(
                model=server.model,
                messages=[
                    {
                        "role": "user",
                        "content": [
                            {"type": "image_url", "image_url": {"url": urls[i % len(urls)]}},
                            {"type": "text", "text": CAPTION_PROMPT},
                        ],
                    }
                ],
                max_tokens=args.max_tokens,
                stream=not args.plain,
                extra_body={"threshold": threshold},
            )
            if args.plain:  # no first token to time: the whole answer at once
                layers.extend(answer.freevlm["exit_layers"])
                tokens += len(answer.freevlm["exit_layers"])
            else:
                async for chunk in answer:
                    made = (getattr(chunk, "freevlm", None) or {}).get("tokens")
                    if made and first is None:
                        first = time.perf_counter() - t0
                    if chunk.choices and chunk.choices[0].finish_reason is not None:
                        layers.extend(chunk.freevlm["exit_layers"])
                        tokens += len(chunk.freevlm["exit_layers"])
        except openai.APIError:
            errors += 1
            return
        if i < warmup:
            burst_ttft.append(first if first is not None else float("nan"))
            return
        ttft.append(first if first is not None else float("nan"))
        latency.append(time.perf_counter() - t0)

    async def client_loop(k: int) -> None:
        nonlocal next_index
        await asyncio.sleep(args.ramp_up_s * k / concurrency)
        while next_index < count and time.perf_counter() < stop_at:
            i, next_index = next_index, next_index + 1
            await one(i)

    pid = server.process.pid
    cpu0, threads0 = tree_cpu_seconds(pid), thread_cpu_seconds(pid)  # uvicorn's event loop: the main thread
    await asyncio.gather(*[client_loop(k) for k in range(concurrency)])
    wall = time.perf_counter() - start
    await client.close()
    cpu, threads = tree_cpu_seconds(pid) - cpu0, thread_cpu_seconds(pid)
    spent = {thread: seconds - threads0.get(thread, 0.0) for thread, seconds in threads.items()}
    loop_cpu = spent.pop(pid)
    decode_cpu = max(spent.values(), default=None)  # the scheduler's thread decodes: by far the busiest
    return Level(tokens, wall, cpu, ttft, latency, errors, layers, loop_cpu, decode_cpu, burst_ttft)


def library_level(
    model, pictures: list, concurrency: int, threshold: float, args, prepare: bool, threaded: bool = False
) -> Level:
    """The same requests straight into a `Scheduler` in this process, `concurrency` always in flight; each one's
    inputs made from its PNG bytes at submission, as the server makes them (`prepare`), or beforehand, as the
    library benchmark (bench_serving.py) does. The scheduler steps in this thread, or (`threaded`) in its own
    thread (`Scheduler.start`, as the server runs it) while this one submits and waits."""
    import threading

    from freevlm.data.images import decode_image
    from freevlm.serving import Scheduler

    def make(picture: bytes) -> dict:
        return model.bundle.inputs([decode_image(picture, "bench")], [CAPTION_PROMPT])

    inputs = pictures if prepare else [make(p) for p in pictures]
    scheduler = Scheduler(
        model.ee, max_batch=args.max_batch, max_len=128, max_waiting=args.max_queue, prefill_chunk=args.prefill_chunk
    )
    warmup = concurrency if args.warmup is None else args.warmup
    count = warmup + min(args.requests, max(16, 4 * concurrency))
    start, cpu0 = time.perf_counter(), time.process_time()
    live, submitted, sent, finished = [], [], 0, threading.Event()
    if threaded:
        scheduler.start()
    while sent < count or live:
        while sent < count and len(live) < concurrency and time.perf_counter() - start < args.seconds:
            x = make(inputs[sent % len(inputs)]) if prepare else inputs[sent % len(inputs)]
            options = dict(max_new_tokens=args.max_tokens, threshold=threshold)
            live.append(scheduler.submit(x["pixel_values"], x["input_ids"], x["attention_mask"], **options))
            live[-1].watch(lambda handle=live[-1]: handle.done and finished.set())
            submitted.append(live[-1])
            sent += 1
        if not live:
            break
        if threaded:
            finished.wait()
            finished.clear()
        else:
            scheduler.step()
        live = [h for h in live if not h.done]
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu0
    scheduler.stop()
    results = [h.result() for h in submitted]
    ttft = [r.time_to_first_token for r in results[warmup:]]
    latency = [r.finished - r.submitted for r in results[warmup:]]
    layers = [layer for r in results for layer in r.exit_layers]
    burst = [r.time_to_first_token for r in results[:warmup]]
    return Level(len(layers), wall, cpu, ttft, latency, 0, layers, None, None, burst)


def pooled(levels: list[Level]) -> Level:
    """One level from several turns of the same workload: totals, and every request's times."""
    return Level(
        sum(level.tokens for level in levels),
        sum(level.wall for level in levels),
        sum(level.cpu for level in levels),
        [t for level in levels for t in level.ttft],
        [t for level in levels for t in level.latency],
        sum(level.errors for level in levels),
        [layer for level in levels for layer in level.exit_layers],
        None if levels[0].loop_cpu is None else sum(level.loop_cpu for level in levels),
        None if levels[0].decode_cpu is None else sum(level.decode_cpu for level in levels),
        [t for level in levels for t in level.burst_ttft],
    )


def show(label: str, level: Level) -> None:
    mean_layer = statistics.mean(level.exit_layers) if level.exit_layers else float("nan")
    everyone = level.burst_ttft + level.ttft
    print(
        f"  {label:40s} {level.tokens_per_second:7.1f} tok/s {level.tokens_per_cpu_second:7.1f} tok/CPU-s"
        f"  TTFT p50 {percentile(level.ttft, 0.5):6.3f} p99 {percentile(level.ttft, 0.99):6.3f} s"
        f"  latency p50 {percentile(level.latency, 0.5):6.3f} p99 {percentile(level.latency, 0.99):6.3f} s"
        f"  errors {level.errors}  requests {len(level.latency)}  exit layer {mean_layer:5.2f}"
        + (f"  event loop {level.loop_cpu / level.cpu:.0%} of the CPU" if level.loop_cpu and level.cpu else "")
        + (
            f", scheduler's thread {level.decode_cpu / level.cpu:.0%}"
            f" ({level.decode_tokens_per_cpu_second:.1f} tok/CPU-s)"
            if level.decode_cpu and level.cpu
            else ""
        )
        + f"\n  {'':40s} with the {len(level.burst_ttft)} warm-up requests: TTFT p50 {percentile(everyone, 0.5):6.3f}"
        f" p99 {percentile(everyone, 0.99):6.3f} s (theirs: max {max(level.burst_ttft, default=float('nan')):6.3f} s)",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--threshold", type=float, default=0.6, help="the early-exit threshold (and 1.0 beside it)")
    parser.add_argument("--requests", type=int, default=128, help="per level at most (and at least 4 per client)")
    parser.add_argument("--seconds", type=float, default=60, help="per level at most")
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--max-queue", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=DemoConfig.max_new_tokens)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--prefill-chunk", type=int, default=ServerConfig.prefill_chunk, help="as freevlm serve's")
    parser.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="the first N requests of each level (default: one per client, the burst that meets an idle server) "
        "are sent and left out of the TTFT and latency figures (printed apart); their tokens still count",
    )
    parser.add_argument(
        "--ramp-up-s", type=float, default=0.0, help="HTTP clients start one by one over this many seconds"
    )
    parser.add_argument("--repeats", type=int, default=2, help="turns of HTTP and the library each at 16 concurrent")
    parser.add_argument(
        "--compare-thread",
        action="store_true",
        help="at 16 concurrent, a second server decoding in a thread of its process (--scheduler-thread) takes turns "
        "with the first (its scheduler in a process of its own) and the library",
    )
    parser.add_argument(
        "--plain", action="store_true", help="HTTP clients ask for plain answers, not streams (no TTFT over HTTP)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="bench_http-"))
    model_args, name = model_folders(tmp)
    picture_bytes = images(32)
    urls = ["data:image/png;base64," + base64.b64encode(b).decode() for b in picture_bytes]
    print(
        f"{name}; max batch {args.max_batch}, queue {args.max_queue}, prefill chunk {args.prefill_chunk}, "
        f"{args.max_tokens} tokens at most, "
        f"{args.threads} thread(s), levels {args.concurrency}, <= {args.requests} requests / {args.seconds:g} s each"
        f"\nwarm-up: the first {'request of each client' if args.warmup is None else f'{args.warmup} requests'} of "
        f"each level are left out of TTFT and latency (shown apart); HTTP clients ramp up over {args.ramp_up_s:g} s"
    )
    library = None
    if 16 in args.concurrency:  # the library's scheduler on the same requests, in this process
        from freevlm.commands.serve import load_served_model

        folders = dict(zip(["backbone", "exits"], model_args[1:4:2])) if model_args else {}
        model = load_served_model(
            argparse.Namespace(**{"backbone": None, "exits": None, **folders}, name=None, device="cpu")
        )
        library = (model, picture_bytes)
    server = Server(model_args, args)
    threaded = (
        Server(model_args, args, "--scheduler-thread") if args.compare_thread and 16 in args.concurrency else None
    )
    results = {}
    try:
        for concurrency in args.concurrency:
            print(f"\n{concurrency} concurrent client(s)")
            for threshold in (args.threshold, 1.0):
                if concurrency != 16:
                    level = asyncio.run(http_level(server, urls, concurrency, threshold, args))
                    results[("http", concurrency, threshold)] = level
                    show(f"HTTP, threshold {threshold:g}", level)
                    continue
                turns = {"http": [], "like for like": []} | ({"http, scheduler thread": []} if threaded else {})
                for _ in range(args.repeats):  # taking turns, so that all sides see the same machine load
                    turns["http"].append(asyncio.run(http_level(server, urls, 16, threshold, args)))
                    show(f"HTTP, threshold {threshold:g}", turns["http"][-1])
                    if threaded:
                        turns["http, scheduler thread"].append(
                            asyncio.run(http_level(threaded, urls, 16, threshold, args))
                        )
                        show(f"HTTP, scheduler thread, threshold {threshold:g}", turns["http, scheduler thread"][-1])
                    turns["like for like"].append(library_level(*library, 16, threshold, args, prepare=True))
                    show(f"library, like for like, threshold {threshold:g}", turns["like for like"][-1])
                turns["inputs ready"] = [library_level(*library, 16, threshold, args, prepare=False)]
                show(f"library, inputs ready, threshold {threshold:g}", turns["inputs ready"][-1])
                turns["in a thread"] = [library_level(*library, 16, threshold, args, prepare=False, threaded=True)]
                show(f"library, inputs ready, in a thread, thr. {threshold:g}", turns["in a thread"][-1])
                for side, levels in turns.items():
                    results[(side, 16, threshold)] = pooled(levels)
                    if len(levels) > 1:
                        show(f"{side}, all turns, threshold {threshold:g}", results[(side, 16, threshold)])
    finally:
        server.stop()
        if threaded:
            threaded.stop()
    print("\ngoals")
    if 16 in args.concurrency:
        for threshold in (args.threshold, 1.0):
            http, same, ready, thread = (
                results[(side, 16, threshold)] for side in ("http", "like for like", "inputs ready", "in a thread")
            )
            print(
                f"  HTTP / library tokens per wall-clock second at 16 concurrent, threshold {threshold:g}: "
                f"{http.tokens_per_second / same.tokens_per_second:.2f}x like for like (goal >= 0.90), "
                f"{http.tokens_per_second / ready.tokens_per_second:.2f}x against inputs ready; per CPU second "
                f"(the server's processes together): {http.tokens_per_cpu_second / same.tokens_per_cpu_second:.2f}x "
                f"like for like, {http.tokens_per_cpu_second / ready.tokens_per_cpu_second:.2f}x against inputs ready"
            )
            if threaded:
                one = results[("http, scheduler thread", 16, threshold)]
                print(
                    f"  the server with its scheduler in a thread (--scheduler-thread) / library like for like, "
                    f"threshold {threshold:g}: {one.tokens_per_second / same.tokens_per_second:.2f}x tokens per "
                    f"wall-clock second, {one.tokens_per_cpu_second / same.tokens_per_cpu_second:.2f}x per CPU second"
                )
            print(
                f"  the server's scheduler (its busiest thread) alone / library, inputs ready, tokens per CPU second, "
                f"threshold {threshold:g}: {http.decode_tokens_per_cpu_second / ready.tokens_per_cpu_second:.2f}x; "
                f"the library stepping in a thread of its own / in this one: "
                f"{thread.tokens_per_cpu_second / ready.tokens_per_cpu_second:.2f}x"
            )
            ratios = [percentile(r.ttft, 0.99) / percentile(r.ttft, 0.5) for r in (http, same)]
            everyone = [r.burst_ttft + r.ttft for r in (http, same)]
            cold = [percentile(t, 0.99) / percentile(t, 0.5) for t in everyone]
            print(
                f"  p99 / p50 TTFT at 16 concurrent, threshold {threshold:g}, after warm-up: {ratios[0]:.2f}"
                f" (goal <= 3; the library's like for like: {ratios[1]:.2f}); with the warm-up burst:"
                f" {cold[0]:.2f} (library {cold[1]:.2f})"
            )
        early, full = results[("http", 16, args.threshold)], results[("http", 16, 1.0)]
        print(
            f"  early exits / threshold 1.0 over HTTP at 16 concurrent: "
            f"{early.tokens_per_cpu_second / full.tokens_per_cpu_second:.2f}x tokens per CPU second"
        )
    if 64 in args.concurrency:
        errors = sum(results[("http", 64, t)].errors for t in (args.threshold, 1.0))
        print(f"  errors at 64 concurrent with a queue of {args.max_queue}: {errors} (goal 0)")


if __name__ == "__main__":
    main()
