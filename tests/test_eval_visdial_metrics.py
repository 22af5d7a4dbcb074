import math

import pytest

from freevlm.eval.visdial import ndcg, ranks_of, visdial_metrics


def test_ranks_and_sparse_metrics():
    assert ranks_of([0.1, 0.9, 0.5, 0.5]) == [4, 1, 2, 3]  # ties: lower index first
    descending = [float(12 - i) for i in range(12)]  # option i ranks i + 1
    scores = [[0.1, 0.9, 0.5], [3.0, 2.0, 1.0], [0.0, 1.0, 2.0], descending, descending]
    m = visdial_metrics(scores, [1, 2, 0, 6, 10])  # ranks of the answers: 1, 3, 3, 7, 11
    assert m["mrr"] == pytest.approx((1 + 1 / 3 + 1 / 3 + 1 / 7 + 1 / 11) / 5)
    assert (m["r@1"], m["r@5"], m["r@10"]) == pytest.approx((1 / 5, 3 / 5, 4 / 5))
    assert m["mean_rank"] == pytest.approx(25 / 5)
    assert m["ndcg"] is None and m["rounds"] == 5


def test_ndcg_by_hand():
    rel = [0.0, 1.0, 0.5, 0.0]  # k = 2 relevant options
    assert ndcg([0.0, 5.0, 4.0, 1.0], rel) == pytest.approx(1.0)  # ideal order
    # model's top 2: option 2 (0.5) then option 1 (1.0); ideal: 1.0, 0.5
    expected = (0.5 / math.log2(2) + 1.0 / math.log2(3)) / (1.0 / math.log2(2) + 0.5 / math.log2(3))
    assert ndcg([0.0, 4.0, 5.0, 1.0], rel) == pytest.approx(expected)
    assert ndcg([9.0, 0.0, 0.0, 8.0], rel) == 0.0  # top 2 has nothing relevant
    m = visdial_metrics([[0.0, 4.0, 5.0, 1.0], [1.0, 0.0]], [1, None], [rel, None])
    assert m["ndcg"] == pytest.approx(expected) and m["ndcg_rounds"] == 1 and m["rounds"] == 1
