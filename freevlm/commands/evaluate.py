"""`freevlm eval` (one threshold) and `freevlm sweep` (thresholds chosen on a dev split): metrics, speed, plots.

Both run under `accelerate launch --num_processes N` unchanged: the batches are dealt out, the main process gathers
the outputs, scores them and writes the files (`freevlm.eval.processes`). `eval` appends each finished record to
predictions.jsonl as it goes; `--resume` decodes only the records not there yet (`freevlm.eval.predictions`).
"""

from __future__ import annotations

import argparse
import functools
import json
from dataclasses import replace
from pathlib import Path

from ..argtypes import device, input_path, number, open_fraction, output_dir, positive_int
from ..data.specs import FORMATS, DatasetSpec, read_dataset
from ..decoding.config import KV_MODES, DecodeConfig
from ..errors import UserError
from ..eval.evaluate import ANSWER_DECODING, VQA_PROMPT, evaluate
from ..eval.options import BATCH_SIZE, EvalOptions
from ..eval.predictions import PREDICTIONS, PredictionLog
from ..eval.processes import Processes
from ..eval.sweep import DEV_FRACTION, sweep, write_sweep
from ..loading import CAPTION_PROMPT
from ..methods import METHODS, get_method


def dataset_arguments(p: argparse.ArgumentParser) -> None:
    """Backbone, exits, method, dataset and decoding: what every command that runs exits over a dataset takes."""
    p.add_argument("--backbone", type=input_path, required=True, help="folder of a BLIP-2 saved with save_pretrained")
    p.add_argument("--exits", type=input_path, help="folder of exits saved by EarlyExitVLM.save_exits (MuE: optional)")
    p.add_argument(
        "--method",
        choices=sorted(METHODS),
        default="free",
        help="early-exit method: its exit kind and exit rule ("
        + "; ".join(f"{m.name}: {m.rule}" for m in METHODS.values())
        + ")",
    )
    p.add_argument(
        "--exit-layers",
        type=positive_int,
        nargs="+",
        help="MuE without --exits: LM layers to compare states at (default: every layer)",
    )
    p.add_argument("--format", required=True, choices=sorted(FORMATS), help="dataset format")
    p.add_argument(
        "--files",
        type=input_path,
        required=True,
        nargs="+",
        help="annotation file(s): " + "; ".join(f"{k}: {v[1]}" for k, v in FORMATS.items()),
    )
    p.add_argument("--images", type=input_path, required=True, help="folder the dataset's image paths are relative to")
    p.add_argument("--split", help="Karpathy split (train/val/test/restval) or NoCaps domain")
    p.add_argument("--limit", type=positive_int, help="use only the first N records")
    p.add_argument("--prompt", help=f"prompt (captions: {CAPTION_PROMPT!r}; VQA: {VQA_PROMPT!r} with {{question}})")
    p.add_argument(
        "--max-new-tokens",
        type=positive_int,
        help=f"default: {DecodeConfig.max_new_tokens} for captions, {ANSWER_DECODING.max_new_tokens} for answers",
    )
    p.add_argument("--batch-size", type=positive_int, default=BATCH_SIZE)
    p.add_argument("--kv", choices=KV_MODES, default=DecodeConfig.kv)
    p.add_argument("--device", type=device, default="cpu")


