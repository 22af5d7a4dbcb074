"""`freevlm demo`: train a small BLIP-2 and FREE exits on the shapes world, evaluate, write a report."""

from __future__ import annotations

import argparse
import os

from ..argtypes import output_dir, positive_int, random_seed


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the whole pipeline on the built-in shapes world, with a report")
    p.add_argument("--quick", action="store_true", help="smaller data and shorter training (about 3 minutes)")
    p.add_argument("--out", type=output_dir, default="report", help="report folder (default: report/)")
    p.add_argument(
        "--cache",
        type=output_dir,
        help="where trained backbones and exits are kept (default: $FREEVLM_CACHE or ~/.cache/freevlm/demo)",
    )
    p.add_argument("--fresh", action="store_true", help="retrain instead of reusing the cache")
    p.add_argument(
        "--family",
        choices=("opt", "t5", "llama"),
        default="opt",
        help="the LM of the small BLIP-2 (llama: a small LLaVA with a Llama LM instead)",
    )
    p.add_argument(
        "--no-baselines",
        action="store_true",
        help="skip DeeBLIP / PABEE-BLIP / LeeBLIP / MuE (--quick always skips them)",
    )
    p.add_argument("--seed", type=random_seed, default=0)
    p.add_argument(
        "--threads",
        type=positive_int,
        help="PyTorch threads (default: 1 or all cores, whichever runs a training-"
        "sized matmul faster when the demo starts)",
    )
    p.set_defaults(func=demo)


def demo(args: argparse.Namespace) -> int:
    import torch

    from ..demo.config import DemoConfig, default_threads
    from ..demo.pipeline import run_demo

    threads, why = (args.threads, "--threads") if args.threads else default_threads()
    torch.set_num_threads(max(1, threads))
    print(
        f"PyTorch threads: {torch.get_num_threads()} ({why}; load average {os.getloadavg()[0]:.1f} on "
        f"{os.cpu_count()} cores)"
    )
    overrides = dict(out=args.out, fresh=args.fresh, family=args.family, seed=args.seed)
    if args.no_baselines:
        overrides["methods"] = False
    if args.cache:
        overrides["cache"] = args.cache
    config = DemoConfig.quick_config(**overrides) if args.quick else DemoConfig(**overrides)
    paths = run_demo(config)
    print(f"report: {paths['markdown']} and {paths['html']}")
    return 0
