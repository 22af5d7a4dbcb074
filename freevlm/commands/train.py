"""`freevlm finetune` (stage 1), `freevlm train-exits` (stage 2, FREE), `freevlm train-baseline` (the paper's
baselines' exits) and `freevlm capfilt` (pseudo-captions).

Training commands run under `accelerate launch` unchanged (e.g. `accelerate launch --multi_gpu --num_processes 2 -m
freevlm.cli train-exits ...`; on a host without GPUs that gives CPU processes, while accelerate's own `--cpu` starts
only one). `--batch-size` is per process.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from collections.abc import Callable
from pathlib import Path

from ..argtypes import (
    device,
    fraction,
    input_path,
    nonnegative_float,
    nonnegative_int,
    number,
    open_fraction,
    output_dir,
    output_file,
    positive_float,
    positive_int,
    random_seed,
)
from ..errors import UserError
from ..exits import EXIT_INITS
from ..loading import CAPTION_PROMPT
from ..training.baselines import BASELINES, Baseline, BaselineTrainConfig
from ..training.capfilt import CapFiltConfig
from ..training.common import PRECISIONS, SCHEDULES
from ..training.exits import ANCHORS, KD_DIRECTIONS, ExitTrainConfig, FreeGAN
from ..training.finetune import Finetune, FinetuneConfig


def _parser(sub: argparse._SubParsersAction, name: str, help: str) -> argparse.ArgumentParser:
    """A subcommand whose options have no defaults of their own: an option left out keeps its config dataclass's
    default (`_config`), so the dataclasses are the one place defaults live."""
    return sub.add_parser(name, help=help, argument_default=argparse.SUPPRESS)


def _set_command(p: argparse.ArgumentParser, command: Callable[[argparse.Namespace], int], config_cls: type) -> None:
    """`p` runs `command`; each option's help ends with its default, read from `config_cls` (not restated)."""
    p.set_defaults(func=command)
    defaults = {f.name: f.default for f in dataclasses.fields(config_cls)}
    for action in p._actions:
        value = defaults.get(action.dest)
        if action.nargs != 0 and not action.required and value not in (None, dataclasses.MISSING):
            shown = f"{value:g}" if isinstance(value, float) else value
            action.help = f"{action.help or ''} (default: {shown})".lstrip()


def _loop_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--backbone",
        type=input_path,
        required=True,
        help="model folder, as for `freevlm caption`",
    )
    p.add_argument(
        "--captions",
        type=input_path,
        required=True,
        help="COCO captions JSON (captions_*.json or Karpathy dataset_coco.json)",
    )
    p.add_argument(
        "--image-root",
        type=input_path,
        default=None,
        help="folder the JSON's image paths are relative to (default: the JSON's folder)",
    )
    p.add_argument("--split", default=None, help="Karpathy split to use (train, restval, val, test)")
    p.add_argument("--prompt", default=CAPTION_PROMPT, help="prompt before each caption ('' for none)")
    p.add_argument(
        "--dev-captions",
        type=input_path,
        default=None,
        help="COCO captions JSON for the dev split (default: --dev-fraction of --captions)",
    )
    p.add_argument(
        "--dev-fraction",
        type=fraction,
        default=0.2,
        help="images held out for dev when no --dev-captions, in [0, 1) (paper: 0.2)",
    )
    p.add_argument(
        "--max-target-tokens", type=positive_int, default=None, help="refuse captions longer than this many tokens"
    )
    p.add_argument(
        "--output",
        dest="output_dir",
        type=output_dir,
        required=True,
        help="run folder: checkpoints, tensorboard, result",
    )
    p.add_argument("--epochs", type=positive_int)
    p.add_argument("--max-steps", type=positive_int, help="stop after this many steps (overrides --epochs)")
    p.add_argument("--batch-size", type=positive_int, help="per process")
    p.add_argument("--lr", type=positive_float)
    p.add_argument("--weight-decay", type=nonnegative_float)
    p.add_argument("--warmup-steps", type=nonnegative_int)
    p.add_argument("--schedule", choices=SCHEDULES)
    p.add_argument("--grad-clip", type=nonnegative_float, help="0 to disable")
    p.add_argument("--seed", type=random_seed)
    p.add_argument("--precision", choices=PRECISIONS, help="autocast dtype")
    p.add_argument("--cpu", action="store_true", help="train on CPU even if an accelerator is present")
    p.add_argument("--checkpoint-every", type=positive_int)
    p.add_argument("--keep-checkpoints", type=positive_int)
    p.add_argument("--log-every", type=positive_int)
    p.add_argument("--eval-every", type=nonnegative_int, help="dev evaluation interval in steps (0: only at the end)")
    p.add_argument("--num-workers", type=nonnegative_int, help="DataLoader workers")
    p.add_argument("--max-nonfinite-steps", type=nonnegative_int, help="abort after this many skipped NaN/inf steps")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --output")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.add_argument("--no-tensorboard", dest="tensorboard", action="store_false")


