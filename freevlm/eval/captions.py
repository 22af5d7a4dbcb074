"""COCO caption metrics through `pycocoevalcap` (we wrap it, we do not re-implement it).

Captions go through its PTB tokenizer (Java) once; BLEU-1..4, METEOR (Java), ROUGE-L and CIDEr are then scored
on the whole set and, if asked, on groups of it (NoCaps domains). SPICE needs the Stanford CoreNLP 3.6.0 jars,
which pycocoevalcap downloads on first use; we never download: without the jars SPICE is reported unavailable.
CIDEr's document frequencies come from the references scored together, so a group's CIDEr is that of the group
scored alone, as the NoCaps evaluation server does.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable, Hashable, Mapping, Sequence
from pathlib import Path

CAPTION_METRICS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr")
SPICE_JARS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")


def spice_unavailable_reason() -> str | None:
    """None when SPICE can run here; otherwise why not (which jar is missing)."""
    import pycocoevalcap

    lib = Path(next(iter(pycocoevalcap.__path__))) / "spice" / "lib"
    missing = [jar for jar in SPICE_JARS if not (lib / jar).is_file()]
    if missing:
        return f"SPICE unavailable: {', '.join(missing)} not in {lib} (Stanford CoreNLP 3.6.0; not downloaded)"
    return None


def tokenize(captions: Mapping[Hashable, Sequence[str]]) -> dict[Hashable, list[str]]:
    """PTB-tokenize (lower-cased, punctuation dropped) as the COCO evaluation does."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    data = {k: [{"caption": c} for c in caps] for k, caps in captions.items()}
    return PTBTokenizer().tokenize(data)


def caption_metrics(
    references: Mapping[Hashable, Sequence[str]],
    predictions: Mapping[Hashable, str],
    groups: Mapping[Hashable, str] | None = None,
    spice: bool | None = None,
    only: Sequence[str] | None = None,
    tokenizer: Callable[[Mapping[Hashable, Sequence[str]]], dict[Hashable, list[str]]] = tokenize,
) -> dict:
    """Scores of `predictions` (one caption per id) against `references` (several per id).

    Returns `{"all": {metric: value}}` plus one entry per group name when `groups` maps ids to names. Values are
    pycocoevalcap's (BLEU etc. in [0, 1], CIDEr unscaled). `spice=None` runs SPICE when its jars are present;
    where it cannot run, "SPICE" is None and "SPICE_unavailable" says why. `only` (e.g. `["CIDEr"]`) runs just
    those scorers: a threshold sweep needs one number, and METEOR starts a JVM per call. `tokenizer` replaces the
    PTB tokenizer (which starts a JVM too) where a simpler one gives the same tokens, as in the demo's shapes world.
    """
    if set(references) != set(predictions):
        missing = sorted(map(str, set(references) ^ set(predictions)))[:5]
        raise ValueError(f"references and predictions cover different ids (e.g. {missing})")
    if not references:
        raise ValueError("no captions to score")
    empty = [k for k, refs in references.items() if not refs]
    if empty:
        raise ValueError(f"ids without reference captions: {sorted(map(str, empty))[:5]}")
    gts = tokenizer(references)
    res = tokenizer({k: [v] for k, v in predictions.items()})
    subsets = {"all": list(gts)}
    if groups is not None:
        for key in gts:
            subsets.setdefault(groups[key], []).append(key)
    reason = spice_unavailable_reason()
    if spice and reason:
        raise RuntimeError(reason)
    use_spice = reason is None if spice is None else spice
    scorers = _scorers(use_spice)
    if only is not None:
        scorers = [(s, m) for s, m in scorers if set(m if isinstance(m, tuple) else (m,)) & set(only)]
    out = {}
    for name, keys in subsets.items():
        g, r = {k: gts[k] for k in keys}, {k: res[k] for k in keys}
        scores: dict = {}
        for scorer, metric in scorers:
            with contextlib.redirect_stdout(io.StringIO()):  # BLEU prints its n-gram counts
                value, _ = scorer.compute_score(g, r)
            if isinstance(metric, tuple):
                scores.update({m: float(v) for m, v in zip(metric, value)})
            else:
                scores[metric] = float(value)
        if not use_spice:
            scores["SPICE"] = None
            scores["SPICE_unavailable"] = reason or "SPICE not requested"
        out[name] = scores
    return out


def _scorers(use_spice: bool) -> list:
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge

    scorers = [(Bleu(4), CAPTION_METRICS[:4]), (Meteor(), "METEOR"), (Rouge(), "ROUGE_L"), (Cider(), "CIDEr")]
    if use_spice:
        from pycocoevalcap.spice.spice import Spice

        scorers.append((Spice(), "SPICE"))
    return scorers