def _common(p: argparse.ArgumentParser) -> None:
    dataset_arguments(p)
    p.add_argument("--out", type=output_dir, required=True, help="output folder (results.json, predictions, plots)")
    p.add_argument("--no-full", action="store_true", help="do not time the full model beside early exit")
    p.add_argument(
        "--timing-repeats", type=positive_int, default=1, help="decode each batch N times per mode, keep the fastest"
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help=f"decode only the records not yet in --out's {PREDICTIONS} (sweep: predictions_*.jsonl); refused if "
        "they were made with other options",
    )


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate early exits at one threshold: official metrics + speed vs full model")
    _common(p)
    p.add_argument("--threshold", type=number(), default=DecodeConfig.threshold, help="the --method rule's knob")
    p.set_defaults(func=run_eval)

    p = sub.add_parser("sweep", help="sweep thresholds, choose the best on a dev split, plot quality vs speedup")
    _common(p)
    p.add_argument("--thresholds", type=number(), nargs="+", help="default: the --method's grid")
    p.add_argument(
        "--dev-files", type=input_path, nargs="+", help="dev annotation file(s) (default: hold out --dev-fraction)"
    )
    p.add_argument("--dev-split", help="dev split of the same files (e.g. Karpathy 'val')")
    p.add_argument("--dev-fraction", type=open_fraction, default=DEV_FRACTION, help="in (0, 1)")
    p.add_argument("--no-per-layer", action="store_true", help="skip the per-layer (forced exit) curve")
    p.set_defaults(func=run_sweep)


def _spec(args, files=None, split=None) -> DatasetSpec:
    return DatasetSpec(args.format, list(files or args.files), args.images, split or args.split, args.limit)


def decoding_options(args: argparse.Namespace, spec: DatasetSpec, bundle) -> tuple[DecodeConfig, str | None]:
    """(config, prompt) of `dataset_arguments`: the decode options as one `DecodeConfig` (`--kv`;
    `--max-new-tokens`, else the task's default); the prompt: `--prompt`, else for captions the one the model folder
    records (`bundle.prompt`), else None (the task's default)."""
    default = DecodeConfig() if spec.task == "captions" else ANSWER_DECODING
    config = replace(default, kv=args.kv, max_new_tokens=args.max_new_tokens or default.max_new_tokens)
    if args.prompt is not None and spec.task == "visdial":
        raise ValueError("--prompt does not apply to VisDial (the prompt is built from caption and history)")
    if args.prompt is None and spec.task == "captions":
        return config, bundle.prompt
    return config, args.prompt


def evaluation_options(args: argparse.Namespace, spec: DatasetSpec, bundle) -> EvalOptions:
    """The `EvalOptions` of `eval` and `sweep`: `decoding_options`, `--method`, `--batch-size`, `--no-full`,
    `--timing-repeats`, the dataset's VQA metric, and a progress bar."""
    config, prompt = decoding_options(args, spec, bundle)
    return EvalOptions(
        config=config,
        method=args.method,
        prompt=prompt,
        batch_size=args.batch_size,
        compare_full=not args.no_full,
        timing_repeats=args.timing_repeats,
        progress_bar=True,
        metric=spec.vqa_metric,
    )


def _check_before_loading(args, thresholds) -> None:
    """What can be refused before any weights load: each threshold against the method's rule, the backbone folder,
    and the exit layers against its depth."""
    from ..exits import ExitConfig
    from ..loading import check_vlm_folder, lm_num_layers

    method = get_method(args.method)
    for t in thresholds:
        try:
            method.policy(t)  # each rule checks its knob (a confidence in [0, 1], a whole-number patience...)
        except ValueError as err:
            raise UserError(f"--method {args.method}: threshold {t:g} is not valid: {err}") from err
    config = check_vlm_folder(args.backbone)
    if args.exits is None and args.exit_layers:
        ExitConfig(list(args.exit_layers), kind="head").validate(lm_num_layers(config))


def load_model(args: argparse.Namespace) -> tuple:
    """The backbone and the method's exits: loaded from --exits, or (MuE, which trains nothing) built here."""
    from ..backbones import load_backbone
    from ..exits import ExitConfig
    from ..loading import load_exits, load_vlm
    from ..model import EarlyExitVLM

    kind = get_method(args.method).exit_kind
    if args.exits is None and kind != "head":
        raise UserError(f"--method {args.method} needs --exits (trained {kind!r} exits)")
    _, device = Processes.start(args.device)  # under `accelerate launch`: this process's share and device
    bundle = load_vlm(args.backbone, device=device)
    if args.exits is not None:
        return load_exits(bundle.model, args.exits), bundle
    n = load_backbone(bundle.model).num_layers
    return EarlyExitVLM(bundle.model, ExitConfig(args.exit_layers or list(range(1, n)), kind="head")), bundle


