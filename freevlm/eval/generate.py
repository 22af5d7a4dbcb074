"""Decoding an evaluation's records: each (image, prompt) under an exit rule, batch by batch, the full model beside
it for timing; several exit rules side by side as `Copies` of one batch (a sweep's); batches dealt out across the
processes `accelerate launch` started and each finished record logged for `--resume`. Scoring is the tasks'
(`evaluate.py`)."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..data.images import load_image
from ..decoding.config import DecodeConfig
from ..decoding.engine import resolve_batch_policy
from ..decoding.policies import Copies
from ..methods import exit_rule, get_method
from ..model import EarlyExitVLM
from .options import EvalOptions
from .predictions import PredictionLog
from .processes import Processes
from .speed import SpeedMeter, SpeedReport


@dataclass
class Generated:
    """One exit rule's outputs over every record, in record order, and its speed report."""

    texts: list[str]
    full_texts: list[str] | None
    exit_layers: list[list[int]]
    speed: SpeedReport
    threshold: float | None  # None when `layer` forced the exits
    layer: int | None
    started: float  # time.perf_counter() when evaluation began
    main: bool = True  # the main process (the only one that scores)
    scores: list | None = None  # per record, what `score_record` gave under this rule (None without it)


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
    options: EvalOptions | None = None,
    ids: Sequence | None = None,
    log: PredictionLog | None = None,
    score_record: Callable[[int], list] | None = None,
) -> Generated:
    """Early-exit answers for every (image, prompt), decoded with `options.config` (default: `DecodeConfig()`)
    under `options.method`'s exit rule at `threshold` (or every token out at `layer`), `options.batch_size` records
    a batch; with `options.compare_full`, the full model on the same batches in alternating order, for wall-clock
    ratios measured in this run (one untimed warm-up of each mode first).

    `options.timing_repeats` > 1 decodes each batch that many times per mode and keeps the fastest run of each
    (outputs are deterministic), which steadies ratios on a busy machine.

    Under `accelerate launch` the batches are dealt out across the processes (`Processes`) and every process ends
    with every output; the speed report's clocks are the main process's batches, its counts of tokens and of
    parameters touched (the ideal speedup) every record's.
    `log` (a `PredictionLog`, `ids` naming the records in it): each finished record is appended as a line, and
    records already there (a resumed run) are not decoded again; a batch is decoded whole, so its outputs are those
    of an uninterrupted run. `options.progress_bar`: one bar on the main process, records done across processes and
    the ETA.
    `score_record(i)`: record i's scores under each rule (here one; VisDial: its options' log-likelihoods), computed
    with its batch by the process that decodes it and kept in its line, so a resumed run does not compute them again.
    """
    started = time.perf_counter()
    options = options or EvalOptions()
    config, compare_full = options.config or DecodeConfig(), options.compare_full
    early_config, full_config = _configs(ee, config, threshold, layer, options.method, options.batch_size)
    ids = list(range(len(images))) if ids is None else list(ids)
    meter = SpeedMeter(ee.backbone.num_layers)

    def decode(b: int, index: list[int], first: bool) -> list[dict]:
        inputs = processor.inputs([load_image(images[i]) for i in index], [prompts[i] for i in index])
        early = functools.partial(ee.generate, **inputs, config=early_config)
        full = functools.partial(ee.generate, **inputs, config=full_config) if compare_full else None
        rows = _decode_batch(processor, early, full, meter, options.timing_repeats, warm_up=first, parity=b)
        if score_record is not None:
            for i, row in zip(index, rows):
                (row["scores"],) = score_record(i)
        return rows

    processes = Processes.current()
    rows = _deal(decode, len(images), options.batch_size, processes, ids, log, options.progress_bar)
    ordered = [rows[i] for i in range(len(images))]
    full_texts = [row["full_prediction"] for row in ordered] if compare_full else None
    exit_layers = [row["exit_layers"] for row in ordered]
    work = [row["work"] for row in ordered if "work" in row]  # every batch's parameters touched, early and full
    params = (sum(w[0] for w in work), sum(w[1] for w in work)) if compare_full else (None, None)
    meter.recount(exit_layers, sum(row.get("full_tokens", 0) for row in ordered), *params)
    threshold = None if layer is not None else threshold
    texts = [row["prediction"] for row in ordered]
    scores = [row["scores"] for row in ordered] if score_record is not None else None
    report = meter.report()
    return Generated(texts, full_texts, exit_layers, report, threshold, layer, started, processes.is_main, scores)


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
    rows = [
        row | {"full_prediction": f["prediction"], "full_tokens": len(f["exit_layers"])}
        for row, f in zip(_rows(processor, out), full_rows)
    ]
    rows[0]["work"] = [out.stats.work.params_touched, f_out.stats.work.params_touched]  # the batch's, once
    return rows


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


@torch.no_grad()
def generate_many(
    ee: EarlyExitVLM,
    processor,
    images: Sequence[Path],
    prompts: Sequence[str],
    rules: Sequence[tuple[float | None, int | None]],
    options: EvalOptions | None = None,
    ids: Sequence | None = None,
    log: PredictionLog | None = None,
    score_record: Callable[[int], list] | None = None,
) -> list[Generated]:
    """What `generate_texts` gives under each (threshold, layer) of `rules`, with each batch's image and prompt
    encoded once for all of them: the batch is decoded as one copy per rule side by side (`Copies`), each copy
    exactly as it would be decoded alone. Batches are dealt out across processes, and `log` (one line per record,
    every rule's output) kept and resumed, and `score_record` (one score per rule) kept, as in `generate_texts`;
    no clock (`options.timing_repeats` does not apply)."""
    if not rules:
        raise ValueError("no exit rules to evaluate")
    started = time.perf_counter()
    options = options or EvalOptions()
    config, method, batch_size = options.config or DecodeConfig(), options.method, options.batch_size
    compare_full = options.compare_full
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
        if score_record is not None:
            for i, row in zip(index, new):
                for rule, scores in zip(row["rules"], score_record(i), strict=True):
                    rule["scores"] = scores
        return new

    processes = Processes.current()
    ids = list(range(len(images))) if ids is None else list(ids)
    rows = _deal(decode, len(images), options.batch_size, processes, ids, log, options.progress_bar)
    ordered = [rows[i] for i in range(len(images))]
    full_texts = [row["full_prediction"] for row in ordered] if compare_full else None
    generated = []
    for g, (threshold, layer) in enumerate(rules):
        texts = [row["rules"][g]["prediction"] for row in ordered]
        exit_layers = [row["rules"][g]["exit_layers"] for row in ordered]
        scores = [row["rules"][g]["scores"] for row in ordered] if score_record is not None else None
        meter = SpeedMeter(ee.backbone.num_layers)  # no batch timed: tokens only
        meter.recount(exit_layers, 0)
        threshold = None if layer is not None else threshold
        report = meter.report()
        generated.append(
            Generated(texts, full_texts, exit_layers, report, threshold, layer, started, processes.is_main, scores)
        )
    return generated


def _copy(out, g: int, n: int):
    """Copy `g`'s rows (n of them) of a `Copies` output, as one copy's `GenerateOutput`."""
    rows = slice(g * n, (g + 1) * n)
    return replace(out, sequences=out.sequences[rows], exit_layers=out.exit_layers[rows], engine=None)
