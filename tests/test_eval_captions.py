"""Our caption metrics equal pycocoevalcap's scorers run directly on the same captions (we wrap, not re-implement)."""

import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from freevlm.eval.captions import CAPTION_METRICS, caption_metrics, spice_unavailable_reason

REFS = {
    1: ["A dog runs across the green grass.", "a brown dog running in a field", "The dog is running outside."],
    2: ["Two cats sleep on a red couch.", "cats sleeping on a sofa", "Two cats are asleep on the couch."],
    3: ["A man rides a bike down the street.", "a person cycling on a road", "A man on a bicycle in the city."],
}
PREDS = {1: "a dog running on the grass", 2: "two cats sleeping on a couch", 3: "a man riding a bicycle on a street"}
GROUPS = {1: "in-domain", 2: "in-domain", 3: "out-domain"}


def direct(keys):
    tok = PTBTokenizer()
    gts = tok.tokenize({k: [{"caption": c} for c in REFS[k]] for k in keys})
    res = tok.tokenize({k: [{"caption": PREDS[k]}] for k in keys})
    out = {}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    out.update(zip(CAPTION_METRICS[:4], bleu))
    out["METEOR"], _ = Meteor().compute_score(gts, res)
    out["ROUGE_L"], _ = Rouge().compute_score(gts, res)
    out["CIDEr"], _ = Cider().compute_score(gts, res)
    return out


@pytest.mark.slow
def test_metrics_equal_pycocoevalcap_run_directly():
    ours = caption_metrics(REFS, PREDS, groups=GROUPS)
    assert set(ours) == {"all", "in-domain", "out-domain"}
    expected = direct([1, 2, 3])
    for metric in CAPTION_METRICS:
        assert ours["all"][metric] == pytest.approx(expected[metric], rel=1e-12), metric
    assert 0.3 < ours["all"]["Bleu_1"] <= 1.0 and ours["all"]["CIDEr"] > 0.5  # a real, non-trivial score
    # a group is scored alone (CIDEr's document frequencies from the group's references), like the NoCaps server
    in_domain = caption_metrics({k: REFS[k] for k in (1, 2)}, {k: PREDS[k] for k in (1, 2)})["all"]
    for metric in CAPTION_METRICS:
        assert ours["in-domain"][metric] == pytest.approx(in_domain[metric], rel=1e-12), metric
    if spice_unavailable_reason():
        assert ours["all"]["SPICE"] is None and "stanford-corenlp" in ours["all"]["SPICE_unavailable"]


def test_mismatched_ids_are_an_error():
    with pytest.raises(ValueError, match="different ids"):
        caption_metrics(REFS, {1: "a dog"})


@pytest.mark.skipif(spice_unavailable_reason() is None, reason="SPICE jars are installed here")
def test_asking_for_spice_without_jars_fails_instead_of_inventing_a_score():
    with pytest.raises(RuntimeError, match="SPICE unavailable"):
        caption_metrics(REFS, PREDS, spice=True)