def run_options(args: argparse.Namespace, spec: DatasetSpec, **knobs) -> dict:
    """What a run's outputs depend on, as predictions.options.json keeps it for `--resume` to compare."""
    resolved = lambda path: str(Path(path).resolve()) if path is not None else None  # noqa: E731
    return {
        "backbone": resolved(args.backbone),
        "exits": resolved(args.exits),
        "method": args.method,
        "exit_layers": args.exit_layers,
        **knobs,
        "dataset": {
            "format": spec.format,
            "files": [resolved(f) for f in spec.files],
            "images": resolved(spec.images),
            "split": spec.split,
            "limit": spec.limit,
        },
        "prompt": args.prompt,
        "max_new_tokens": args.max_new_tokens,
        "kv": args.kv,
        "batch_size": args.batch_size,
        "device": args.device,
        # VisDial lines carry each round's option scores: a file from before they did cannot be resumed
        **({"option_scores": "in each line"} if spec.format == "visdial" else {}),
    }


def run_eval(args: argparse.Namespace) -> int:
    _check_before_loading(args, [args.threshold])
    spec = _spec(args)
    records = read_dataset(spec)  # a broken dataset fails before any weights load
    out = Path(args.out)
    log = PredictionLog(
        out, run_options(args, spec, threshold=args.threshold, full_model=not args.no_full), resume=args.resume
    )
    ee, bundle = load_model(args)
    options = evaluation_options(args, spec, bundle)
    result = evaluate(spec.task, ee, bundle, records, args.threshold, options=options, log=log)
    if not Processes.current().is_main:
        return 0
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result.as_dict(predictions=False), indent=2))
    (out / "predictions.json").write_text(json.dumps(result.predictions, indent=1))
    s = result.speed
    if log.done:
        print(f"resumed: {len(log.done)} of {len(records)} records were already in {log.path}")
    print(f"{spec.format} ({len(records)} records), threshold {args.threshold:g}: {result.metric} {result.score}")
    print(
        f"analytic speedup {s.analytic_speedup:.2f}x, {s.mean_layers_per_token:.2f} of {s.num_layers} layers per "
        f"token, exits {s.exit_histogram}"
    )
    if s.wallclock_speedup is not None:
        print(
            f"wall-clock speedup vs full model: end to end {s.wallclock_speedup:.2f}x, "
            f"per decode step {s.decode_speedup:.2f}x; same output as full: {result.agreement_with_full:.1%}"
        )
    print(f"wrote {out / 'results.json'}")
    return 0


def run_sweep(args: argparse.Namespace) -> int:
    _check_before_loading(args, args.thresholds or [])
    spec = _spec(args)
    records = read_dataset(spec)
    dev = read_dataset(_spec(args, args.dev_files, args.dev_split)) if (args.dev_files or args.dev_split) else None
    dev_set = {"files": args.dev_files, "split": args.dev_split, "fraction": args.dev_fraction}
    options = run_options(
        args,
        spec,
        thresholds=args.thresholds,
        dev=dev_set,
        per_layer=not args.no_per_layer,
        full_model=not args.no_full,
    )
    log = functools.partial(PredictionLog, args.out, options, args.resume)
    log("predictions_dev")  # a resume with other options fails here, before any weights load
    ee, bundle = load_model(args)
    result = sweep(
        ee,
        bundle,
        spec.task,
        records,
        dev,
        args.thresholds,
        args.dev_fraction,
        per_layer=not args.no_per_layer,
        progress=print if Processes.current().is_main else None,
        log=log,
        options=evaluation_options(args, spec, bundle),
    )
    if not Processes.current().is_main:
        return 0
    paths = write_sweep(result, args.out)
    print(f"{args.method}: best threshold on dev: {result.best_threshold:g}")
    for name, path in paths.items():
        print(f"wrote {name}: {path}")
    return 0
