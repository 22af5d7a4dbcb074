"""What sampling costs, measured side by side in one run.

1. `generate` at batch `--batch`, every layer (`mode="full"`), greedy against sampling (temperature alone; then
   temperature, top-k, top-p and a repetition penalty together): decode seconds per token and the ratio to greedy.
2. The token choice alone, as the scheduler makes it (`TokenChooser` with a generator per row), for `--batch` rows
   over the model's vocabulary: greedy rows, every row sampling at a temperature, and a mix (half the rows
   sampling with top-p, one with top-k, one with a penalty). The draw's noise is one `exponential_` per sampling
   row over the whole vocabulary (what `torch.multinomial` draws, so samples equal Hugging Face's).

    python bench/bench_sampling.py [--preset opt-350m] [--batch 8] [--tokens 16] [--repeats 3]
"""

from __future__ import annotations

import argparse

import torch
from common import add_model_args, add_timing_args, big_blip2, inputs, interleaved, setup_threads

from freevlm import EarlyExitVLM
from freevlm.decoding.config import DecodeConfig
from freevlm.decoding.sampling import TokenChooser

SAMPLING = {
    "greedy": {},
    "temperature 0.7": dict(do_sample=True, temperature=0.7, seed=0),
    "t 0.7, top-k 50, top-p 0.9, penalty 1.2": dict(
        do_sample=True, temperature=0.7, top_k=50, top_p=0.9, repetition_penalty=1.2, seed=0
    ),
}


def mixed(row: int) -> DecodeConfig:
    """Half the rows sample with top-p, one with top-k, one greedy row with a penalty."""
    if row == 1:
        return DecodeConfig(repetition_penalty=1.2)
    return DecodeConfig(do_sample=row % 2 == 0, temperature=0.7, top_p=0.9, top_k=50 if row == 2 else 0, seed=row)


def choosers(rows: int, vocab: int, device) -> dict[str, TokenChooser]:
    ids = torch.randint(0, vocab, (1, 40), device=device)
    prompt_mask = torch.ones_like(ids, dtype=torch.bool)
    settings = {
        "greedy": lambda r: DecodeConfig(),
        "every row at temperature 0.7": lambda r: DecodeConfig(do_sample=True, temperature=0.7, seed=r),
        "mixed rows": mixed,
    }
    out = {}
    for name, config_of in settings.items():
        chooser = TokenChooser(rows, vocab, device, per_row_generators=True)
        for r in range(rows):
            config = config_of(r)
            generator = torch.Generator(device).manual_seed(r) if config.do_sample else None
            chooser.set([r], config, ids, prompt_mask, generator)
        out[name] = chooser
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    add_timing_args(parser, repeats=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=16)
    args = parser.parse_args()
    setup_threads()
    model = big_blip2(args.preset, getattr(torch, args.dtype), args.device)
    ee = EarlyExitVLM(model)
    pv, ids, mask = inputs(model, batch=args.batch)

    def decode(options: dict):
        return lambda: (
            ee.generate(pv, ids, mask, max_new_tokens=args.tokens, mode="full", **options).stats.seconds_decode
        )

    seconds = interleaved({name: decode(o) for name, o in SAMPLING.items()}, args.repeats, args.stat)
    print(f"generate, {args.preset}, batch {args.batch}, {args.tokens} tokens, every layer ({args.device}):")
    for name, s in seconds.items():
        per_token = s / (args.tokens - 1) * 1e3
        print(f"  {name:42s} {per_token:8.2f} ms/token   {s / seconds['greedy']:.2f}x greedy's time")

    vocab = ee.backbone.lm_head.weight.shape[0]
    logits = torch.randn(args.batch, vocab, device=args.device) * 3
    rows, host = torch.arange(args.batch, device=args.device), list(range(args.batch))
    runs = {
        name: (lambda c=c: c.choose(logits, rows, host)) for name, c in choosers(args.batch, vocab, args.device).items()
    }
    seconds = interleaved(runs, max(args.repeats, 10), args.stat)
    print(f"token choice alone, {args.batch} rows x {vocab} vocabulary (the scheduler's, a generator per row):")
    for name, s in seconds.items():
        print(f"  {name:42s} {s * 1e3:8.2f} ms/step")


if __name__ == "__main__":
    main()
