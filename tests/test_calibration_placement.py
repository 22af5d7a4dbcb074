"""Exit placement: subsets of trained exits run as exits built alone would, budgets, and `freevlm place-exits`
choosing the placement that is both certified and fastest on a backbone where the right answer is known."""

import json

import dataset_files as files
import pytest
import torch
from cli_args import cli_args
from tiny_processor import tiny_bundle

from freevlm import EarlyExitVLM, ExitConfig
from freevlm.cli import main
from freevlm.decoding.generate import analytic_speedup, calls_speedup
from freevlm.decoding.policies import FixedSchedulePolicy
from freevlm.loading import load_vlm
from freevlm.placement import candidate_placements, exits_subset
from freevlm.tiny import tiny_blip2, tiny_inputs


def test_exits_subset_runs_like_exits_built_alone():
    model = tiny_blip2("opt", seed=1, num_layers=4)
    every = EarlyExitVLM(model, ExitConfig([1, 2, 3], init="fresh"))
    alone = EarlyExitVLM(model, ExitConfig([2], init="fresh"))
    alone.exits["2"].load_state_dict(every.exits["2"].state_dict())
    sub = exits_subset(every, [2])
    assert sub.exit_layers == [2] and sub.exit_config.exit_layers == [2]
    assert every.exit_layers == [1, 2, 3]  # the full set is untouched
    assert sub.exits["2"] is every.exits["2"]  # shared, not copied
    pixels, ids, mask = tiny_inputs(model, batch=2, seed=4)
    run = dict(pixel_values=pixels, input_ids=ids, attention_mask=mask, max_new_tokens=4, mode="early_exit")
    got = sub.generate(**run, policy=FixedSchedulePolicy([2, 4]))
    want = alone.generate(**run, policy=FixedSchedulePolicy([2, 4]))
    assert torch.equal(got.sequences, want.sequences) and torch.equal(got.exit_layers, want.exit_layers)
    with pytest.raises(ValueError, match=r"no trained exit at layers \[5\] \(trained exits: \[1, 2, 3\]\)"):
        exits_subset(every, [2, 5])


def test_calls_speedup_counts_every_exit_a_token_consulted():
    """One token out at exit 1, two through every layer, of 12: the paper's speedup counts the exit left at only;
    `calls` counts each exit passed on the way as a layer, so exits 3 and 6, which let no token out, cost calls."""
    tokens = [1, 12, 12]
    assert analytic_speedup(tokens, 12) == pytest.approx(36 / (2 + 12 + 12))
    assert calls_speedup(tokens, 12, [1]) == pytest.approx(36 / (2 + 13 + 13))
    assert calls_speedup(tokens, 12, [1, 3, 6]) == pytest.approx(36 / (2 + 15 + 15))
    assert calls_speedup([3, 12], 12, [1, 3]) == pytest.approx(24 / (5 + 14))  # out at 3: passed exit 1, left at 3
    assert calls_speedup([], 12, [1]) == 1.0


def test_candidate_placements_respect_the_budget():
    params = {1: 10, 2: 10, 3: 10}
    assert candidate_placements(params, budget_exits=1) == [(1,), (2,), (3,)]
    assert len(candidate_placements(params, budget_exits=2)) == 6
    assert candidate_placements(params, budget_parameters=20) == candidate_placements(params, budget_exits=2)
    assert candidate_placements(params, budget_exits=5, budget_parameters=10) == [(1,), (2,), (3,)]
    with pytest.raises(ValueError, match="give a budget"):
        candidate_placements(params)
    with pytest.raises(ValueError, match="the exit budget must be at least 1, got 0"):
        candidate_placements(params, budget_exits=0)
    with pytest.raises(ValueError, match="no exit fits a budget of 5 trainable parameters"):
        candidate_placements(params, budget_parameters=5)


