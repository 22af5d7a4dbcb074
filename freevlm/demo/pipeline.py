"""`freevlm demo`: the paper's whole method, end to end, on a CPU in minutes, with every number measured here.

1. data (`world.py`): the shapes world (train / dev / test / OOD / calibration) in COCO-caption and VQAv2 formats,
   and the easy-VQA package's questions;
2. backbone (`train.py`, `backbone.py`): a small BLIP-2 (frozen ImageNet EfficientNet-Lite0 image encoder, Hugging
   Face Q-Former, projection and OPT or T5 LM; or a small LLaVA with a Llama LM) trained on shapes captions and VQA,
   then frozen (stage 1 of the paper);
3. exits (`train.py`): FREE exits (GAN + KD: no labels), the semi-supervised variant (GAN + CE) and the ablation
   without the adversarial term; the baselines (DeeBLIP, PABEE-BLIP, LeeBLIP, MuE) on the same backbone (stage 2);
4. evaluate: threshold chosen on dev, then test and OOD captioning, VQA, speculative mode, the variants and methods
   (`evaluate.py`, timed by `runs.py`); a certified threshold and exits placed under a budget (`calibrate.py`);
   bootstrap intervals, the paper's claims and the demo's targets (`claims.py`);
5. report (`report.py`): `results.json` (the `DemoResults` below), Markdown, plots, and an HTML page with every
   token coloured by the layer it left at.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ..data.images import load_image
from .calibrate import Certified, OnTest, Placement, calibration_set, certify, place
from .claims import Claim, Confidence, Target, claims, confidence, targets
from .config import DemoConfig
from .evaluate import (
    CaptionSplit,
    Compared,
    LayerScore,
    Speculative,
    SplitRuns,
    Sweep,
    VQATask,
    captioning,
    compare,
    dev_choices,
    method_models,
    speculative,
    vqa,
)
from .progress import Progress
from .report import write_report
from .runs import Runner
from .train import BackboneInfo, ExitsInfo, train_all_exits, train_backbone
from .world import World, load_world


@dataclass
class DemoResults:
    """Everything the demo measured: `results.json`, from which the report is written."""

    config: dict
    backbone: BackboneInfo
    exits: ExitsInfo
    sweep: Sweep
    per_layer: list[LayerScore]  # dev: each exit forced for every token, then the final layer
    captioning: dict[str, CaptionSplit]  # test, ood
    speed_protocol: str
    vqa: dict[str, VQATask]  # shapes, easyvqa
    speculative: Speculative
    ablation: list[Compared]  # FREE and its variants
    methods: list[Compared] | None  # FREE and the baselines (None without `methods`)
    calibration: Certified
    placement: Placement
    confidence: Confidence
    claims: list[Claim]
    targets: list[Target]
    samples: list[dict]  # captions with each token's exit layer, for the HTML page
    timing: dict  # seconds: estimate and measured, per stage and in all


def run_demo(cfg: DemoConfig, say=print, on_progress=None) -> dict[str, Path]:
    """Every stage in order; the report's paths by kind (see `write_report`)."""
    progress = Progress(say, on_progress, cfg.progress)
    estimate = cfg.estimate()
    say(
        f"freevlm demo: about {sum(estimate.values()) / 60:.0f} min on an empty cache on 2 CPU cores ("
        + ", ".join(f"{k} ~{v:.0f}s" for k, v in estimate.items())
        + "); cached runs skip the training"
    )
    with progress.stage("data"):
        world = load_world(cfg)
        sizes = {split: len(records) for split, records in world.captions.items()}
        say(f"data: shapes {sizes}, easy-VQA train {len(world.easyvqa['train'])} / test {len(world.easyvqa['test'])}")
    with progress.stage("backbone"):
        bundle, backbone = train_backbone(cfg, world, progress)
    with progress.stage("exits"):
        ee, exits = train_all_exits(cfg, world, bundle, backbone, progress)
    with progress.stage("evaluate"):
        runner = Runner(bundle, cfg, progress, backbone.num_layers)
        free, test = ee["free"], world.captions["test"]
        sweep, per_layer = dev_choices(runner, free, world.captions["dev"])
        chosen = sweep.chosen_threshold
        captions, runs = captioning(runner, free, world, chosen)
        vqa_tasks = vqa(runner, free, world, chosen)
        spec = speculative(runner, free, test[: cfg.speculative_images], chosen)
        variants = {name: ee[name] for name in ("free", "free_ce", "free_no_adversarial")}
        ablation, variant_runs = compare(runner, variants, world, chosen, runs["test"], methods=False)
        methods, method_runs = None, {}
        if cfg.methods:
            methods, method_runs = compare(runner, method_models(ee, bundle.model), world, chosen, runs["test"], True)
        on_test = OnTest(runner, test, runs["test"], chosen)
        calib = calibration_set(runner, free, world.captions["calibration"])
        certified = certify(runner, free, calib, on_test, chosen)
        placement = place(runner, ee["free_candidates"], calib, on_test)
        conf = confidence(runner, free, test, runs["test"].full, variant_runs, method_runs)
        judged = claims(conf, ablation, methods)
        for c in judged:
            say(f"claim: {c.claim}: {c.verdict} ({c.evidence})")
        goals = targets(captions["test"], spec, time.perf_counter() - progress.t0, cfg.quick)
    with progress.stage("report"):
        results = DemoResults(
            config=asdict(cfg),
            backbone=backbone,
            exits=exits,
            sweep=sweep,
            per_layer=per_layer,
            captioning=captions,
            speed_protocol=(
                f"speedups: batch 1, early exit and full model alternating, on the first {cfg.timing_images} "
                "requests of each split; quality: every request"
            ),
            vqa=vqa_tasks,
            speculative=spec,
            ablation=ablation,
            methods=methods,
            calibration=certified,
            placement=placement,
            confidence=conf,
            claims=judged,
            targets=goals,
            samples=samples(Path(cfg.out), world, runs),
            timing={
                "estimate": estimate,
                "stages": progress.stages,
                "total_seconds": time.perf_counter() - progress.t0,
            },
        )
        paths = write_report(asdict(results), Path(cfg.out))
    say(f"[{progress.elapsed()}] total {time.perf_counter() - progress.t0:.0f}s")
    return paths


def samples(out: Path, world: World, runs: dict[str, SplitRuns], n: int = 8) -> list[dict]:
    """The first timed captions of test and OOD, each token with the layer it left at; their images saved."""
    (out / "samples").mkdir(parents=True, exist_ok=True)
    found = []
    for split in ("test", "ood"):
        records = {r.image_id: r for r in world.captions[split]}
        for pred in runs[split].timed.predictions[: n // 2]:
            record = records[pred["id"]]
            name = f"samples/{split}-{record.image_id}.png"
            load_image(record.image).resize((192, 192)).save(out / name)
            tokens = [{"text": w, "layer": k} for w, k in zip(pred["prediction"].split(), pred["exit_layers"])]
            found.append(
                {
                    "image": name,
                    "split": split,
                    "tokens": tokens,
                    "full_caption": pred["full_prediction"],  # timed runs decode the full model too
                    "references": record.references,
                }
            )
    return found
