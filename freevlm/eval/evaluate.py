"""The evaluation loop: records in, predictions, official metrics and a speed report out.

Works on any `EarlyExitVLM` plus a processor - an object with `inputs(images, prompts) -> model inputs`,
`decode(token_ids) -> texts` and (for VisDial) a Hugging Face `tokenizer`; `loading.VLMBundle` is one, and the
demo passes its own in-memory one. `threshold` is the knob of `method`'s exit rule (FREE: the confidence policy;
see `freevlm.methods`); `layer` instead forces every token out at that exit (or the final layer), for the
per-layer ("mid-crisis") curve.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from ..data.images import load_image
from ..data.records import CaptionRecord, VisDialRecord, VQARecord
from ..decoding.config import DecodeConfig
from ..decoding.engine import resolve_batch_policy
from ..decoding.policies import Copies
from ..methods import exit_rule, get_method
from ..model import EarlyExitVLM
from .captions import caption_metrics, tokenize
from .likelihood import option_log_likelihoods
from .predictions import PredictionLog
from .processes import Processes
from .speed import SpeedMeter, SpeedReport
from .visdial import visdial_metrics
from .vqa import vqa_scores

CAPTION_PROMPT = "a photo of"
VQA_PROMPT = "Question: {question} Short answer:"
ANSWER_DECODING = DecodeConfig(max_new_tokens=10)  # VQA and VisDial answers are a few words


@dataclass
class EvalResult:
    task: str
    threshold: float | None  # None when `layer` forced the exits
    layer: int | None
    metric: str  # the primary metric (what a sweep optimises)
    score: float | None  # its value (None without labels)
    quality: dict
    speed: SpeedReport
    agreement_with_full: float | None  # fraction of outputs identical to the full model's (None if not run)
    predictions: list[dict] = field(default_factory=list)
    seconds: float = 0.0

    def as_dict(self, predictions: bool = True) -> dict:
        out = {k: v for k, v in self.__dict__.items() if k not in ("speed", "predictions")}
        out["speed"] = self.speed.as_dict()
        if predictions:
            out["predictions"] = self.predictions
        return out


@dataclass
class _Generated:
    texts: list[str]
    full_texts: list[str] | None
    exit_layers: list[list[int]]
    speed: SpeedReport
    threshold: float | None  # None when `layer` forced the exits
    layer: int | None
    started: float  # time.perf_counter() when evaluation began
    main: bool = True  # the main process (the only one that scores)

    def result(self, task: str, metric: str, score: float | None, quality: dict, ids, **extra) -> EvalResult:
        """The `EvalResult` of these outputs scored as `task` (`extra`: more per-prediction fields)."""
        agreement = None
        if self.full_texts is not None:
            agreement = sum(a == b for a, b in zip(self.texts, self.full_texts)) / max(len(self.texts), 1)
        rows = []
        for i, key in enumerate(ids):
            row = {"id": key, "prediction": self.texts[i], "exit_layers": self.exit_layers[i]}
            if self.full_texts is not None:
                row["full_prediction"] = self.full_texts[i]
            rows.append(row | {k: v[i] for k, v in extra.items()})
        seconds = time.perf_counter() - self.started
        return EvalResult(
            task, self.threshold, self.layer, metric, score, quality, self.speed, agreement, rows, seconds
        )


# what evaluation decides itself: the exit rule (`method` at `threshold`, or `layer`) and how rows share a batch
SET_BY_EVALUATION = ("mode", "threshold", "policy", "batch_policy", "return_engine")


def _configs(
    ee: EarlyExitVLM, config: DecodeConfig, threshold: float, layer: int | None, method: str, batch_size: int
) -> tuple[DecodeConfig, DecodeConfig]:
    """(early exit, full model) decode configs: `config`'s options, the method's exit rule, and every row decoding
    what it would alone: with recompute, the batch policy "auto" resolves to at this batch size, named so that
    "auto"'s gate (which turns exits off in small batches) stays off; with propagate, where riding along differs,
    rows are compacted."""
    spec = get_method(method)
    if ee.exit_config.kind != spec.exit_kind:
        raise ValueError(
            f"method {method!r} runs on exits of kind {spec.exit_kind!r}, but these exits are {ee.exit_config.kind!r}"
        )
    fixed = [name for name in SET_BY_EVALUATION if getattr(config, name) != getattr(DecodeConfig, name)]
    if fixed:
        raise ValueError(f"evaluation sets {', '.join(fixed)} itself (the method's rule at `threshold`, or `layer`)")
    exact = resolve_batch_policy("auto", batch_size) if config.kv == "recompute" else "per_row"
    config = replace(config, batch_policy=exact)
    return replace(config, policy=exit_rule(method, threshold, layer)), replace(config, mode="full")


@torch.no_grad()
def generate_texts(
    ee: EarlyExitVLM,
    processor,
    images: Sequence[Path],
    prompts: Sequence[str],
    threshold: float = DecodeConfig.threshold,
    layer: int | None = None,
    config: DecodeConfig | None = None,
    method: str = "free",
    batch_size: int = 8,
    compare_full: bool = True,
    timing_repeats: int = 1,
    ids: Sequence | None = None,
    log: PredictionLog | None = None,
    progress_bar: bool = False,
) -> _Generated:
    """Early-exit answers for every (image, prompt), decoded with `config` (default: `DecodeConfig()`) under
    `method`'s exit rule at `threshold` (or every token out at `layer`); with `compare_full`, the full model on the
    same batches in alternating order, for wall-clock ratios measured in this run (one untimed warm-up of each mode
    first).

    `timing_repeats` > 1 decodes each batch that many times per mode and keeps the fastest run of each (outputs
    are deterministic), which steadies ratios on a busy machine.

    Under `accelerate launch` the batches are dealt out across the processes (`Processes`) and every process ends
    with every output; the speed report's clocks are the main process's batches, its token counts every record's.
    `log` (a `PredictionLog`, `ids` naming the records in it): each finished record is appended as a line, and
    records already there (a resumed run) are not decoded again; a batch is decoded whole, so its outputs are those
    of an uninterrupted run. `progress_bar`: one bar on the main process, records done across processes and the ETA.
    """
    started = time.perf_counter()
    early_config, full_config = _configs(ee, config or DecodeConfig(), threshold, layer, method, batch_size)
    ids = list(range(len(images))) if ids is None else list(ids)
    meter = SpeedMeter(ee.backbone.num_layers)

    def decode(b: int, index: list[int], first: bool) -> list[dict]:
        inputs = processor.inputs([load_image(images[i]) for i in index], [prompts[i] for i in index])
        early = functools.partial(ee.generate, **inputs, config=early_config)
        full = functools.partial(ee.generate, **inputs, config=full_config) if compare_full else None
        return _decode_batch(processor, early, full, meter, timing_repeats, warm_up=first, parity=b)

    processes = Processes.current()
    rows = _deal(decode, len(images), batch_size, processes, ids, log, progress_bar)
    ordered = [rows[i] for i in range(len(images))]
    full_texts = [row["full_prediction"] for row in ordered] if compare_full else None
    exit_layers = [row["exit_layers"] for row in ordered]
    meter.recount(exit_layers, sum(row.get("full_tokens", 0) for row in ordered))
    threshold = None if layer is not None else threshold
    texts = [row["prediction"] for row in ordered]
    return _Generated(texts, full_texts, exit_layers, meter.report(), threshold, layer, started, processes.is_main)


def _deal(decode, total: int, batch_size: int, processes: Processes, ids, log, progress_bar: bool) -> dict[int, dict]:
    """Every record's row (`decode(b, index, first)`: the rows of batch `b`, records `index`; `first`: this
    process's first batch), batch b decoded by process b mod N, each round's rows gathered on every process. Records
    already in `log` are kept and complete batches skipped; new rows are appended to it by the main process, which
    alone shows the bar."""
    rows: dict[int, dict] = dict(log.done) if log is not None else {}
    batches = [list(range(s, min(s + batch_size, total))) for s in range(0, total, batch_size)]
    todo = [(b, index) for b, index in enumerate(batches) if not all(i in rows for i in index)]
    write = log is not None and processes.is_main
    if write:
        log.open()
    bar = _progress_bar(total, len(rows), processes.is_main and progress_bar)
    try:
        for r in range(processes.rounds(len(todo))):
            mine = processes.mine(todo, r)
            new = []
            if mine is not None:
                b, index = mine
                new = decode(b, index, r == 0)
                for i, row in zip(index, new):
                    row["index"], row["id"] = i, ids[i]
            new = [row for row in processes.gather(new) if row["index"] not in rows]  # resumed: the missing lines
            rows.update((row["index"], row) for row in new)
            if write:
                log.append(new)
            bar.update(len(new))
    finally:
        bar.close()
        if write:
            log.close()
    return rows


def _decode_batch(processor, early, full, meter: SpeedMeter, repeats: int, warm_up: bool, parity: int) -> list[dict]:
    """One batch, early exit (and with `full`, the full model, timed against it): a row per record."""
    if full is None:
        out = early()
        meter.add(out)
        return _rows(processor, out)
    if warm_up:
        early(), full()  # lazy initialisation and allocator growth stay out of the timings
    outs, f_outs = [], []
    for r in range(repeats):  # alternate which mode goes first, batch by batch and repeat by repeat
        if (parity + r) % 2 == 0:
            f_outs.append(full()), outs.append(early())
        else:
            outs.append(early()), f_outs.append(full())
    fastest = lambda runs: min(runs, key=lambda o: o.stats.seconds_total)  # noqa: E731
    out, f_out = fastest(outs), fastest(f_outs)
    meter.add(out, f_out)
    full_rows = _rows(processor, f_out)
    return [
        row | {"full_prediction": f["prediction"], "full_tokens": len(f["exit_layers"])}
        for row, f in zip(_rows(processor, out), full_rows)
    ]


def _rows(processor, out) -> list[dict]:
    texts = _new_text(processor, out)
    layers = [[int(e) for e in row if e >= 0] for row in out.exit_layers.tolist()]
    return [{"prediction": t, "exit_layers": e} for t, e in zip(texts, layers)]


def _progress_bar(total: int, done: int, show: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=done, desc="records", unit="record", disable=not show, dynamic_ncols=True)


def _new_text(processor, out) -> list[str]:
    prompt_len = out.sequences.shape[1] - out.exit_layers.shape[1]
    return processor.decode(out.sequences[:, prompt_len:])


def evaluate_captioning(
    ee: EarlyExitVLM,
    processor,
    records: Sequence[CaptionRecord],
    threshold: float = DecodeConfig.threshold,
    layer: int | None = None,
    prompt: str = CAPTION_PROMPT,
    spice: bool | None = None,
    only: Sequence[str] | None = None,
    tokenizer=tokenize,
    **run,
) -> EvalResult:
    """COCO metrics of the captions (per NoCaps domain too, when records carry one); `tokenizer`: see
    `caption_metrics`; `run`: `generate_texts`' `config`, `method`, batching and timing."""
    images, prompts, ids = caption_inputs(records, prompt)
    gen = generate_texts(ee, processor, images, prompts, threshold, layer, ids=ids, **run)
    return score_captions(gen, records, spice, only, tokenizer)


