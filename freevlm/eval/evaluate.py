"""The evaluation loop: records in, predictions, official metrics and a speed report out.

Works on any `EarlyExitVLM` plus a processor - an object with `inputs(images, prompts) -> model inputs`,
`decode(token_ids) -> texts` and (for VisDial) a Hugging Face `tokenizer`; `loading.VLMBundle` is one, and the
demo passes its own in-memory one. `threshold` is the knob of the method's exit rule (FREE: the confidence policy;
see `freevlm.methods`); `layer` instead forces every token out at that exit (or the final layer), for the
per-layer ("mid-crisis") curve. Everything else about a run is one `EvalOptions`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from ..data.images import load_image
from ..data.records import CaptionRecord, VisDialRecord, VQARecord
from ..decoding.config import DecodeConfig
from ..loading import CAPTION_PROMPT
from ..model import EarlyExitVLM
from .captions import caption_metrics, tokenize
from .generate import Generated, generate_many, generate_texts
from .likelihood import option_log_likelihoods_many
from .options import EvalOptions
from .predictions import PredictionLog
from .speed import SpeedReport
from .visdial import visdial_metrics
from .vqa import vqa_scores

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


def _scored(gen: Generated, task: str, metric: str, score: float | None, quality: dict, ids, **extra) -> EvalResult:
    """The `EvalResult` of `gen`'s outputs scored as `task` (`extra`: more per-prediction fields)."""
    agreement = None
    if gen.full_texts is not None:
        agreement = sum(a == b for a, b in zip(gen.texts, gen.full_texts)) / max(len(gen.texts), 1)
    rows = []
    for i, key in enumerate(ids):
        row = {"id": key, "prediction": gen.texts[i], "exit_layers": gen.exit_layers[i]}
        if gen.full_texts is not None:
            row["full_prediction"] = gen.full_texts[i]
        rows.append(row | {k: v[i] for k, v in extra.items()})
    seconds = time.perf_counter() - gen.started
    return EvalResult(task, gen.threshold, gen.layer, metric, score, quality, gen.speed, agreement, rows, seconds)


def caption_inputs(records: Sequence[CaptionRecord], prompt: str = CAPTION_PROMPT) -> tuple[list, list, list]:
    """(images, prompts, ids) of caption records."""
    return [r.image for r in records], [prompt] * len(records), [r.image_id for r in records]


def score_captions(
    gen: Generated,
    records: Sequence[CaptionRecord],
    spice: bool | None = None,
    only: Sequence[str] | None = None,
    tokenizer=tokenize,
) -> EvalResult:
    ids = [r.image_id for r in records]
    if not gen.main:  # the main process scores
        return _scored(gen, "captions", "CIDEr", None, {}, ids)
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
    return _scored(gen, "captions", "CIDEr", score, quality, ids)


def vqa_inputs(records: Sequence[VQARecord], prompt: str = VQA_PROMPT) -> tuple[list, list, list]:
    """(images, prompts, ids) of VQA records."""
    prompts = [prompt.format(question=r.question) for r in records]
    return [r.image for r in records], prompts, [r.question_id for r in records]


def score_vqa(gen: Generated, records: Sequence[VQARecord], metric: str = "vqa") -> EvalResult:
    ids = [r.question_id for r in records]
    if not gen.main:  # the main process scores
        return _scored(gen, "vqa", "accuracy", None, {}, ids)
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
    return _scored(gen, "vqa", "accuracy", score, quality, ids, **per_question)


def visdial_prompt(record: VisDialRecord) -> str:
    turns = " ".join(f"Question: {q}? Answer: {a}." for q, a in record.history)
    return f"{record.caption}. {turns} Question: {record.question}? Answer:".replace("  ", " ")


def visdial_inputs(records: Sequence[VisDialRecord]) -> tuple[list, list, list]:
    """(images, prompts, ids) of VisDial rounds."""
    ids = [f"{r.image_id}:{r.round}" for r in records]
    return [r.image for r in records], [visdial_prompt(r) for r in records], ids


def option_scorer(ee: EarlyExitVLM, processor, records, rules, option_batch_size: int, method: str):
    """`i -> per rule, round i's option log-likelihoods` (`option_log_likelihoods_many`: one teacher-forced pass per
    round for every rule), for `generate_texts`' `score_record`: each round is scored with its batch, by the process
    that decodes it, and its scores kept in its line of predictions.jsonl."""

    def score(i: int) -> list[list[float]]:
        r = records[i]
        image, prompt = load_image(r.image), visdial_prompt(r)
        return option_log_likelihoods_many(ee, processor, image, prompt, r.options, rules, option_batch_size, method)

    return score


def score_visdial(gen: Generated, records: Sequence[VisDialRecord]) -> EvalResult:
    """Rank each round's options by `gen.scores` (its option log-likelihoods under `gen`'s rule)."""
    ids = [f"{r.image_id}:{r.round}" for r in records]
    if not gen.main:  # the main process ranks the options and scores
        return _scored(gen, "visdial", "mrr", None, {}, ids, top_option=[None] * len(records))
    scores = gen.scores
    quality = visdial_metrics(scores, [r.gt_index for r in records], [r.relevance for r in records])
    top = [r.options[max(range(len(s)), key=lambda i: s[i])] for r, s in zip(records, scores)]
    return _scored(gen, "visdial", "mrr", quality.get("mrr"), quality, ids, top_option=top)


