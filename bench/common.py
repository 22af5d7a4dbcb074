"""Shared by the benchmarks: a BLIP-2 with a real-sized OPT LM (random weights) and interleaved timing."""

from __future__ import annotations

import statistics
import time

import torch

from freevlm.tiny import tiny_blip2, tiny_inputs

# OPT sizes (layers, hidden, heads); OPT-2.7B is the language model of BLIP-2's smaller OPT checkpoint.
PRESETS = {"opt-350m": (24, 1024, 16), "opt-1.3b": (24, 2048, 32), "opt-2.7b": (32, 2560, 32)}


def big_blip2(
    num_layers: int = 24, hidden_size: int = 1024, vocab_size: int = 50272, family: str = "opt", num_heads: int = 16
):
    """A random OPT LM of a real size (default OPT-350m's 24 x 1024) with OPT's vocabulary, behind a tiny vision
    path; EOS disabled so every run generates the same number of tokens."""
    model = tiny_blip2(
        family, num_layers=num_layers, hidden_size=hidden_size, vocab_size=vocab_size, num_heads=num_heads,
        num_query_tokens=32,
    )  # fmt: skip
    for cfg in (model.generation_config, model.language_model.generation_config):
        cfg.eos_token_id = None
    return model


def inputs(model, batch: int = 1, prompt_len: int = 8, seed: int = 0):
    return tiny_inputs(model, batch=batch, prompt_len=prompt_len, seed=seed)


def interleaved(runs: dict, repeats: int) -> dict:
    """Median seconds of each run, measured round-robin so machine drift hits all of them alike.

    A run returns its own measured seconds as a float (e.g. decode-only); anything else means "time me whole".
    """
    times: dict[str, list[float]] = {name: [] for name in runs}
    for name, fn in runs.items():  # warm-up
        fn()
    for _ in range(repeats):
        for name, fn in runs.items():
            start = time.perf_counter()
            measured = fn()
            times[name].append(measured if isinstance(measured, float) else time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def setup_threads() -> None:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    torch.manual_seed(0)