def caption_inputs(records: Sequence[CaptionRecord], prompt: str = CAPTION_PROMPT) -> tuple[list, list, list]:
    """(images, prompts, ids) of caption records."""
    return [r.image for r in records], [prompt] * len(records), [r.image_id for r in records]


def score_captions(
    gen: _Generated,
    records: Sequence[CaptionRecord],
    spice: bool | None = None,
    only: Sequence[str] | None = None,
    tokenizer=tokenize,
) -> EvalResult:
    ids = [r.image_id for r in records]
    if not gen.main:  # the main process scores
        return gen.result("captions", "CIDEr", None, {}, ids)
    keys = list(range(len(records)))  # records may repeat an image id across files; scoring keys stay unique
    quality, score = {}, None
    if all(r.references for r in records):
        domains = {k: r.domain for k, r in zip(keys, records)} if all(r.domain for r in records) else None
        quality = caption_metrics(
            {k: r.references for k, r in zip(keys, records)},
            dict(zip(keys, gen.texts)),
            groups=domains,
            spice=spice,
            only=only,
            tokenizer=tokenizer,
        )
        score = quality["all"]["CIDEr"]
    elif any(r.references for r in records):
        raise ValueError("some caption records have references and some do not: score a labelled split")
    return gen.result("captions", "CIDEr", score, quality, ids)


