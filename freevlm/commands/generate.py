"""`freevlm caption` (a real checkpoint from a local folder) and `freevlm tiny-run` (a random model, no files)."""

from __future__ import annotations

import argparse

import torch

from ..argtypes import device, input_path, integer, positive_int, unit_interval
from ..data.images import load_image
from ..decoding.config import KV_MODES, MODES, DecodeConfig
from ..exits import ExitConfig
from ..model import EarlyExitVLM

# a tiny model is for a look at where tokens leave: bounds that keep it tiny (the LM has 512 positions)
TINY_MAX_LAYERS, TINY_MAX_NEW_TOKENS = 64, 256


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("caption", help="caption images with early exits")
    p.add_argument(
        "--backbone",
        type=input_path,
        required=True,
        help="folder of a BLIP-2 (with its tokenizer and image processor), "
        "an InstructBLIP or a LLaVA (with its processor), saved with save_pretrained",
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
        type=unit_interval,
        default=DecodeConfig.threshold,
        help="confidence needed to leave at an exit, in [0, 1]",
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
    if not args.exits and args.mode == "early_exit" and args.threshold < 1.0:
        raise ValueError("--exits is required for early exits (or use --mode full)")
    bundle = load_vlm(args.backbone, device=args.device)
    if args.exits:
        ee = load_exits(bundle.model, args.exits)
    else:
        ee = EarlyExitVLM(bundle.model, ExitConfig([1]))  # a placeholder exit that full mode never runs
    prompt = args.prompt if args.prompt is not None else (bundle.prompt or "")
    inputs = bundle.inputs(images, [prompt] * len(images))
    out = ee.generate(
        **inputs, max_new_tokens=args.max_new_tokens, threshold=args.threshold, mode=args.mode, kv=args.kv
    )
    prompt_len = out.sequences.shape[1] - out.exit_layers.shape[1]
    for path, seq, layers in zip(args.image, out.sequences, out.exit_layers):
        new = seq[prompt_len:]
        print(f"{path}: {bundle.decode(new[None])[0]}")
        if args.trace:
            for token, layer in zip(new.tolist(), layers.tolist()):
                if layer >= 0:
                    print(f"  {bundle.tokenizer.decode([token])!r:>16}  layer {layer}")
    s = out.stats
    print(
        f"analytic speedup {s.analytic_speedup:.2f}x, "
        f"{s.mean_layers_per_token:.1f} of {s.num_layers} layers per token, "
        f"{s.seconds_total:.2f}s"
    )
    return 0


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