def register(sub: argparse._SubParsersAction) -> None:
    p = _parser(sub, "finetune", "stage 1: fine-tune the BLIP-2 backbone on captions (cross-entropy)")
    _loop_args(p)
    p.add_argument("--train-vision", action="store_true", help="also train the vision encoder")
    p.add_argument("--freeze-qformer", dest="train_qformer", action="store_false")
    p.add_argument("--freeze-projection", dest="train_projection", action="store_false")
    p.add_argument("--train-lm", action="store_true", help="also train the language model (not LAVIS's default)")
    _set_command(p, finetune_command, FinetuneConfig)

    p = _parser(sub, "train-exits", "stage 2: train FREE exits (GAN + ce | kd | capfilt anchor)")
    _loop_args(p)
    p.add_argument("--exit-layers", type=positive_int, nargs="+", required=True, help="LM layers to attach exits to")
    p.add_argument("--init", choices=EXIT_INITS)
    p.add_argument(
        "--anchor",
        choices=ANCHORS,
        help="ce: labels; kd: final layer's soft labels; capfilt: --captions from `freevlm capfilt`",
    )
    p.add_argument("--no-adversarial", dest="adversarial", action="store_false", help="anchor only (ablation)")
    p.add_argument("--adv-weight", type=nonnegative_float)
    p.add_argument("--anchor-weight", type=nonnegative_float)
    p.add_argument("--temperature", type=positive_float, help="kd temperature")
    p.add_argument("--kd-direction", choices=KD_DIRECTIONS)
    p.add_argument("--disc-hidden", type=positive_int, help="discriminator hidden size")
    p.add_argument("--disc-lr", type=positive_float, help="discriminator learning rate (default: --lr)")
    p.add_argument("--disc-r1", type=nonnegative_float, help="R1 penalty on the discriminator (not in the paper)")
    p.add_argument("--d-warn-window", type=positive_int)
    _set_command(p, train_exits_command, ExitTrainConfig)

    p = _parser(sub, "train-baseline", "train a baseline's linear exits (DeeBLIP, PABEE-BLIP, LeeBLIP)")
    _loop_args(p)
    p.add_argument("--method", choices=BASELINES, required=True, help="whose loss trains the exits (MuE trains none)")
    p.add_argument("--exit-layers", type=positive_int, nargs="+", required=True, help="LM layers to attach exits to")
    p.add_argument("--temperature", type=positive_float, help="leeblip: distillation temperature")
    p.add_argument("--weight-lr", type=positive_float, help="leeblip: learning rate of the distillation weights")
    p.add_argument("--meta-fraction", type=open_fraction, help="leeblip: training records held out as meta batches")
    _set_command(p, train_baseline_command, BaselineTrainConfig)

    p = _parser(sub, "capfilt", "pseudo-captions: sample N captions per image, keep the scorer's top k")
    p.add_argument("--backbone", type=input_path, required=True, help="folder of the (fine-tuned) BLIP-2")
    p.add_argument(
        "--scorer",
        type=input_path,
        required=True,
        help="clip:PATH (CLIPModel folder) or itm:PATH (Blip2ForImageTextRetrieval)",
    )
    p.add_argument("--images", type=input_path, nargs="+", default=None, help="image files")
    p.add_argument(
        "--captions",
        type=input_path,
        default=None,
        help="take the images from this COCO captions JSON instead (its captions are ignored)",
    )
    p.add_argument(
        "--image-root", type=input_path, default=None, help="folder the --captions image paths are relative to"
    )
    p.add_argument("--output", type=output_file, required=True, help="COCO captions JSON to write")
    p.add_argument("--prompt")
    p.add_argument("--num-samples", type=positive_int)
    p.add_argument("--top-k", type=positive_int)
    p.add_argument("--top-p", type=number(0, 1, low_open=True))
    p.add_argument("--temperature", type=positive_float)
    p.add_argument("--max-new-tokens", type=positive_int)
    p.add_argument("--batch-size", type=positive_int)
    p.add_argument("--seed", type=random_seed)
    p.add_argument("--device", type=device, default="cpu")
    _set_command(p, capfilt_command, CapFiltConfig)