# what an evaluation needs of a task: its inputs, its scoring and its default decoding
TASKS = {
    "captions": (caption_inputs, score_captions, DecodeConfig()),
    "vqa": (vqa_inputs, score_vqa, ANSWER_DECODING),
    "visdial": (visdial_inputs, score_visdial, ANSWER_DECODING),
}


def _resolved(task: str, options: EvalOptions | None) -> tuple[EvalOptions, Callable]:
    """(`options` with the task's default decoding where they give none, the task's scoring)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}: one of {sorted(TASKS)}")
    if options is not None and not isinstance(options, EvalOptions):
        raise TypeError(f"options must be an EvalOptions, got {type(options).__name__}")
    options = options or EvalOptions()
    _, scoring, default = TASKS[task]
    return replace(options, config=options.config or default), scoring


def _prepared(task: str, ee: EarlyExitVLM, processor, records: Sequence, rules, options: EvalOptions) -> tuple:
    """(images, prompts, ids, VisDial's option scorer or None) of `records` under `options`, after the checks."""
    if not records:
        raise ValueError("no records to evaluate")
    if task == "visdial" and options.prompt is not None:
        raise ValueError("prompt does not apply to VisDial (the prompt is built from caption and history)")
    inputs = TASKS[task][0]
    images, prompts, ids = inputs(records) if options.prompt is None else inputs(records, options.prompt)
    scorer = None
    if task == "visdial":
        scorer = option_scorer(ee, processor, records, rules, options.option_batch_size, options.method)
    return images, prompts, ids, scorer


def evaluate(
    task: str,
    ee: EarlyExitVLM,
    processor,
    records: Sequence,
    threshold: float = DecodeConfig.threshold,
    layer: int | None = None,
    options: EvalOptions | None = None,
    log: PredictionLog | None = None,
) -> EvalResult:
    """`records` of `task` ("captions": COCO metrics, per NoCaps domain too when records carry one; "vqa": VQA
    accuracy, overall and per answer and question type; "visdial": each round's options ranked by early-exit
    log-likelihood, MRR, R@k, mean rank, NDCG) decoded under the exit rule at `threshold` (or `layer`), with a speed
    report; `log`: see `generate_texts` (VisDial's option scores are kept in each round's line)."""
    options, scoring = _resolved(task, options)
    images, prompts, ids, scorer = _prepared(task, ee, processor, records, [(threshold, layer)], options)
    gen = generate_texts(ee, processor, images, prompts, threshold, layer, options, ids, log, scorer)
    return scoring(gen, records, **options.scoring(task))


def task_evaluator(task: str) -> Callable[..., EvalResult]:
    """`evaluate` of `task` with its options as keywords (`EvalOptions`' fields): the demo's and the tests'
    shorthand, e.g. `evaluate_vqa(ee, processor, records, 0.6, config=config, compare_full=False)`."""

    def run(
        ee: EarlyExitVLM,
        processor,
        records: Sequence,
        threshold: float = DecodeConfig.threshold,
        layer: int | None = None,
        log: PredictionLog | None = None,
        **options,
    ) -> EvalResult:
        return evaluate(task, ee, processor, records, threshold, layer, EvalOptions(**options), log)

    return run


evaluate_captioning, evaluate_vqa, evaluate_visdial = (task_evaluator(task) for task in TASKS)


def evaluate_many(
    task: str,
    ee: EarlyExitVLM,
    processor,
    records: Sequence,
    rules: Sequence[tuple[float | None, int | None]],
    options: EvalOptions | None = None,
    log: PredictionLog | None = None,
) -> list[EvalResult]:
    """`evaluate` under every exit rule of `rules` ((threshold, None), or (None, layer) for every token out at
    `layer`), decoded together (`generate_many`): each result's outputs are what `evaluate` gives for its rule, its
    speed report counts tokens but has no clock (the rules share one; `options.timing_repeats` does not apply);
    with `compare_full`, the full model is decoded once per batch for agreement; `log`: see `generate_many`.
    VisDial's options are scored once per round for every rule, captions tokenized once for every rule."""
    options, scoring = _resolved(task, options)
    images, prompts, ids, scorer = _prepared(task, ee, processor, records, rules, options)
    generated = generate_many(ee, processor, images, prompts, rules, options, ids, log, scorer)
    score = options.scoring(task)
    if task == "captions" and generated[0].main and all(r.references for r in records):
        texts = [t for r in records for t in r.references] + [t for gen in generated for t in gen.texts]
        score["tokenizer"] = tokenized_once(options.tokenizer, texts)
    return [scoring(gen, records, **score) for gen in generated]


def tokenized_once(tokenizer, texts: Sequence[str]):
    """`tokenizer` (PTB: a Java process per call) run once over `texts`, as a tokenizer that looks them up: it
    tokenizes each caption on its own, so every rule's scoring gets what its own call would give."""
    unique = list(dict.fromkeys(texts))
    tokens = tokenizer({i: [t] for i, t in enumerate(unique)})
    table = {t: tokens[i][0] for i, t in enumerate(unique)}
    return lambda captions: {key: [table[t] for t in texts] for key, texts in captions.items()}
