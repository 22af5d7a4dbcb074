"""The evaluation loop and the sweep end to end on a tiny random BLIP-2 with exits, on fixture datasets."""

import functools
import json
from dataclasses import replace

import dataset_files as files
import pytest
from PIL import Image
from tiny_processor import tiny_bundle

from freevlm import EarlyExitVLM, ExitConfig
from freevlm.data.images import load_image
from freevlm.data.records import VQARecord
from freevlm.data.visdial import read_visdial
from freevlm.data.vqa import read_vqa
from freevlm.decoding.config import DecodeConfig
from freevlm.eval.evaluate import evaluate, evaluate_visdial, evaluate_vqa, visdial_prompt
from freevlm.eval.likelihood import option_log_likelihoods
from freevlm.eval.options import EvalOptions
from freevlm.eval.sweep import sweep, write_sweep
from freevlm.eval.visdial import ndcg
from freevlm.methods import get_method
from freevlm.tiny import tiny_blip2


@pytest.fixture(scope="module")
def tiny():
    model = tiny_blip2("opt", seed=1, num_layers=6)
    ee = EarlyExitVLM(model, ExitConfig([2, 4], init="fresh"))
    return ee, tiny_bundle(model)


def vqa_records(tmp_path, n=10):
    records = []
    for i in range(n):
        image = files.write_image(tmp_path / f"{i}.png", (25 * i, 255 - 20 * i, 90))
        answers = ["red"] * (i % 4) + ["blue"] * (10 - i % 4)
        records.append(VQARecord(image, i, "what color is the square ?", answers, ["other", "yes/no"][i % 2]))
    return records


def test_evaluate_vqa_reports_quality_and_speed(tiny, tmp_path):
    ee, bundle = tiny
    run = functools.partial(
        evaluate_vqa, ee, bundle, prompt="question : {question} answer :", config=DecodeConfig(max_new_tokens=4)
    )
    records = vqa_records(tmp_path, 4)
    said = [p["prediction"] for p in run(records, threshold=0.0, batch_size=2, compare_full=False).predictions]
    # the humans' answers rewritten: 1 to 4 of the 10 give the model's own answer, so each question scores apart
    records = [replace(r, answers=[x] * (i + 1) + ["zebra"] * (9 - i)) for i, (r, x) in enumerate(zip(records, said))]
    result = run(records, threshold=0.0, batch_size=2)
    speed = result.speed
    # threshold 0: every token leaves at the first exit (layer 2 of 6)
    assert speed.exit_histogram == {2: speed.tokens} and speed.tokens > 0
    assert speed.analytic_speedup == pytest.approx(6 / 3)
    assert speed.seconds["total"] > 0 and speed.full_seconds["total"] > 0  # both modes timed in this run
    assert speed.wallclock_speedup == pytest.approx(speed.full_seconds["total"] / speed.seconds["total"])
    assert speed.ideal_speedup > 1.0  # fewer parameters touched than the full model
    assert len(result.predictions) == 4 and all("full_prediction" in p for p in result.predictions)
    # the official accuracy of each prediction against its own record's answers
    assert [p["prediction"] for p in result.predictions] == said
    assert [p["accuracy"] for p in result.predictions] == pytest.approx([0.3, 0.6, 0.9, 1.0])
    assert result.score == pytest.approx(2.8 / 4)
    assert result.quality["per_answer_type"] == pytest.approx({"other": 0.6, "yes/no": 0.8})  # questions 0, 2; 1, 3
    full = run(records, threshold=1.0, batch_size=2)
    assert full.speed.exit_histogram == {6: full.speed.tokens} and full.speed.analytic_speedup == 1.0
    assert full.agreement_with_full == 1.0  # threshold 1.0 is the full model


