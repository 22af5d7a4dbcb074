"""VQA accuracy exactly as the official evaluation (GT-Vision-Lab/VQA `vqaEval.py`, current master), quirks included.

What the official script does, and so what we do:
- prediction and human answers: newlines/tabs to spaces, stripped;
- only when the human answers are not all identical, both sides are normalised: a punctuation pass, then
  lower-case, number words to digits, articles dropped, contractions restored ("isnt" -> "isn't"). When all
  ten humans wrote the same string, the prediction must equal it verbatim ("Yes" scores 0 against ten "yes");
- the punctuation pass deletes a mark when it touches a space (or the text has a "digit,digit"), else turns it
  into a space (tested on the input text, not the running result); a period not followed by a digit is deleted
  (the script's look-behind is a typo, so "(?!<=\\d)" looks ahead), at most 32 of them (the script passes
  `re.UNICODE`, which is 32, where `re.sub` takes `count`);
- accuracy = mean over the leave-one-human-out subsets of min(#matching other answers / 3, 1).
Older copies of the script (the one LAVIS vendors) always normalised the prediction and only punctuation-passed
the answers; scores differ from those on a few questions.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

CONTRACTIONS = {
    "aint": "ain't",
    "arent": "aren't",
    "cant": "can't",
    "couldve": "could've",
    "couldnt": "couldn't",
    "couldn'tve": "couldn't've",
    "couldnt've": "couldn't've",
    "didnt": "didn't",
    "doesnt": "doesn't",
    "dont": "don't",
    "hadnt": "hadn't",
    "hadnt've": "hadn't've",
    "hadn'tve": "hadn't've",
    "hasnt": "hasn't",
    "havent": "haven't",
    "hed": "he'd",
    "hed've": "he'd've",
    "he'dve": "he'd've",
    "hes": "he's",
    "howd": "how'd",
    "howll": "how'll",
    "hows": "how's",
    "Id've": "I'd've",
    "I'dve": "I'd've",
    "Im": "I'm",
    "Ive": "I've",
    "isnt": "isn't",
    "itd": "it'd",
    "itd've": "it'd've",
    "it'dve": "it'd've",
    "itll": "it'll",
    "let's": "let's",
    "maam": "ma'am",
    "mightnt": "mightn't",
    "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've",
    "mightve": "might've",
    "mustnt": "mustn't",
    "mustve": "must've",
    "neednt": "needn't",
    "notve": "not've",
    "oclock": "o'clock",
    "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at",
    "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at",
    "shant": "shan't",
    "shed've": "she'd've",
    "she'dve": "she'd've",
    "she's": "she's",
    "shouldve": "should've",
    "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll",
    "somebodys": "somebody's",
    "someoned": "someone'd",
    "someoned've": "someone'd've",
    "someone'dve": "someone'd've",
    "someonell": "someone'll",
    "someones": "someone's",
    "somethingd": "something'd",
    "somethingd've": "something'd've",
    "something'dve": "something'd've",
    "somethingll": "something'll",
    "thats": "that's",
    "thered": "there'd",
    "thered've": "there'd've",
    "there'dve": "there'd've",
    "therere": "there're",
    "theres": "there's",
    "theyd": "they'd",
    "theyd've": "they'd've",
    "they'dve": "they'd've",
    "theyll": "they'll",
    "theyre": "they're",
    "theyve": "they've",
    "twas": "'twas",
    "wasnt": "wasn't",
    "wed've": "we'd've",
    "we'dve": "we'd've",
    "weve": "we've",
    "werent": "weren't",
    "whatll": "what'll",
    "whatre": "what're",
    "whats": "what's",
    "whatve": "what've",
    "whens": "when's",
    "whered": "where'd",
    "wheres": "where's",
    "whereve": "where've",
    "whod": "who'd",
    "whod've": "who'd've",
    "who'dve": "who'd've",
    "wholl": "who'll",
    "whos": "who's",
    "whove": "who've",
    "whyll": "why'll",
    "whyre": "why're",
    "whys": "why's",
    "wont": "won't",
    "wouldve": "would've",
    "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've",
    "yall": "y'all",
    "yall'll": "y'all'll",
    "y'allll": "y'all'll",
    "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've",
    "youd": "you'd",
    "youd've": "you'd've",
    "you'dve": "you'd've",
    "youll": "you'll",
    "youre": "you're",
    "youve": "you've",
}
NUMBER_WORDS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
ARTICLES = ("a", "an", "the")
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(\,)(\d)")
_OFFICIAL_PERIOD_COUNT = 32  # the script passes re.UNICODE (== 32) as re.sub's `count`


def process_punctuation(text: str) -> str:
    out = text
    has_number_comma = _DIGIT_COMMA_DIGIT.search(text) is not None
    for p in PUNCTUATION:
        if p + " " in text or " " + p in text or has_number_comma:  # tested on the input, as the script does
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD.sub("", out, count=_OFFICIAL_PERIOD_COUNT)


def process_digit_article(text: str) -> str:
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def normalize_answer(text: str) -> str:
    """The official normalisation (punctuation pass, then digits/articles/contractions)."""
    return process_digit_article(process_punctuation(text))


def _clean(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """Official VQA accuracy of one prediction against the human answers, in [0, 1]."""
    if not answers:
        raise ValueError("vqa_accuracy needs at least one human answer")
    pred = _clean(prediction)
    gts = [_clean(a) for a in answers]
    if len(set(gts)) > 1:
        gts = [normalize_answer(a) for a in gts]
        pred = normalize_answer(pred)
    matches = [a == pred for a in gts]
    total = sum(matches)
    # leave human i out: the others that match are total - matches[i]
    return sum(min(1.0, (total - m) / 3) for m in matches) / len(gts)


def exact_match(prediction: str, answer: str) -> float:
    """GQA's accuracy: the normalised prediction equals the normalised answer (as LAVIS scores GQA)."""
    return float(normalize_answer(_clean(prediction)) == normalize_answer(_clean(answer)))


