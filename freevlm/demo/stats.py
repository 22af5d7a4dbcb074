"""Bootstrap confidence intervals over test images, so the report claims "A beats B" only when the interval does.

CIDEr-D is scored once per system over the whole test set (its IDF from all the test references), giving one score
per image whose mean is the corpus CIDEr; resampling images then resamples those per-image scores, with the IDF
held fixed (the usual per-image bootstrap; rescoring a corpus per draw is 100x slower for little change).
Captions are tokenized by lowercasing and splitting on non-alphanumerics: the shapes world has no punctuation
that PTB tokenization would treat differently, and no Java is needed.
"""

from __future__ import annotations

import random
import re

from ..calibration import per_caption_cider


def tokenize(captions: dict) -> dict:
    """What PTB tokenization gives on shapes captions (lower case, punctuation dropped), without starting Java."""
    return {k: [" ".join(re.findall(r"[a-z0-9]+", t.lower())) for t in texts] for k, texts in captions.items()}


def per_image_cider(refs: list[list[str]], preds: list[str]) -> list[float]:
    """CIDEr-D of `preds[i]` against `refs[i]`, image by image (their mean is the corpus score)."""
    return per_caption_cider(refs, preds, tokenize)


def bootstrap(per_item: list[list[float]], resamples: int = 2000, seed: int = 0, level: float = 0.95) -> list[dict]:
    """Mean and percentile interval for each system's per-item scores, and for each later system the paired
    interval of its difference to the first (the same draw scores both): `better` / `worse` only when it excludes 0."""
    rng = random.Random(seed)
    n = len(per_item[0])
    draws = [[rng.randrange(n) for _ in range(n)] for _ in range(resamples)]
    lo_q, hi_q = (1 - level) / 2, 1 - (1 - level) / 2

    def interval(values: list[float]) -> list[float]:
        ordered = sorted(values)
        return [ordered[int(lo_q * (resamples - 1))], ordered[round(hi_q * (resamples - 1))]]

    means = [[sum(s[i] for i in d) / n for d in draws] for s in per_item]
    out = []
    for k, scores in enumerate(per_item):
        row = {"mean": sum(scores) / n, "ci": interval(means[k]), "level": level, "resamples": resamples, "n": n}
        if k:
            diff = interval([a - b for a, b in zip(means[k], means[0])])
            row |= {
                "diff_vs_first": row["mean"] - out[0]["mean"],
                "diff_ci": diff,
                "verdict": "better" if diff[0] > 0 else "worse" if diff[1] < 0 else "not distinguishable",
            }
        out.append(row)
    return out