def test_sweep_writes_json_and_plots(tiny, tmp_path):
    ee, bundle = tiny
    records = vqa_records(tmp_path, 10)
    lines = []
    result = sweep(
        ee,
        bundle,
        "vqa",
        records,
        thresholds=(0.0, 0.05, 1.0),
        progress=lines.append,
        options=EvalOptions(DecodeConfig(max_new_tokens=3), prompt="question : {question} answer :", batch_size=4),
    )
    assert len(result.dev) == len(result.test) == 3
    assert [r.layer for r in result.per_layer] == [2, 4, 6]
    assert len(result.dev[0].predictions) == 2 and len(result.test[0].predictions) == 8  # 20% held out as dev
    best = max(result.dev, key=lambda r: (r.score, r.speed.analytic_speedup))
    assert result.best_threshold == best.threshold
    # forcing the final layer is the full model, so it equals threshold 1.0
    assert result.per_layer[-1].score == result.test[-1].score
    assert [p["prediction"] for p in result.per_layer[-1].predictions] == [
        p["prediction"] for p in result.test[-1].predictions
    ]
    paths = write_sweep(result, tmp_path / "out")
    data = json.loads(paths["results"].read_text())
    assert data["best_threshold"] == result.best_threshold
    assert [row["threshold"] for row in data["test"]] == [0.0, 0.05, 1.0]
    assert data["test"][0]["speed"]["analytic_speedup"] == pytest.approx(2.0)
    # only the threshold chosen on dev is timed against the full model (again, alone on test)
    timed = [row["threshold"] for row in data["test"] if row["speed"]["wallclock_speedup"] is not None]
    assert timed == [result.best_threshold]
    for name in ("quality_vs_speedup", "per_layer"):
        png = paths[name]
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(png) as im:
            assert im.size[0] > 300 and im.size[1] > 200
    assert len(lines) == 6


def test_a_sweep_without_the_full_model_times_nothing(tiny, tmp_path):
    """`compare_full=False` (`freevlm sweep --no-full`): the chosen threshold is not decoded again beside the full
    model, so no row has a wall-clock speedup or the full model's outputs."""
    ee, bundle = tiny
    options = EvalOptions(DecodeConfig(max_new_tokens=2), batch_size=4, compare_full=False)
    result = sweep(ee, bundle, "vqa", vqa_records(tmp_path, 5), thresholds=(0.0, 1.0), per_layer=False, options=options)
    assert [r.threshold for r in result.test] == [0.0, 1.0] and len(result.test[0].predictions) == 4
    assert all(r.speed.wallclock_speedup is None and r.agreement_with_full is None for r in result.test)
    assert not any("full_prediction" in p for r in result.test for p in r.predictions)


def direct_ranking(ee, bundle, records, threshold, method="free"):
    """Each round's best option, the rank of its right answer and the option scores, from option log-likelihoods
    computed here."""
    tops, ranks, scores = [], [], []
    for r in records:
        image = load_image(r.image)
        s = option_log_likelihoods(ee, bundle, image, visdial_prompt(r), r.options, threshold, method=method)
        tops.append(r.options[max(range(len(s)), key=s.__getitem__)])
        ranks += [1 + sum(x > s[r.gt_index] for x in s)] if r.gt_index is not None else []
        scores.append(s)
    return tops, ranks, scores


def test_evaluate_visdial_ranks_options(tiny, tmp_path):
    ee, bundle = tiny
    path, dense = files.visdial(tmp_path)
    records = read_visdial(path, tmp_path / "images", dense=dense)
    result = evaluate_visdial(ee, bundle, records, threshold=0.5, config=DecodeConfig(max_new_tokens=3), batch_size=3)
    q = result.quality
    assert q["rounds"] == 6 and q["ndcg_rounds"] == 1 and result.speed.tokens > 0
    tops, ranks, scores = direct_ranking(ee, bundle, records, 0.5)
    assert [p["top_option"] for p in result.predictions] == tops
    assert result.score == q["mrr"] == pytest.approx(sum(1 / k for k in ranks) / len(ranks))
    assert q["mean_rank"] == pytest.approx(sum(ranks) / len(ranks))
    assert q["r@1"] == pytest.approx(sum(k == 1 for k in ranks) / len(ranks))
    (dense_round,) = [i for i, r in enumerate(records) if r.relevance is not None]
    assert q["ndcg"] == pytest.approx(ndcg(scores[dense_round], records[dense_round].relevance))


@pytest.mark.parametrize("method", ["deeblip", "pabee", "mue"])
def test_evaluate_visdial_ranks_options_for_baselines(tiny, tmp_path, method):
    """Every method ranks (linear and head exits score through their own `.logits`) under its own rule."""
    ee, bundle = tiny
    spec = get_method(method)
    baseline = EarlyExitVLM(ee.model, ExitConfig([2, 4], kind=spec.exit_kind))
    path, dense = files.visdial(tmp_path)
    records = read_visdial(path, tmp_path / "images", dense=dense)
    threshold = spec.thresholds[0]
    config = DecodeConfig(max_new_tokens=3)
    result = evaluate_visdial(baseline, bundle, records, threshold, config=config, batch_size=3, method=method)
    tops, ranks, _ = direct_ranking(baseline, bundle, records, threshold, method)
    assert [p["top_option"] for p in result.predictions] == tops
    assert result.score == pytest.approx(sum(1 / k for k in ranks) / len(ranks)) and result.speed.tokens > 0


