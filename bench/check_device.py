"""Equivalence on a device: what the CPU test suite proves, checked where CUDA graphs and GPU kernels run.

For each family's tiny random model (fp32): threshold 1.0 and `mode="full"` equal Hugging Face `generate` (batch 1
and 3 padded), and so does a seeded sample (temperature, top-k, top-p, repetition penalty) after
`torch.manual_seed`; speculative equals full greedy; beam 3 at threshold 1.0 equals HF beam search; the default
engine (static, with CUDA graphs on CUDA where the adapter is `graph_safe`: OPT and the Llama-like LMs without
sliding windows, Qwen2-VL's included; not Gemma 3 nor Qwen3-VL) gives the general engine's tokens and exit layers
under a random mixed schedule, both KV modes, and on CUDA its graphs were captured and kept (no capture error or
replay mismatch turned them off); and through the continuous-batching scheduler, requests arriving at random steps
with random prompt lengths, thresholds (exits taken or not) and lengths, some with stop sequences, some cancelled
mid-answer, some with two images (Gemma 3, InternVL), each get the tokens, exit layers and finish reason `generate`
gives them alone at batch 1, and on CUDA the scheduler's graphs (per layers and row bucket) were captured and kept.
Prints one line per check and a total; exits 1 on any failure. The default families take ~17-21 s on our CPU.

    python bench/check_device.py [--device cuda] [--families opt t5 llama idefics3 gemma3 internvl-qwen2 ...]
"""

from __future__ import annotations

import argparse
import random
import sys
import warnings

import torch

from freevlm import EarlyExitVLM, ExitConfig
from freevlm.backbones.llava import ImageGroups
from freevlm.decoding.policies import ExitPolicy
from freevlm.serving import Scheduler
from freevlm.tiny import tiny_model, tiny_model_inputs


class SeededRandomPolicy(ExitPolicy):
    """Leaves at each live exit with probability 1/2 from a seeded generator: a mixed schedule, the same per run."""

    def __init__(self, seed: int):
        self.gen = torch.Generator().manual_seed(seed)

    def live_exits(self, exit_layers):
        return list(exit_layers)

    def decide(self, layer, logits, step, rows, hidden=None):
        return (torch.rand(len(rows), generator=self.gen) < 0.5).to(rows.device)