def evaluate_vqa(
    ee: EarlyExitVLM,
    processor,
    records: Sequence[VQARecord],
    threshold: float = DecodeConfig.threshold,
    layer: int | None = None,
    prompt: str = VQA_PROMPT,
    metric: str = "vqa",
    config: DecodeConfig | None = None,
    **run,
) -> EvalResult:
    """VQA accuracy (official; `metric="exact"` for GQA), overall and per answer/question type; `config` defaults
    to `ANSWER_DECODING`, `run`: `generate_texts`' `method`, batching and timing."""
    images, prompts, ids = vqa_inputs(records, prompt)
    gen = generate_texts(ee, processor, images, prompts, threshold, layer, config or ANSWER_DECODING, ids=ids, **run)
    return score_vqa(gen, records, metric)


def vqa_inputs(records: Sequence[VQARecord], prompt: str = VQA_PROMPT) -> tuple[list, list, list]:
    """(images, prompts, ids) of VQA records."""
    prompts = [prompt.format(question=r.question) for r in records]
    return [r.image for r in records], prompts, [r.question_id for r in records]


def score_vqa(gen: _Generated, records: Sequence[VQARecord], metric: str = "vqa") -> EvalResult:
    ids = [r.question_id for r in records]
    if not gen.main:  # the main process scores
        return gen.result("vqa", "accuracy", None, {}, ids)
    quality, score, per_question = {}, None, {}
    if all(r.answers for r in records):
        s = vqa_scores(
            gen.texts,
            [r.answers for r in records],
            [r.answer_type for r in records],
            [r.question_type for r in records],
            metric=metric,
        )
        quality = {k: v for k, v in s.as_dict().items() if k != "per_question"}
        quality["metric"] = metric
        answerable = [r.answerable for r in records]
        if all(a is not None for a in answerable):  # VizWiz: accuracy on answerable / unanswerable questions
            for flag, name in ((True, "answerable"), (False, "unanswerable")):
                vals = [v for v, a in zip(s.per_question, answerable) if a is flag]
                quality[f"accuracy_{name}"] = sum(vals) / len(vals) if vals else None
        score = s.accuracy
        per_question = {"accuracy": s.per_question}
    elif any(r.answers for r in records):
        raise ValueError("some questions have answers and some do not: score a labelled split")
    return gen.result("vqa", "accuracy", score, quality, ids, **per_question)


