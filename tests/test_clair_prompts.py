"""Parsers of reviser and judge replies, and the wording the prompts must keep."""

import pytest

from apo_jax.clair.prompts import (
    ParseError,
    judge_messages,
    parse_revision,
    parse_verdict,
    revision_messages,
)


def test_revision_prompt_carries_task_answer_and_instructions():
    [msg] = revision_messages("What is 2+2?", "It is 5.")
    text = msg["content"]
    assert msg["role"] == "user" and "What is 2+2?" in text and "It is 5." in text
    for phrase in (
        "teacher",
        "smallest changes",
        "word for word",
        "do not mention",
        "Reasoning:",
        "Corrected answer:",
        "clearer, more correct and more engaging",
    ):
        assert phrase in text, phrase


def test_normal_reply():
    rev = parse_revision("Reasoning: 2+2 is 4, not 5.\nCorrected answer: It is 4.")
    assert rev.reasoning == "2+2 is 4, not 5." and rev.answer == "It is 4."


@pytest.mark.parametrize(
    "reply",
    [
        "**Reasoning:** wrong sum.\n\n**Corrected answer:**\nIt is 4.",
        "**Reasoning**: wrong sum.\n**Corrected Answer**:\nIt is 4.",
        "## Reasoning\nwrong sum.\n\n## CORRECTED ANSWER\n\nIt is 4.",
        "### Reasoning:\nwrong sum.\n### Corrected answer：\nIt is 4.",
        "Reasoning - wrong sum.\ncorrected answer - It is 4.",
        "1. Reasoning: wrong sum.\n2. Corrected answer: It is 4.",
        "```\nReasoning: wrong sum.\nCorrected answer: It is 4.\n```",
        "Reasoning: wrong sum.\nCorrected answer:\n```text\nIt is 4.\n```",
        "Reasoning: wrong sum.\nCorrected answer:\n<answer>\nIt is 4.\n</answer>",
    ],
)
def test_marker_variants(reply):
    rev = parse_revision(reply)
    assert rev.answer == "It is 4."
    assert rev.reasoning == "wrong sum."


def test_code_answer_keeps_its_fence_and_last_marker_wins():
    reply = (
        "Reasoning: the corrected answer below fixes the loop.\nCorrected answer: draft\n"
        "Corrected answer:\n```python\nprint(4)\n```"
    )
    rev = parse_revision(reply)
    assert rev.answer == "```python\nprint(4)\n```"
    assert "Corrected answer: draft" in rev.reasoning


@pytest.mark.parametrize(
    "reply, reason",
    [
        ("The answer is fine as it is.", "no_revision_marker"),
        ("Reasoning: the corrected answer is obvious", "no_revision_marker"),
        ("", "no_revision_marker"),
        ("Reasoning: fine.\nCorrected answer:\n   \n", "empty_revision"),
        ("Reasoning: fine.\n**Corrected answer:**", "empty_revision"),
        ("Reasoning: fine.\nCorrected answer:\n```\n```", "empty_revision"),
    ],
)
def test_rejected_replies(reply, reason):
    with pytest.raises(ParseError, match="corrected answer|Corrected answer") as e:
        parse_revision(reply)
    assert e.value.reason == reason


@pytest.mark.parametrize(
    "reply, verdict",
    [
        ("A is clearer.\nVerdict: A", "A"),
        ("**Verdict:** Answer B", "B"),
        ("verdict - [[A]]", "A"),
        ("Final verdict: a tie", "tie"),
        ("Both are good. Verdict: Tie", "tie"),
        ("My verdict is hard to give.\nVerdict: B", "B"),
        ("Verdict: A\nOn reflection, verdict: B", "B"),
        ("[[B]]", "B"),
    ],
)
def test_verdicts(reply, verdict):
    assert parse_verdict(reply) == verdict


def test_unreadable_verdict():
    with pytest.raises(ParseError, match="Verdict") as e:
        parse_verdict("Both answers have merits and flaws.")
    assert e.value.reason == "no_verdict"


def test_judge_prompt_shows_both_answers_in_given_order():
    [msg] = judge_messages("task", "first", "second")
    text = msg["content"]
    assert text.index("first") < text.index("second") and "Verdict: A" in text
