"""Shared by the benchmarks: a BLIP-2 with a real-sized LM (random weights) and interleaved timing."""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

from freevlm.decoding.policies import ExitPolicy
from freevlm.tiny import tiny_blip2, tiny_inputs, tiny_llava

# LM sizes: (family, layers, hidden, heads, vocabulary). OPT-2.7B and FlanT5-XL are the LMs of BLIP-2's smaller
# checkpoints; "tiny" checks a benchmark end to end in seconds.
PRESETS = {
    "tiny": ("opt", 4, 64, 4, 1000),
    "tiny-t5": ("t5", 4, 64, 4, 1000),
    "opt-demo": ("opt", 12, 256, 4, 100),  # the size of `freevlm demo`'s LM (its vocabulary is ~90 words)
    "t5-demo": ("t5", 12, 256, 4, 100),
    "llama-demo": ("llama", 12, 256, 4, 100),  # the demo's size with a Llama LM (grouped-query attention, rotary)
    "opt-350m": ("opt", 24, 1024, 16, 50272),
    "opt-1.3b": ("opt", 24, 2048, 32, 50272),
    "opt-2.7b": ("opt", 32, 2560, 32, 50272),
    "opt-6.7b": ("opt", 32, 4096, 32, 50272),
    "t5-large": ("t5", 24, 1024, 16, 32128),
    "flant5-xl": ("t5", 24, 2048, 32, 32128),
}


def big_blip2(preset: str = "opt-350m", dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """A random LM of a real size with its real vocabulary, behind a tiny vision path (a BLIP-2's; a LLaVA's for
    the Llama preset); EOS disabled so every run generates the same number of tokens."""
    family, num_layers, hidden_size, num_heads, vocab_size = PRESETS[preset]
    sizes = dict(num_layers=num_layers, hidden_size=hidden_size, vocab_size=vocab_size, num_heads=num_heads)
    with torch.device(device):  # built and initialised where it runs: billions of random weights in seconds on a GPU
        if family == "llama":  # a LLaVA: 16 image tokens (32 px, patches of 8), K/V heads half the query heads
            model = tiny_llava("llama", image_size=32, num_kv_heads=max(1, num_heads // 2), **sizes)
        else:
            model = tiny_blip2(family, num_query_tokens=32, **sizes)
    lm = getattr(model, "language_model", model)  # BLIP-2's LM has a generation config of its own
    for cfg in (model.generation_config, lm.generation_config):
        cfg.eos_token_id = None
    return model.to(device=device, dtype=dtype)


def inputs(model, batch: int = 1, prompt_len: int = 8, seed: int = 0):
    device, dtype = model.device, model.dtype
    pv, ids, mask = tiny_inputs(model, batch=batch, prompt_len=prompt_len, seed=seed)
    return pv.to(device, dtype), ids.to(device), mask.to(device)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def interleaved(runs: dict, repeats: int, stat: str = "median") -> dict:
    """Median (or `stat="min"`) seconds of each run, measured round-robin so machine drift hits all of them alike,
    in a new order each round (seeded) so that no run always follows the same one.

    A run returns its own measured seconds as a float (e.g. decode-only); anything else means "time me whole".
    """
    times: dict[str, list[float]] = {name: [] for name in runs}
    for fn in runs.values():  # warm-up (and CUDA graph capture)
        fn()
    order, shuffle = list(runs.items()), random.Random(0).shuffle
    for _ in range(repeats):
        shuffle(order)
        for name, fn in order:
            sync()
            start = time.perf_counter()
            measured = fn()
            sync()
            times[name].append(measured if isinstance(measured, float) else time.perf_counter() - start)
    summary = min if stat == "min" else statistics.median
    return {name: summary(ts) for name, ts in times.items()}


def setup_threads() -> None:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    torch.manual_seed(0)


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """--preset, --device, --dtype: the LM a benchmark builds with `big_blip2`."""
    parser.add_argument("--preset", choices=sorted(PRESETS), default="opt-350m", help="LM size")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")


def add_timing_args(parser: argparse.ArgumentParser, repeats: int) -> None:
    """--repeats and --stat, what `interleaved` takes."""
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument(
        "--stat",
        choices=["min", "median"],
        default="min",
        help="per run over the repeats (min: what the code costs; on a shared machine other work only ever adds time)",
    )


def bandwidth_floor_seconds(model, device: str) -> tuple[float, float]:
    """(seconds to read the LM's weights once, measured bytes/s): the floor of a weight-bound decode step.

    The bandwidth is measured here, by copying a buffer of the weights' size on the device."""
    lm = getattr(model, "language_model", None) or model.model.language_model  # BLIP-2's LM; LLaVA's decoder
    embeddings, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    weight_bytes = sum(p.numel() * p.element_size() for p in lm.parameters() if p is not embeddings and p is not head)
    weight_bytes += head.numel() * head.element_size()
    size = min(max(weight_bytes, 2**28), 2**30) // 4  # large enough to measure bandwidth, not call overhead
    src = torch.empty(size, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    sync()
    start, reps = time.perf_counter(), 5
    for _ in range(reps):
        dst.copy_(src)
    sync()
    bytes_per_s = 2 * src.numel() * 4 * reps / (time.perf_counter() - start)  # a copy reads and writes
    return weight_bytes / bytes_per_s, bytes_per_s


class HalfAtMiddle(ExitPolicy):
    """Each row's token leaves at `layer` with probability 1/2 (seeded per run, so every run sees the same)."""

    def __init__(self, layer: int, seed: int = 0):
        self.layer, self.gen = layer, torch.Generator().manual_seed(seed)

    def live_exits(self, exit_layers):
        return [self.layer]

    def decide(self, layer, logits, step, rows, hidden=None):
        return (torch.rand(len(rows), generator=self.gen) < 0.5).to(rows.device)