def several_images(ee: EarlyExitVLM, prompt_len: int, seed: int) -> dict | None:
    """One prompt holding two images (two blocks of image tokens, text between and after), for the families whose
    prompts take any number (Gemma 3, InternVL: `ImageGroups`); None for the others."""
    if not isinstance(ee.backbone, ImageGroups):
        return None
    one = tiny_model_inputs(ee.model, batch=1, prompt_len=prompt_len, seed=seed)
    image, per = ee.backbone.config.image_token_index, ee.backbone.config.num_query_tokens
    text = one["input_ids"][0][one["input_ids"][0] != image].tolist()
    ids = torch.tensor([[image] * per + text[:1] + [image] * per + text[1:]])
    pixels = torch.randn(2, *one["pixel_values"].shape[1:], generator=torch.Generator().manual_seed(seed))
    inputs = {"pixel_values": pixels, "input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if "token_type_ids" in one:
        inputs["token_type_ids"] = (ids == image).long()
    assert ee.backbone.images_per_row(ids) == [2]
    return inputs


def scheduler_mismatches(ee: EarlyExitVLM, device: str, seed: int, count: int = 8) -> tuple[list[str], int, object]:
    """Requests arriving at random steps (3 rows for `count` requests, so some wait and join a running batch), each
    with a random prompt length, threshold and length, through the scheduler, in turn: plain; with a stop sequence
    (two tokens of its answer: it must end where they first appear, finish reason "stop"); cancelled mid-answer (it
    must end with the tokens it had, "cancelled", its row freed); with two images where the family takes several
    (else plain). Returns which of them did not get what `generate` gives them alone (tokens, exit layers, finish
    reason), how many of their tokens left early (0: the check would see no exit), and the scheduler's segment
    runner (its CUDA graphs, where the backbone is `graph_safe`)."""
    rng = random.Random(seed)
    kinds = ["plain", "stop", "cancel", "images"]
    requests = []
    for i in range(count):
        kind, prompt_len = kinds[i % len(kinds)], rng.randint(1, 6)
        inputs = several_images(ee, max(prompt_len, 2), seed * 100 + i) if kind == "images" else None
        if inputs is None:
            kind = "plain" if kind == "images" else kind
            inputs = tiny_model_inputs(ee.model, batch=1, prompt_len=prompt_len, seed=seed * 100 + i)
        inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        shortest = 1 if kind in ("plain", "images") else 4  # room for a stop or a cancel before the end
        options = dict(
            max_new_tokens=rng.randint(shortest, 10), threshold=rng.choice([0.0, 0.0, 1.0, 0.1]), eos_token_id=[]
        )
        out = ee.generate(**inputs, **options)
        layers = out.exit_layers[0].tolist()
        tokens = out.sequences[0, out.sequences.shape[1] - len(layers) :].tolist()
        stop, cancel_at, reason = None, None, "length"
        if kind == "stop":
            at = rng.randrange(1, len(tokens) - 1)
            stop = [tokens[at - 1 : at + 1]]
            end = next(j + 2 for j in range(len(tokens) - 1) if tokens[j : j + 2] == stop[0])
            tokens, layers, reason = tokens[:end], layers[:end], "stop"
        elif kind == "cancel":
            cancel_at = rng.randint(1, len(tokens) - 1)  # tokens made when it is cancelled
            tokens, layers, reason = tokens[:cancel_at], layers[:cancel_at], "cancelled"
        expected = (tokens, layers, reason)
        requests.append((rng.randint(0, 6), kind, inputs, options, stop, cancel_at, expected))
    scheduler = Scheduler(ee, max_batch=3, max_len=64, prefill_chunk=8)
    handles, step = {}, 0
    while step < 200 and (len(handles) < count or not scheduler.idle):
        for i, (arrival, _, inputs, options, stop, *_) in enumerate(requests):
            if arrival == step:
                handles[i] = scheduler.submit(**inputs, **options, stop=stop)
        scheduler.step()
        step += 1
        for i, (*_, cancel_at, _) in enumerate(requests):
            if cancel_at is not None and i in handles and len(handles[i].tokens) >= cancel_at:
                handles[i].cancel()
    wrong = []
    for i, (_, kind, *_, expected) in enumerate(requests):
        result = handles[i].result(timeout=0) if i in handles and handles[i].done else None
        if result is None or (result.tokens, result.exit_layers, result.finish_reason) != expected:
            wrong.append(f"{i} ({kind})")
    early = sum(layer < ee.backbone.num_layers for *_, (_, layers, _) in requests for layer in layers)
    return wrong, early, scheduler.engine.runner


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--families",
        nargs="*",
        default=[
            *("opt", "t5", "llama", "qwen2", "instructblip-llama", "idefics3", "internvl-qwen2", "llava-next-qwen2"),
            *("qwen2-vl", "gemma3", "qwen3-vl"),  # the last two not `graph_safe`: equivalence only
        ],
    )
    args = parser.parse_args()
    failures, checks = [], 0

    def check(name: str, ok: bool) -> None:
        nonlocal checks
        checks += 1
        print(f"   {'ok  ' if ok else 'FAIL'} {name}")
        if not ok:
            failures.append(name)

    for family in args.families:
        model = tiny_model(family, seed=0).to(args.device)
        ee = EarlyExitVLM.from_backbone(model, ExitConfig([1, 2]))
        print(f"{family} on {args.device}")
        for batch in (1, 3):
            # everything the model's generate takes (Gemma 3's token_type_ids too), passed whole to both
            inputs = {k: v.to(args.device) for k, v in tiny_model_inputs(model, batch=batch, pad=batch > 1).items()}
            hf_kwargs = dict(inputs, max_new_tokens=8, do_sample=False)
            with torch.no_grad():
                hf = model.generate(**hf_kwargs)
            for kw in (dict(threshold=1.0), dict(mode="full")):
                out = ee.generate(**inputs, max_new_tokens=8, **kw)
                check(f"batch {batch}: {kw} equals HF generate", torch.equal(out.sequences, hf))
            sample = dict(do_sample=True, temperature=0.8, top_k=20, top_p=0.9, repetition_penalty=1.2)
            torch.manual_seed(7)
            with torch.no_grad():
                hf_sample = model.generate(**inputs, max_new_tokens=8, **sample)
            out = ee.generate(**inputs, max_new_tokens=8, threshold=1.0, seed=7, **sample)
            check(f"batch {batch}: seeded sample equals HF's", torch.equal(out.sequences, hf_sample))
            full = ee.generate(**inputs, max_new_tokens=8, mode="full", eos_token_id=[])
            spec = ee.generate(**inputs, max_new_tokens=8, mode="speculative", threshold=0.3, eos_token_id=[])
            check(f"batch {batch}: speculative equals full", torch.equal(spec.sequences, full.sequences))
            if batch == 1:
                with torch.no_grad():
                    hf_beam = model.generate(**hf_kwargs, num_beams=3)
                beam = ee.generate(**inputs, max_new_tokens=8, threshold=1.0, num_beams=3)
                check("beam 3 at threshold 1.0 equals HF beam", torch.equal(beam.sequences, hf_beam))
            for kv in ("recompute", "propagate"):
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    runs = [
                        ee.generate(
                            **inputs,
                            max_new_tokens=12,
                            policy=SeededRandomPolicy(batch),
                            kv=kv,
                            batch_policy="ride_along",
                            static=static,
                            eos_token_id=[],
                            return_engine=static is None,
                        )
                        for static in (None, False)
                    ]
                same = [torch.equal(getattr(runs[0], k), getattr(runs[1], k)) for k in ("sequences", "exit_layers")]
                check(f"batch {batch}: default engine equals general engine, mixed schedule, kv={kv}", all(same))
                if args.device.startswith("cuda") and ee.backbone.graph_safe:
                    runner = runs[0].engine.runner
                    fallback = [str(w.message) for w in caught if "CUDA graph" in str(w.message)]
                    check(
                        f"batch {batch}: kv={kv} ran {len(runner.graphs)} captured CUDA graphs {fallback or ''}",
                        runner.enabled and bool(runner.graphs) and not fallback,
                    )
        kinds = "stop sequences, cancellations" + (", two images" if isinstance(ee.backbone, ImageGroups) else "")
        for seed in (1, 2):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                wrong, early, runner = scheduler_mismatches(ee, args.device, seed)
            check(
                f"scheduler (seed {seed}): every request as alone ({kinds}), {early} tokens left early {wrong or ''}",
                not wrong and early > 0,
            )
            if args.device.startswith("cuda") and ee.backbone.graph_safe:
                fallback = [str(w.message) for w in caught if "CUDA graph" in str(w.message)]
                check(
                    f"scheduler (seed {seed}): ran {len(runner.graphs)} captured CUDA graphs {fallback or ''}",
                    runner.enabled and bool(runner.graphs) and not fallback,
                )
    print(f"{checks - len(failures)}/{checks} checks passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
