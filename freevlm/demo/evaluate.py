"""Stage 4a, evaluation: FREE's threshold chosen on dev, then test and OOD captioning, VQA, speculative mode, and
FREE's variants and the baselines, each at its own best dev threshold, all timed by `Runner`'s one protocol."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch

from ..data.images import load_image
from ..eval.captions import spice_unavailable_reason
from ..eval.evaluate import CAPTION_PROMPT, EvalResult
from ..eval.sweep import method_parameters
from ..model import EarlyExitVLM
from .runs import Runner, Speed
from .world import World


@dataclass
class SweepPoint:
    threshold: float
    CIDEr: float
    analytic_speedup: float


@dataclass
class Sweep:
    """FREE on dev: CIDEr at each threshold (batched, so speed is analytic only) and the best one."""

    chosen_threshold: float
    points: list[SweepPoint]


@dataclass
class LayerScore:
    layer: int
    CIDEr: float


@dataclass
class CaptionSplit:
    full: dict[str, float | None]  # BLEU-4, METEOR, ROUGE-L, CIDEr, exact_match
    free: dict[str, float | None]  # the same, FREE at the chosen threshold
    speed: Speed
    agreement_with_full: float | None  # on the timed requests
    spice: str  # "computed", or why not


@dataclass
class SplitRuns:
    """The runs of one captioning split that later stages score again."""

    free: EvalResult  # batched, every request
    timed: EvalResult  # batch 1, against the full model
    full: EvalResult


@dataclass
class VQATask:
    full_accuracy: float
    free_accuracy: float
    speed: Speed


@dataclass
class Speculative:
    threshold: float
    decode_speedup: float | None
    acceptance_rate: float
    drafted: int
    accepted_drafts: int
    identical_to_full: bool
    images: int


@dataclass
class Compared:
    """A FREE variant or a method at its best dev threshold, on test."""

    name: str
    threshold: float
    CIDEr: float
    speed: Speed
    trainable_parameters: int | None = None  # methods only


def dev_choices(runner: Runner, ee: EarlyExitVLM, dev) -> tuple[Sweep, list[LayerScore]]:
    """The threshold sweep and each exit forced for every token (and the final layer), on dev."""
    chosen, runs = runner.choose_threshold(ee, dev)
    points = [SweepPoint(r.threshold, r.score, r.speed.analytic_speedup) for r in runs]
    layers = [*ee.exit_layers, runner.num_layers]
    per_layer = [runner.captions(f"dev layer {k}", ee, dev, layer=k, **runner.cider) for k in layers]
    per_layer = [LayerScore(r.layer, r.score) for r in per_layer]
    runner.progress.say(f"dev sweep: chosen threshold {chosen}; per-layer CIDEr {[asdict(p) for p in per_layer]}")
    return Sweep(chosen, points), per_layer


def captioning(
    runner: Runner, ee: EarlyExitVLM, world: World, chosen: float
) -> tuple[dict[str, CaptionSplit], dict[str, SplitRuns]]:
    """Test and OOD: FREE at the chosen threshold (every metric, and timed) beside the full model."""
    results, runs = {}, {}
    for split in ("test", "ood"):
        records = world.captions[split]
        run, timed = runner.quality_and_speed(split, ee, records, chosen, all_metrics=True)
        full = runner.full(split, ee, records)
        runs[split] = SplitRuns(run, timed, full)
        results[split] = CaptionSplit(
            full=_caption_quality(full, records),
            free=_caption_quality(run, records),
            speed=Speed.of(timed.speed),
            agreement_with_full=timed.agreement_with_full,
            spice=spice_unavailable_reason() or "computed",
        )
        runner.progress.say(
            f"{split}: CIDEr full {full.score:.3f} vs FREE {run.score:.3f}; batch 1 on {len(timed.predictions)} "
            f"images: decode speedup {timed.speed.decode_speedup or 0:.2f}x, "
            f"analytic {timed.speed.analytic_speedup:.2f}x"
        )
    return results, runs


def _caption_quality(run: EvalResult, records) -> dict[str, float | None]:
    q = run.quality.get("all", {})
    refs = {r.image_id: {x.strip().lower() for x in r.references} for r in records}
    hits = [p["prediction"].strip().lower() in refs[p["id"]] for p in run.predictions]
    metrics = {"BLEU-4": "Bleu_4", "METEOR": "METEOR", "ROUGE-L": "ROUGE_L", "CIDEr": "CIDEr"}
    return {k: q.get(v) for k, v in metrics.items()} | {"exact_match": sum(hits) / max(len(hits), 1)}


def vqa(runner: Runner, ee: EarlyExitVLM, world: World, chosen: float) -> dict[str, VQATask]:
    out = {}
    for name, records in (("shapes", world.vqa["test"]), ("easyvqa", world.easyvqa["test"])):
        run = runner.vqa(f"VQA {name} FREE", ee, records, chosen, **runner.fast)
        timed_records = records[: runner.cfg.timing_images]
        timed = runner.vqa(f"VQA {name} FREE vs full, batch 1", ee, timed_records, chosen, **runner.timing)
        full = runner.vqa(f"VQA {name} full model", ee, records, layer=runner.num_layers, **runner.fast)
        out[name] = VQATask(full.score, run.score, Speed.of(timed.speed))
        runner.progress.say(f"VQA {name}: accuracy full {full.score:.3f} vs FREE {run.score:.3f}")
    return out


def speculative(runner: Runner, ee: EarlyExitVLM, records, threshold: float) -> Speculative:
    """Speculative mode at the chosen threshold, one request at a time, timed against the full model (modes
    alternate to cancel drift; the fastest of two runs each counts)."""
    spec_s = full_s = 0.0
    identical, drafted, accepted = True, 0, 0
    bar = runner.progress.bar(len(records), "speculative vs full, batch 1")
    for record in records:
        inputs = runner.bundle.inputs([load_image(record.image)], [CAPTION_PROMPT])
        runs = [
            (mode, ee.generate(**inputs, max_new_tokens=runner.cfg.max_new_tokens, mode=mode, threshold=threshold))
            for mode in ("speculative", "full", "full", "speculative")
        ]
        spec = [o for m, o in runs if m == "speculative"]
        full = [o for m, o in runs if m == "full"]
        identical &= all(torch.equal(s.sequences, full[0].sequences) for s in spec)
        spec_s += min(o.stats.seconds_decode for o in spec)
        full_s += min(o.stats.seconds_decode for o in full)
        drafted += spec[0].stats.speculative["drafted"]
        accepted += spec[0].stats.speculative["accepted_drafts"]
        bar.update(1)
    bar.close()
    out = Speculative(
        threshold=threshold,
        decode_speedup=full_s / spec_s if spec_s else None,
        acceptance_rate=accepted / drafted if drafted else 0.0,
        drafted=drafted,
        accepted_drafts=accepted,
        identical_to_full=identical,
        images=len(records),
    )
    runner.progress.say(f"speculative: {asdict(out)}")
    return out


def compare(
    runner: Runner, models: dict[str, EarlyExitVLM], world: World, chosen: float, main: SplitRuns, methods: bool
) -> tuple[list[Compared], dict[str, EvalResult]]:
    """Each model at its own best dev threshold (FREE's grid, or with `methods` each method's), timed on test like
    the main table (FREE's runs are reused); the rows, and each model's test run."""
    dev, test = world.captions["dev"], world.captions["test"]
    params = method_parameters(models) if methods else {}
    rows, runs = [], {}
    for name, ee in models.items():
        method = name if methods else "free"
        if name == "free":
            threshold, run, timed = chosen, main.free, main.timed
        else:
            threshold, _ = runner.choose_threshold(ee, dev, method)
            run, timed = runner.quality_and_speed("test", ee, test, threshold, method)
        runs[name] = run
        rows.append(Compared(name, threshold, run.score, Speed.of(timed.speed), params.get(name)))
        speed = f"analytic {timed.speed.analytic_speedup:.2f}x, decode {timed.speed.decode_speedup or 0:.2f}x"
        runner.progress.say(
            f"{'method' if methods else 'ablation'} {name}: {threshold:g}, CIDEr {run.score:.3f}, {speed}"
        )
    return rows, runs


def method_models(ee: dict[str, EarlyExitVLM], model) -> dict[str, EarlyExitVLM]:
    """FREE and the baselines, and MuE: FREE's exits as plain heads on `model`, leaving by MuE's rule."""
    mue = EarlyExitVLM(model, replace(ee["free"].exit_config, kind="head"))
    return {m: ee[m] for m in ("free", "deeblip", "pabee", "leeblip")} | {"mue": mue}
