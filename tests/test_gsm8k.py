"""GSM8K answer extraction and scoring (official normalisation)."""

import pytest

from tunelab.config import load_config
from tunelab.tasks import get_task
from tunelab.tasks.gsm8k import extract_flexible, extract_strict, normalize_number, reference_answer


@pytest.mark.parametrize(
    "completion, strict, flexible",
    [
        ("She has 3 + 4 = 7 apples.\n#### 7", "7", "7"),
        ("Total is $1,234.\n#### $1,234", "1234", "1234"),
        ("#### -5", "-5", "-5"),
        ("The loss is 2.5 dollars\n#### 2.5.", "2.5", "2.5"),
        ("So she makes 18 dollars every day.", None, "18"),  # missing ####
        ("no number here", None, None),
        ("#### 1,000,000\nQuestion: next", "1000000", "1000000"),
        ("It costs $0.75 each, 4 of them is $3.00\n#### 3", "3", "3"),
    ],
)
def test_extraction(completion, strict, flexible):
    assert extract_strict(completion) == strict
    assert extract_flexible(completion) == flexible


def test_normalisation_and_reference():
    assert normalize_number(" $1,000. ") == "1000"
    assert reference_answer("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72") == "72"
    with pytest.raises(ValueError, match="####"):
        reference_answer("no final line")


def test_score_strict_vs_flexible():
    task = get_task("gsm8k")(load_config().task)
    exs = task.examples("test")[:3]
    refs = [e.reference for e in exs]
    completions = [f"work\n#### {refs[0]}", f"the answer is {refs[1]}", "#### 999999"]
    scored = task.score(exs, completions)
    assert scored.metrics["accuracy_strict"] == pytest.approx(1 / 3)
    assert scored.metrics["accuracy_flexible"] == pytest.approx(2 / 3)
    assert [p["correct"] for p in scored.per_example] == [True, False, False]
    # the answer-format rate counts the official '#### N' line, right or wrong
    assert scored.metrics["answer_format_rate"] == pytest.approx(2 / 3)
    assert [p["answer_formatted"] for p in scored.per_example] == [True, False, True]


def test_template_shared_and_calculator_annotations_stripped():
    task = get_task("gsm8k")(load_config().task)
    ex = task.examples("train")[0]
    assert ex.prompt.startswith("Question: Natalia sold clips") and ex.prompt.endswith("\nAnswer:")
    assert "<<" not in ex.response and ex.response.endswith("#### 72")
    assert ex.reference == "72"


def test_stop_and_trim():
    task = get_task("gsm8k")(load_config().task)
    stop = task.stop_checker()
    assert not stop(" 3 + 4 = 7\n#### 7")  # line not finished yet: 70 could follow
    assert stop(" 3 + 4 = 7\n#### 7\n")
    assert stop(" blah\nQuestion: another")
    assert task.trim_completion(" 7\n#### 7\nQuestion: x") == " 7\n#### 7"
