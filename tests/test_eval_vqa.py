"""Hand-checked cases of the official VQA accuracy (GT-Vision-Lab/VQA vqaEval.py), quirks included."""

import pytest

from freevlm.eval.vqa import exact_match, process_punctuation, vqa_accuracy, vqa_scores

MIXED = ["dog"] * 9 + ["puppy"]  # answers not all identical: the official script normalises both sides


def test_punctuation_and_articles():
    assert vqa_accuracy("the dog.", MIXED) == 1.0
    assert vqa_accuracy("  A Dog!\n", MIXED) == 1.0
    assert vqa_accuracy("dogs", MIXED) == 0.0


def test_number_words_become_digits():
    answers = ["2"] * 5 + ["two"] * 3 + ["3", "2 dogs"]  # "two" in the answers is normalised to "2" as well
    assert vqa_accuracy("two", answers) == 1.0
    assert vqa_accuracy("2", answers) == 1.0
    assert vqa_accuracy("none", ["0"] * 4 + ["zero"] * 6) == 1.0


def test_contractions():
    answers = ["isn't"] * 4 + ["no"] * 6
    assert vqa_accuracy("isnt", answers) == 1.0
    assert vqa_accuracy("isn't", ["isnt"] * 4 + ["no"] * 6) == 1.0  # the answers get the same pass


def test_partial_agreement_leave_one_out():
    two = ["cat", "cat"] + ["dog"] * 8
    # humans 1-2 left out: 1 other "cat" -> 1/3; humans 3-10 left out: 2 -> 2/3; mean = (2/3 + 16/3) / 10
    assert vqa_accuracy("cat", two) == pytest.approx(0.6)
    assert vqa_accuracy("cat", ["cat"] * 3 + ["dog"] * 7) == pytest.approx(0.9)
    assert vqa_accuracy("cat", ["cat"] * 4 + ["dog"] * 6) == pytest.approx(1.0)
    assert vqa_accuracy("cat", ["cat"] + ["dog"] * 9) == pytest.approx(0.3)


def test_identical_answers_are_not_normalised():
    """The official quirk: ten identical answers turn normalisation off, for the prediction too."""
    assert vqa_accuracy("yes", ["yes"] * 10) == 1.0
    assert vqa_accuracy("Yes", ["yes"] * 10) == 0.0
    assert vqa_accuracy("the dog.", ["dog"] * 10) == 0.0
    assert vqa_accuracy(" yes\t", ["yes"] * 10) == 1.0  # whitespace is still stripped


def test_punctuation_pass_details():
    assert process_punctuation("1,000") == "1000"  # "digit,digit": marks are deleted, not spaced
    assert process_punctuation("red-white") == "red white"
    assert process_punctuation("red - white") == "red  white"  # touches a space: deleted
    assert process_punctuation("3.5 ft.") == "3.5 ft"  # a period before a digit stays
    assert process_punctuation("." * 40) == "." * 8  # at most 32 periods go (re.UNICODE passed as count)


def test_batch_scores_per_type():
    score = vqa_scores(
        ["red", "2", "no"],
        [["red"] * 10, ["2"] * 10, ["yes"] * 10],
        answer_types=["other", "number", "yes/no"],
        question_types=["what color", "how many", "is"],
    )
    assert score.accuracy == pytest.approx(2 / 3)
    assert score.per_answer_type == {"number": 1.0, "other": 1.0, "yes/no": 0.0}
    assert score.per_question == [1.0, 1.0, 0.0] and score.count == 3
    with pytest.raises(ValueError, match="2 predictions but 1"):
        vqa_scores(["a", "b"], [["a"]])


def test_exact_match_for_gqa():
    assert exact_match("Yes.", "yes") == 1.0
    assert exact_match("the red one", "red") == 0.0
    assert vqa_scores(["yes", "left"], [["yes"], ["right"]], metric="exact").accuracy == 0.5