def _config(cls, args: argparse.Namespace, **extra):
    """The dataclass `cls` filled from the parsed arguments that name its fields (unset ones keep defaults)."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if getattr(args, f.name, None) is not None}
    values.update(extra)
    if values.get("grad_clip") == 0:
        values["grad_clip"] = None
    return cls(**values)


def _records(args: argparse.Namespace, seed: int):
    """Training and dev records, read and split before any weights load (a broken file fails in seconds)."""
    from ..training import load_coco_captions, split_records

    records = load_coco_captions(args.captions, args.image_root, args.prompt, args.split)
    if not records:
        split = f" (split {args.split!r})" if args.split else ""
        raise UserError(f"{args.captions}{split} is empty: no (image, caption) records to train on")
    if args.dev_captions:
        dev = load_coco_captions(args.dev_captions, args.image_root, args.prompt, args.split)
        if not dev:
            raise UserError(f"--dev-captions {args.dev_captions} is empty: no (image, caption) records to evaluate on")
        return records, dev
    if args.dev_fraction == 0:
        return records, []
    train, dev = split_records(records, args.dev_fraction, seed)
    images = len({r.image for r in records})
    if not train or not dev:
        raise UserError(
            f"--dev-fraction {args.dev_fraction:g} of the {images} image(s) in {args.captions} leaves "
            f"{'no training' if not train else 'no dev'} images: give more images, another "
            "--dev-fraction, --dev-captions, or --dev-fraction 0 for no dev split"
        )
    return train, dev


def _datasets(args: argparse.Namespace, bundle, records):
    from ..backbones import load_backbone
    from ..training import CaptionDataset

    config = load_backbone(bundle.model).config  # BLIP-2's prompt-layout names, LLaVA's too

    def dataset(recs, source):
        return CaptionDataset(
            recs,
            bundle.tokenizer,
            bundle.image_processor,
            config,
            args.max_target_tokens,
            source=source,
            processor=bundle.processor,  # all but BLIP-2's: it lays out each image's tokens
        )

    train, dev = records
    return dataset(train, args.captions), (dataset(dev, f"dev split of {args.captions}") if dev else None)


# what a finished run leaves in --output (a new run refuses a folder that already holds one)
PRODUCTS = {"finetune": ("model",), "train-exits": ("exits",), "train-baseline": ("exits", "method.json")}
# what its checkpoints hold: the parts of the objective it trains
CHECKPOINT_PARTS = {"finetune": Finetune.PARTS, "train-exits": FreeGAN.PARTS, "train-baseline": Baseline.PARTS}


def _prepare(args: argparse.Namespace, config_cls, kind: str, **extra):
    """Everything a training command can check before loading weights: its settings, the run folder (nothing in
    it is overwritten; a resume has a readable checkpoint of the same kind), the backbone folder, the exit layers,
    and the captions. Returns the config and the (train, dev) records."""
    from ..exits import ExitConfig
    from ..loading import check_vlm_folder, lm_num_layers
    from ..training.checkpoint import check_resumable

    config = _config(config_cls, args, **extra)
    config.validate()
    check_resumable(args.output_dir, config.resume, kind, CHECKPOINT_PARTS)
    out = Path(args.output_dir)
    if not config.resume:
        found = [name for name in PRODUCTS[kind] if (out / name).exists()]
        if found:
            raise UserError(
                f"{args.output_dir} already holds {found[0]} (from an earlier run?), which this run would "
                "replace: pick another --output, or move it away"
            )
    model_config = check_vlm_folder(args.backbone)
    if "exit_layers" in extra:
        ExitConfig(list(extra["exit_layers"])).validate(lm_num_layers(model_config))
    return config, _records(args, config.seed)


def _run(train) -> int:
    from ..training import TrainingDiverged

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        train()
    except (TrainingDiverged, FileExistsError) as err:
        raise UserError(str(err)) from err
    return 0


def finetune_command(args: argparse.Namespace) -> int:
    from ..loading import load_vlm
    from ..training import finetune

    config, records = _prepare(args, FinetuneConfig, "finetune")
    bundle = load_vlm(args.backbone)
    train_set, dev_set = _datasets(args, bundle, records)
    saved = dataclasses.replace(bundle, prompt=args.prompt).preprocessing  # the folder records its prompt
    return _run(lambda: finetune(bundle.model, train_set, config, dev_set, save_with=saved))


def train_exits_command(args: argparse.Namespace) -> int:
    from ..loading import load_vlm
    from ..training import train_exits

    config, records = _prepare(args, ExitTrainConfig, "train-exits", exit_layers=tuple(args.exit_layers))
    bundle = load_vlm(args.backbone)
    train_set, dev_set = _datasets(args, bundle, records)
    return _run(lambda: train_exits(bundle.model, train_set, config, dev_set))


def train_baseline_command(args: argparse.Namespace) -> int:
    from ..loading import load_vlm
    from ..training.baselines import train_baseline

    config, records = _prepare(args, BaselineTrainConfig, "train-baseline", exit_layers=tuple(args.exit_layers))
    bundle = load_vlm(args.backbone)
    train_set, dev_set = _datasets(args, bundle, records)
    return _run(lambda: train_baseline(bundle.model, train_set, config, dev_set))


def capfilt_command(args: argparse.Namespace) -> int:
    from ..loading import check_vlm_folder, load_vlm
    from ..training.capfilt import capfilt, load_scorer

    if bool(args.images) == bool(args.captions):
        raise UserError("give exactly one of --images or --captions")
    config = _config(CapFiltConfig, args)
    config.validate()
    if args.captions:
        from ..training import load_coco_captions

        paths = list(dict.fromkeys(r.image for r in load_coco_captions(args.captions, args.image_root)))
    else:
        paths = args.images
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise UserError(f"{len(missing)} image file(s) not found, first: {missing[0]}")
    paths = [str(Path(p).resolve()) for p in paths]
    check_vlm_folder(args.backbone)
    scorer = load_scorer(args.scorer, args.device)
    bundle = load_vlm(args.backbone, device=args.device)
    entries = capfilt(bundle, paths, scorer, args.output, config)
    print(json.dumps({"images": len(paths), "captions": len(entries), "output": args.output}))
    return 0