def test_vqa_reader_to_evaluation(tiny, tmp_path):
    """The real VQAv2 layout read from disk goes through the loop, scored by the official accuracy: an answer k of
    the 10 humans gave scores the mean, over the 10 ways to leave one human out, of min(1, matches / 3)."""
    ee, bundle = tiny
    q, a = files.vqa(tmp_path)
    records = read_vqa(q, a, tmp_path / "val2014")
    config = DecodeConfig(max_new_tokens=2)
    first = evaluate_vqa(ee, bundle, records, threshold=0.5, config=config, compare_full=False)
    assert first.speed.full_seconds is None and first.agreement_with_full is None
    assert set(first.quality["per_answer_type"]) == {"other", "number", "yes/no"}
    # the humans' answers rewritten: 1, 2 and 3 of the 10 give the model's own answer, the others another one
    said = [p["prediction"] for p in first.predictions]
    relabelled = [
        replace(r, answers=[x] * k + ["zebra crossing"] * (10 - k)) for r, x, k in zip(records, said, (1, 2, 3))
    ]
    result = evaluate_vqa(ee, bundle, relabelled, threshold=0.5, config=config, compare_full=False)
    assert [p["prediction"] for p in result.predictions] == said
    assert [p["accuracy"] for p in result.predictions] == pytest.approx([0.3, 0.6, 0.9])  # (k=1: 9 x 1/3) / 10 ...
    assert result.score == pytest.approx(0.6) and result.quality["accuracy"] == pytest.approx(0.6)


@pytest.mark.parametrize(
    ("options", "words"),
    [
        (dict(batch_size=0), "batch_size must be a positive integer, got 0"),
        (dict(timing_repeats=1.5), "timing_repeats must be a positive integer, got 1.5"),
        (dict(option_batch_size=True), "option_batch_size must be a positive integer, got True"),
        (dict(method="nope"), "unknown method 'nope'"),
    ],
)
def test_bad_evaluation_options_are_refused_by_name(options, words):
    with pytest.raises(ValueError, match=words):
        EvalOptions(**options)


def test_evaluation_takes_its_options_as_one_object(tiny, tmp_path):
    ee, bundle = tiny
    records = vqa_records(tmp_path, 1)
    with pytest.raises(TypeError, match="options must be an EvalOptions, got dict"):
        evaluate("vqa", ee, bundle, records, options={"batch_size": 2})
    with pytest.raises(TypeError, match="unexpected keyword argument 'batch'"):
        evaluate_vqa(ee, bundle, records, batch=2)  # the shorthand's keywords are EvalOptions' fields
    with pytest.raises(ValueError, match="unknown task 'caption'"):
        evaluate("caption", ee, bundle, records)


def test_a_config_may_not_set_what_evaluation_decides(tiny, tmp_path):
    ee, bundle = tiny
    for config in (DecodeConfig(batch_policy="per_row"), DecodeConfig(threshold=0.5), DecodeConfig(mode="full")):
        with pytest.raises(ValueError, match="evaluation sets (batch_policy|threshold|mode) itself"):
            evaluate_vqa(ee, bundle, vqa_records(tmp_path, 1), config=config, compare_full=False)


def test_a_shared_visdial_evaluation_gives_each_rule_what_its_own_eval_gives(tiny, tmp_path):
    """`evaluate_many` on VisDial: answers decoded as copies of each batch, options scored by one teacher-forced
    pass per round for every rule; each rule's rankings, metrics and answers are those of its own evaluation."""
    from freevlm.eval.evaluate import evaluate_many

    ee, bundle = tiny
    path, dense = files.visdial(tmp_path)
    records = read_visdial(path, tmp_path / "images", dense=dense)
    rules = [(0.0, None), (0.5, None), (1.0, None), (None, ee.exit_layers[0])]
    options = dict(config=DecodeConfig(max_new_tokens=3), batch_size=3, compare_full=False)
    passes = []
    hook = ee.register_forward_hook(lambda *args: passes.append(1))
    try:
        shared = evaluate_many("visdial", ee, bundle, records, rules, EvalOptions(**options))
    finally:
        hook.remove()
    assert len(passes) == len(records)  # one teacher-forced pass per round (4 options: one chunk), not per rule
    for (threshold, layer), together in zip(rules, shared, strict=True):
        alone = evaluate_visdial(ee, bundle, records, threshold, layer, **options)
        assert together.predictions == alone.predictions, (threshold, layer)
        assert (together.score, together.quality) == (alone.score, alone.quality)
        assert together.speed.exit_histogram == alone.speed.exit_histogram
    assert len({json.dumps(r.quality, sort_keys=True) for r in shared}) > 1  # the rules rank differently
