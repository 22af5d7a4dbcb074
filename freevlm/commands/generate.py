"""`freevlm caption` (a real checkpoint from a local folder) and `freevlm tiny-run` (a random model, no files)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from ..argtypes import device, input_path, integer, positive_int, threshold_or_report
from ..data.images import load_image
from ..decoding.config import KV_MODES, MODES, DecodeConfig
from ..decoding.generate import analytic_speedup
from ..exits import ExitConfig
from ..model import EarlyExitVLM
from ..serving import Scheduler

# a tiny model is for a look at where tokens leave: bounds that keep it tiny (the LM has 512 positions)
TINY_MAX_LAYERS, TINY_MAX_NEW_TOKENS = 64, 256


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("caption", help="caption images with early exits")
    p.add_argument(
        "--backbone",
        type=input_path,
        required=True,
        help="folder of a model of a supported family (the README's table) saved with save_pretrained, with its "
        "processor (a BLIP-2: or its tokenizer and image processor)",
    )
    p.add_argument(
        "--exits", type=input_path, help="folder of exits saved by EarlyExitVLM.save_exits (default: no exits)"
    )
    p.add_argument("--image", type=input_path, required=True, nargs="+", help="image file(s)")
    p.add_argument(
        "--prompt",
        help="text prompt after the image (e.g. 'a photo of'; LLaVA: where <image> stands, or after it); default: the "
        "prompt the model folder records (freevlm's finetune and demo record theirs), else none",
    )
    p.add_argument(
        "--threshold",
        type=threshold_or_report,
        default=DecodeConfig.threshold,
        help="confidence needed to leave at an exit, in [0, 1], or a `freevlm calibrate --out` report for these "
        "--backbone and --exits: the threshold it certified",
    )
    p.add_argument("--mode", choices=MODES, default=DecodeConfig.mode)
    p.add_argument("--kv", choices=KV_MODES, default=DecodeConfig.kv)
    p.add_argument("--max-new-tokens", type=positive_int, default=DecodeConfig.max_new_tokens)
    p.add_argument("--device", type=device, default="cpu")
    p.add_argument("--trace", action="store_true", help="print each token with the LM layer it left at")
    p.set_defaults(func=caption)

    p = sub.add_parser("tiny-run", help="early-exit generation on a small random BLIP-2 (no files needed)")
    p.add_argument("--family", choices=("opt", "t5"), default="opt")
    p.add_argument(
        "--layers", type=integer(low=4, high=TINY_MAX_LAYERS), default=12, help="LM layers (>= 4: exits every 3 layers)"
    )
    p.add_argument("--max-new-tokens", type=integer(low=1, high=TINY_MAX_NEW_TOKENS), default=12)
    p.set_defaults(func=tiny_run)


def caption(args: argparse.Namespace) -> int:
    from ..loading import check_vlm_folder, load_exits, load_vlm

    images = [load_image(path) for path in args.image]  # fail on a bad image before loading any weights
    check_vlm_folder(args.backbone)
    if isinstance(args.threshold, Path):
        from ..calibration import reported_threshold

        report, args.threshold = args.threshold, reported_threshold(args.threshold, args.backbone, args.exits)
        print(f"threshold {args.threshold:g}, certified by {report}")
    if not args.exits and args.mode == "early_exit" and args.threshold < 1.0:
        raise ValueError("--exits is required for early exits (or use --mode full)")
    bundle = load_vlm(args.backbone, device=args.device)
    if args.exits:
        ee = load_exits(bundle.model, args.exits)
    else:
        ee = EarlyExitVLM(bundle.model, ExitConfig([1]))  # a placeholder exit that full mode never runs
    prompt = args.prompt if args.prompt is not None else (bundle.prompt or "")
    config = DecodeConfig(max_new_tokens=args.max_new_tokens, threshold=args.threshold, mode=args.mode, kv=args.kv)
    start = time.perf_counter()
    if len(images) > 1 and args.mode in ("full", "early_exit"):
        answers = each_alone(ee, [bundle.inputs([image], [prompt]) for image in images], config)
    else:
        out = ee.generate(**bundle.inputs(images, [prompt] * len(images)), config=config)
        new = out.sequences[:, out.sequences.shape[1] - out.exit_layers.shape[1] :]
        answers = [
            (seq[layers >= 0].tolist(), layers[layers >= 0].tolist()) for seq, layers in zip(new, out.exit_layers)
        ]
    seconds = time.perf_counter() - start
    for path, (tokens, layers) in zip(args.image, answers):
        print(f"{path}: {bundle.decode(torch.tensor([tokens]))[0]}")
        if args.trace:
            for token, layer in zip(tokens, layers):
                print(f"  {bundle.tokenizer.decode([token])!r:>16}  layer {layer}")
    n, layers = ee.backbone.num_layers, [layer for _, answer in answers for layer in answer]
    print(
        f"analytic speedup {analytic_speedup(layers, n):.2f}x, "
        f"{sum(layers) / max(len(layers), 1):.1f} of {n} layers per token, {seconds:.2f}s"
    )
    return 0


def each_alone(ee: EarlyExitVLM, requests: list[dict], config: DecodeConfig) -> list[tuple[list[int], list[int]]]:
    """Several prompts as one continuous batch (`freevlm.serving`): each answer and its exit layers are what the
    prompt gets alone. In one `generate` batch the rows move through the layers together, so a row that could
    leave rides along with the deepest one (and the gate stops consulting exits that no step leaves at together):
    two captions that disagree somewhere ran nearly every layer. Returns (tokens, exit layers) per prompt."""
    extra = getattr(ee.backbone.config, "num_query_tokens", 0) or 0  # image tokens a BLIP-2 prompt may not hold
    longest = max(r["input_ids"].shape[1] for r in requests) + extra
    scheduler = Scheduler(
        ee, max_batch=len(requests), max_len=longest + config.max_new_tokens, max_waiting=len(requests)
    )
    handles = [scheduler.submit(**request, config=config) for request in requests]
    while scheduler.step():
        pass
    return [(done.tokens, done.exit_layers) for done in (handle.result() for handle in handles)]


def tiny_run(args: argparse.Namespace) -> int:
    """Random weights, so the words mean nothing; what it shows is where tokens leave and what that saves."""
    from ..tiny import tiny_blip2, tiny_inputs

    model = tiny_blip2(args.family, num_layers=args.layers, hidden_size=128)
    exits = list(range(3, args.layers, 3))
    ee = EarlyExitVLM.from_backbone(model, ExitConfig(exits))
    pv, ids, mask = tiny_inputs(model, batch=1)
    full = ee.generate(pv, ids, mask, max_new_tokens=args.max_new_tokens, mode="full", eos_token_id=[])
    print(f"tiny random BLIP-2 ({args.family}, {args.layers} LM layers), exits at {exits}")
    for threshold in (1.0, 0.02, 0.0):
        out = ee.generate(pv, ids, mask, max_new_tokens=args.max_new_tokens, threshold=threshold, eos_token_id=[])
        s = out.stats
        same = torch.equal(out.sequences, full.sequences)
        print(f"threshold {threshold:4.2f}: exit layers {out.exit_layers[0].tolist()}")
        print(
            f"                 analytic speedup {s.analytic_speedup:.2f}x, ideal {s.ideal_speedup:.2f}x, "
            f"same tokens as the full model: {same}"
        )
    return 0