def visdial_prompt(record: VisDialRecord) -> str:
    turns = " ".join(f"Question: {q}? Answer: {a}." for q, a in record.history)
    return f"{record.caption}. {turns} Question: {record.question}? Answer:".replace("  ", " ")


def evaluate_visdial(
    ee: EarlyExitVLM,
    processor,
    records: Sequence[VisDialRecord],
    threshold: float = DecodeConfig.threshold,
    layer: int | None = None,
    option_batch_size: int = 50,
    config: DecodeConfig | None = None,
    method: str = "free",
    **run,
) -> EvalResult:
    """Rank each round's options by early-exit log-likelihood under `method`'s exit rule (MRR, R@k, mean rank,
    NDCG); the speed report comes from generating each round's answer (`config`: default `ANSWER_DECODING`), early
    exit against full; `run`: `generate_texts`' batching and timing."""
    prompts = [visdial_prompt(r) for r in records]
    images = [r.image for r in records]
    ids = [f"{r.image_id}:{r.round}" for r in records]
    config = config or ANSWER_DECODING
    gen = generate_texts(ee, processor, images, prompts, threshold, layer, config, method, ids=ids, **run)
    if not gen.main:  # the main process ranks the options and scores
        return gen.result("visdial", "mrr", None, {}, ids, top_option=[None] * len(records))
    scores = [
        option_log_likelihoods(
            ee, processor, load_image(r.image), prompt, r.options, threshold, layer, option_batch_size, method
        )
        for r, prompt in zip(records, prompts)
    ]
    quality = visdial_metrics(scores, [r.gt_index for r in records], [r.relevance for r in records])
    top = [r.options[max(range(len(s)), key=lambda i: s[i])] for r, s in zip(records, scores)]
    return gen.result("visdial", "mrr", quality.get("mrr"), quality, ids, top_option=top)


EVALUATORS = {"captions": evaluate_captioning, "vqa": evaluate_vqa, "visdial": evaluate_visdial}
# what a shared evaluation (`evaluate_many`) needs of a task: its inputs, its scoring and its default decoding
SHARED_TASKS = {
    "captions": (caption_inputs, score_captions, DecodeConfig()),
    "vqa": (vqa_inputs, score_vqa, ANSWER_DECODING),
}


def evaluate(
    task: str, ee: EarlyExitVLM, processor, records: Sequence, threshold: float = DecodeConfig.threshold, **kwargs
) -> EvalResult:
    if task not in EVALUATORS:
        raise ValueError(f"unknown task {task!r}: one of {sorted(EVALUATORS)}")
    if not records:
        raise ValueError("no records to evaluate")
    return EVALUATORS[task](ee, processor, records, threshold, **kwargs)


