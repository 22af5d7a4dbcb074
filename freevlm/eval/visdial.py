"""VisDial ranking metrics as the VisDial challenge computes them: MRR, R@1/5/10, mean rank, NDCG.

Options are ranked by descending score; ties go to the lower option index (a stable sort, where the challenge
code's `torch.sort` leaves ties to chance). NDCG follows the challenge: k = number of options with non-zero
relevance, DCG of the model's top k over the DCG of the ideal top k, discount log2(rank + 1).
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def ranks_of(scores: Sequence[float]) -> list[int]:
    """1-based rank of every option (1 = highest score)."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    ranks = [0] * len(scores)
    for rank, i in enumerate(order, start=1):
        ranks[i] = rank
    return ranks


def ndcg(scores: Sequence[float], relevance: Sequence[float]) -> float:
    if len(scores) != len(relevance):
        raise ValueError(f"{len(scores)} scores but {len(relevance)} relevances")
    k = sum(1 for r in relevance if r != 0)
    if k == 0:
        raise ValueError("NDCG is undefined for a round without any relevant option")
    ranked = sorted(range(len(scores)), key=lambda i: -scores[i])[:k]
    ideal = sorted(relevance, reverse=True)[:k]
    dcg = sum(relevance[i] / math.log2(pos + 2) for pos, i in enumerate(ranked))
    best = sum(r / math.log2(pos + 2) for pos, r in enumerate(ideal))
    return dcg / best


def visdial_metrics(
    scores: Sequence[Sequence[float]],
    gt_index: Sequence[int | None],
    relevance: Sequence[Sequence[float] | None] | None = None,
) -> dict[str, float | int | None]:
    """Sparse metrics over rounds with a ground-truth answer; NDCG over rounds with dense relevance (else None)."""
    if len(scores) != len(gt_index):
        raise ValueError(f"{len(scores)} score rows but {len(gt_index)} ground-truth indices")
    gt_ranks = [ranks_of(s)[g] for s, g in zip(scores, gt_index) if g is not None]
    out: dict[str, float | int | None] = {"rounds": len(gt_ranks)}
    if gt_ranks:
        n = len(gt_ranks)
        out.update(
            mrr=sum(1.0 / r for r in gt_ranks) / n,
            **{f"r@{k}": sum(r <= k for r in gt_ranks) / n for k in (1, 5, 10)},
            mean_rank=sum(gt_ranks) / n,
        )
    dense = [(s, rel) for s, rel in zip(scores, relevance or [None] * len(scores)) if rel is not None]
    out["ndcg"] = sum(ndcg(s, rel) for s, rel in dense) / len(dense) if dense else None
    out["ndcg_rounds"] = len(dense)
    return out