@pytest.fixture(scope="module")
def identity_top(tmp_path_factory):
    """A 4-layer backbone whose layers 3 and 4 are identities (zero output projections), with exits copying the
    last layer at 2 and 3: leaving at exit 2 then gives exactly the full model's tokens in 3 layers of 4, while
    exit 3 saves nothing (3 layers + the exit). The right placement for one exit is [2], at any threshold."""
    root = tmp_path_factory.mktemp("identity")
    model = tiny_blip2("opt", seed=2, num_layers=4)
    with torch.no_grad():
        for layer in model.language_model.model.decoder.layers[2:]:
            for linear in (layer.self_attn.out_proj, layer.fc2):
                linear.weight.zero_(), linear.bias.zero_()
    bundle = tiny_bundle(model)
    for part in (model, bundle.tokenizer, bundle.image_processor):
        part.save_pretrained(root / "backbone")
    EarlyExitVLM(load_vlm(root / "backbone").model, ExitConfig([2, 3])).save_exits(root / "exits")
    return root


def _vqa_twice(root):
    """The 3-question VQAv2 fixture with every question asked twice (6 records)."""
    q, a = files.vqa(root)
    questions, answers = json.loads(q.read_text()), json.loads(a.read_text())
    for data, key in ((questions, "questions"), (answers, "annotations")):
        data[key] = [dict(x, question_id=10 * x["question_id"] + i) for i in range(2) for x in data[key]]
    q.write_text(json.dumps(questions)), a.write_text(json.dumps(answers))
    return q, a


@pytest.mark.slow
def test_place_exits_chooses_the_certified_fastest_placement(identity_top, tmp_path, capsys):
    q, a = _vqa_twice(tmp_path)
    out = tmp_path / "placement.json"
    options = dict(format="vqav2", files=[q, a], images=tmp_path / "val2014", max_new_tokens=2, thresholds=[0, 1])
    options.update(tolerance=0.5, confidence=0.9, budget_exits=2, out=out)
    code = main(cli_args("place-exits", checkpoint=identity_top, **options))
    assert code == 0
    report = json.loads(out.read_text())
    assert report["n"] == 6 and report["placements_tested"] == 3 and report["speedup"] == "ideal"
    assert report["confidence_per_placement"] == pytest.approx(1 - 0.1 / 3)  # Bonferroni over the placements
    chosen = report["chosen"]
    assert chosen["layers"] == [2] and chosen["threshold"] == 0.0 and chosen["certified"] and chosen["risk"] == 0.0
    assert chosen["speedups"]["analytic"] == pytest.approx(4 / 3)  # 2 layers + the exit, of 4
    assert chosen["speedup"] == chosen["speedups"]["ideal"] != chosen["speedups"]["analytic"]  # --speedup ideal
    by_layers = {tuple(p["layers"]): p for p in report["alternatives"]}
    assert set(by_layers) == {(2,), (3,), (2, 3)}
    assert by_layers[(3,)]["speedups"]["analytic"] == pytest.approx(1.0)  # exit 3 saves no layer
    # counting the exits consulted: (2, 3) lets every token out at 2 too, so it costs what [2] costs; [3] loses
    assert by_layers[(2, 3)]["speedups"]["calls"] == chosen["speedups"]["calls"] == pytest.approx(4 / 3)
    assert by_layers[(3,)]["speedups"]["calls"] == pytest.approx(1.0)
    assert all(p["speedup"] <= chosen["speedup"] for p in report["alternatives"])
    assert "chosen exits: [2] at threshold 0" in capsys.readouterr().out


def test_place_exits_needs_a_budget(identity_top, tmp_path, capsys):
    q, a = files.vqa(tmp_path)
    options = dict(format="vqav2", files=[q, a], images=tmp_path / "val2014", out=tmp_path / "p.json")
    code = main(cli_args("place-exits", checkpoint=identity_top, **options))
    assert code == 2
    assert "give a budget: --budget-exits N or --budget-parameters P" in capsys.readouterr().err