@dataclass
class VQAScore:
    accuracy: float  # mean over questions, in [0, 1]
    per_answer_type: dict[str, float]
    per_question_type: dict[str, float]
    per_question: list[float]
    count: int

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def vqa_scores(
    predictions: Sequence[str],
    answers: Sequence[Sequence[str]],
    answer_types: Sequence[str | None] | None = None,
    question_types: Sequence[str | None] | None = None,
    metric: str = "vqa",
) -> VQAScore:
    """Mean accuracy and its breakdown by answer type and question type (questions without a type are skipped
    in the breakdown). `metric`: "vqa" (ten human answers) or "exact" (one answer, GQA)."""
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions but {len(answers)} answer lists")
    if not predictions:
        raise ValueError("no predictions to score")
    if metric == "vqa":
        per_question = [vqa_accuracy(p, a) for p, a in zip(predictions, answers)]
    elif metric == "exact":
        if any(not a for a in answers):
            raise ValueError("exact-match accuracy needs an answer for every question")
        per_question = [max(exact_match(p, g) for g in a) for p, a in zip(predictions, answers)]
    else:
        raise ValueError(f"unknown VQA metric {metric!r}: 'vqa' or 'exact'")
    return VQAScore(
        accuracy=sum(per_question) / len(per_question),
        per_answer_type=_group_means(per_question, answer_types),
        per_question_type=_group_means(per_question, question_types),
        per_question=per_question,
        count=len(per_question),
    )


def _group_means(values: list[float], groups: Sequence[str | None] | None) -> dict[str, float]:
    if groups is None:
        return {}
    buckets: dict[str, list[float]] = defaultdict(list)
    for v, g in zip(values, groups, strict=True):
        if g is not None:
            buckets[g].append(v)
    return {g: sum(vs) / len(vs) for g, vs in sorted(buckets.items())}