def evaluate_many(
    task: str,
    ee: EarlyExitVLM,
    processor,
    records: Sequence,
    rules: Sequence[tuple[float | None, int | None]],
    prompt: str | None = None,
    config: DecodeConfig | None = None,
    method: str = "free",
    batch_size: int = 8,
    compare_full: bool = True,
    progress_bar: bool = False,
    log: PredictionLog | None = None,
    **score,
) -> list[EvalResult]:
    """`evaluate` under every exit rule of `rules` ((threshold, None), or (None, layer) for every token out at
    `layer`), decoded together (`generate_many`): each result's outputs are what `evaluate` gives for its rule, its
    speed report counts tokens but has no clock (the rules share one); with `compare_full`, the full model is decoded
    once per batch for agreement; `log`: see `generate_many`. `score`: the task's scoring keywords (`spice`, `only`,
    `tokenizer`; `metric`)."""
    if task not in SHARED_TASKS:
        raise ValueError(f"evaluate_many runs {sorted(SHARED_TASKS)}, not {task!r} (evaluate each rule apart)")
    if not records:
        raise ValueError("no records to evaluate")
    inputs, scoring, default = SHARED_TASKS[task]
    images, prompts, ids = inputs(records) if prompt is None else inputs(records, prompt)
    config = config or default
    generated = generate_many(
        ee, processor, images, prompts, rules, config, method, batch_size, compare_full, progress_bar, ids, log
    )
    if task == "captions" and generated[0].main and all(r.references for r in records):
        texts = [t for r in records for t in r.references] + [t for gen in generated for t in gen.texts]
        score["tokenizer"] = tokenized_once(score.get("tokenizer", tokenize), texts)
    return [scoring(gen, records, **score) for gen in generated]


def tokenized_once(tokenizer, texts: Sequence[str]):
    """`tokenizer` (PTB: a Java process per call) run once over `texts`, as a tokenizer that looks them up: it
    tokenizes each caption on its own, so every rule's scoring gets what its own call would give."""
    unique = list(dict.fromkeys(texts))
    tokens = tokenizer({i: [t] for i, t in enumerate(unique)})
    table = {t: tokens[i][0] for i, t in enumerate(unique)}
    return lambda captions: {key: [table[t] for t in texts] for key, texts in captions.items()}


@torch.no_grad()
def generate_many(
    ee: EarlyExitVLM,
    processor,
    images: Sequence[Path],
    prompts: Sequence[str],
    rules: Sequence[tuple[float | None, int | None]],
    config: DecodeConfig | None = None,
    method: str = "free",
    batch_size: int = 8,
    compare_full: bool = False,
    progress_bar: bool = False,
    ids: Sequence | None = None,
    log: PredictionLog | None = None,
) -> list[_Generated]:
    """What `generate_texts` gives under each (threshold, layer) of `rules`, with each batch's image and prompt
    encoded once for all of them: the batch is decoded as one copy per rule side by side (`Copies`), each copy
    exactly as it would be decoded alone. Batches are dealt out across processes, and `log` (one line per record,
    every rule's output) kept and resumed, as in `generate_texts`."""
    if not rules:
        raise ValueError("no exit rules to evaluate")
    started = time.perf_counter()
    config = config or DecodeConfig()
    rows_of_copies = batch_size * len(rules)
    policies = [_configs(ee, config, t, layer, method, rows_of_copies)[0].policy for t, layer in rules]
    shared = replace(_configs(ee, config, *rules[0], method, rows_of_copies)[0], policy=Copies(policies))
    full_config = _configs(ee, config, *rules[0], method, batch_size)[1]

    def decode(b: int, index: list[int], first: bool) -> list[dict]:
        inputs = processor.inputs([load_image(images[i]) for i in index], [prompts[i] for i in index])
        out = ee.generate(**inputs, config=shared)
        per_rule = [_rows(processor, _copy(out, g, len(index))) for g in range(len(rules))]
        new = [{"rules": [rule[k] for rule in per_rule]} for k in range(len(index))]
        if compare_full:
            for row, full in zip(new, _rows(processor, ee.generate(**inputs, config=full_config))):
                row["full_prediction"] = full["prediction"]
        return new

    processes = Processes.current()
    ids = list(range(len(images))) if ids is None else list(ids)
    rows = _deal(decode, len(images), batch_size, processes, ids, log, progress_bar)
    ordered = [rows[i] for i in range(len(images))]
    full_texts = [row["full_prediction"] for row in ordered] if compare_full else None
    generated = []
    for g, (threshold, layer) in enumerate(rules):
        texts = [row["rules"][g]["prediction"] for row in ordered]
        exit_layers = [row["rules"][g]["exit_layers"] for row in ordered]
        meter = SpeedMeter(ee.backbone.num_layers)  # no batch timed: tokens only
        meter.recount(exit_layers, 0)
        threshold = None if layer is not None else threshold
        gen = _Generated(texts, full_texts, exit_layers, meter.report(), threshold, layer, started, processes.is_main)
        generated.append(gen)
    return generated


def _copy(out, g: int, n: int):
    """Copy `g`'s rows (n of them) of a `Copies` output, as one copy's `GenerateOutput`."""
    rows = slice(g * n, (g + 1) * n)
    return replace(out, sequences=out.sequences[rows], exit_layers=out.exit_layers[rows], engine=None)
