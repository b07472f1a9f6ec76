"""The project's CLAIR revision prompt, the pairwise judging prompt, and robust reply parsers.

The reviser is asked to act as a teacher who minimally improves a student's answer, to reason
first and then to give the corrected answer under a ``Corrected answer:`` marker. Models write
that marker in many ways (``**Corrected Answer**:``, ``## Corrected answer``, ``CORRECTED
ANSWER -``, inside a code fence ...); :func:`parse_revision` accepts the common ones and raises
:class:`ParseError` with a reason when no usable corrected answer is found.
"""

from __future__ import annotations

import dataclasses
import re

Messages = list[dict[str, str]]

REVISION_TEMPLATE = """\
You are a teacher going over a student's work. Below are a task and the student's answer to it.

Improve the student's answer with the smallest changes that make it clearer, more correct and \
more engaging. Copy every part of the answer that needs no correction word for word; change only \
what makes the answer better. The corrected answer must stand on its own as a direct answer to \
the task: do not mention the student, the original answer, or that anything was changed.

Work in two parts:
1. Under the heading "Reasoning:", explain what is wrong, unclear or missing in the student's \
answer and how you will fix it.
2. Under the heading "Corrected answer:", write the complete corrected answer and nothing else.

Task:
{prompt}

Student's answer:
{answer}
"""

JUDGE_TEMPLATE = """\
You are an impartial judge. Two assistants answered the same task. Decide which answer is \
better overall: more helpful, more correct and clearer. Judge the content only; do not let the \
length of the answers or the order in which they appear influence you.

Task:
{prompt}

[Answer A]
{answer_a}
[End of answer A]

[Answer B]
{answer_b}
[End of answer B]

Explain your judgement briefly. Then finish with one final line that reads exactly \
"Verdict: A", "Verdict: B" or "Verdict: tie".
"""


# Reject reasons of replies that hold no usable result.
NO_REVISION_MARKER = "no_revision_marker"
EMPTY_REVISION = "empty_revision"
NO_VERDICT = "no_verdict"


class ParseError(ValueError):
    """A reply that holds no usable result: ``reason`` (stable) and a message for the rejects."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class Revision:
    """A parsed reviser reply: the reasoning before the marker and the corrected answer."""

    reasoning: str
    answer: str


def revision_messages(prompt: str, answer: str) -> Messages:
    """Returns the chat messages that ask the reviser to minimally revise ``answer``."""
    return [{"role": "user", "content": REVISION_TEMPLATE.format(prompt=prompt, answer=answer)}]


def judge_messages(prompt: str, answer_a: str, answer_b: str) -> Messages:
    """Returns the chat messages of a pairwise judgement of answers A and B."""
    text = JUDGE_TEMPLATE.format(prompt=prompt, answer_a=answer_a, answer_b=answer_b)
    return [{"role": "user", "content": text}]


_EMPH = r"(?:\*\*|__|\*|_)?"
_COLON = r"(?P<colon>[:：]|(?<=\s)[-–—](?=\s|$))?"


def _marker_re(words: str) -> re.Pattern[str]:
    # Optional quote/heading/list prefix, emphasis on either side of the words and of the colon.
    return re.compile(
        rf"^[ \t>]*(?:#{{1,6}}[ \t]*)?(?:\d+[.)][ \t]*)?{_EMPH}[ \t]*{words}[ \t]*{_EMPH}"
        rf"[ \t]*{_COLON}[ \t]*{_EMPH}[ \t]*(?P<rest>.*)$",
        re.IGNORECASE | re.MULTILINE,
    )


_ANSWER_RE = _marker_re(r"(?:corrected|revised|improved)[ \t_-]+(?:answer|response)")
_REASONING_RE = _marker_re(r"reasoning")
_FENCE_RE = re.compile(r"^\s*(`{3,}|~{3,})[ \t]*([\w+-]*)[ \t]*\n(.*)\n[ \t]*\1[ \t]*$", re.DOTALL)
_PLAIN_FENCE_LANGS = {"", "text", "markdown", "md", "plaintext"}


def _markers(pattern: re.Pattern[str], text: str) -> list[re.Match[str]]:
    # A marker is a heading: the words end the line, or a colon follows them.
    return [m for m in pattern.finditer(text) if m.group("colon") or not m.group("rest").strip()]


def _unfence(text: str) -> str:
    """Removes one plain (text/markdown) code fence wrapping the whole text."""
    m = _FENCE_RE.match(text.strip())
    if m and m.group(2).lower() in _PLAIN_FENCE_LANGS:
        return m.group(3).strip()
    return text.strip()


def _strip_tags(text: str) -> str:
    m = re.fullmatch(r"\s*<answer>\s*(.*?)\s*</answer>\s*", text, re.DOTALL | re.IGNORECASE)
    return m.group(1) if m else text


def parse_revision(reply: str) -> Revision:
    """Splits a reviser reply into reasoning and corrected answer.

    Args:
      reply: the reviser's raw reply.

    Returns:
      A :class:`Revision`; the answer is the text after the last corrected-answer marker.

    Raises:
      ParseError: no corrected-answer marker, or an empty corrected answer.
    """
    text = _unfence(reply or "")
    found = _markers(_ANSWER_RE, text)
    if not found:
        raise ParseError(NO_REVISION_MARKER, "no 'Corrected answer:' marker in the reviser reply")
    last = found[-1]
    answer = _strip_tags(_unfence(last.group("rest") + text[last.end() :]))
    if not answer.strip("`*_ \n\t"):
        raise ParseError(EMPTY_REVISION, "empty corrected answer in the reviser reply")
    reasoning = text[: last.start()].strip()
    heads = _markers(_REASONING_RE, reasoning)
    if heads:
        first = heads[0]
        reasoning = (first.group("rest") + reasoning[first.end() :]).strip()
    return Revision(reasoning=reasoning, answer=answer)


_VERDICT_RE = re.compile(r"verdict(?P<rest>(?:(?!verdict)[^\n])*)", re.IGNORECASE)
_BRACKET_RE = re.compile(r"\[\[\s*(A|B|tie)\s*\]\]", re.IGNORECASE)
_FILLER = {"answer", "response", "assistant", "output", "is", "the", "better", "winner", "final"}


def _classify(rest: str) -> str | None:
    words = [w for w in re.findall(r"[a-z]+", rest.lower()) if w not in _FILLER]
    if not words:
        return None
    if words[0] in ("tie", "neither", "equal", "both", "draw") or "tie" in words[:3]:
        return "tie"
    if words[0] in ("a", "b"):
        return words[0].upper()
    return None


def parse_verdict(reply: str) -> str:
    """Reads the judge's verdict: ``"A"``, ``"B"`` or ``"tie"``.

    Accepts ``Verdict: A``, ``**Verdict:** Answer B``, ``verdict - [[A]]``, ``Verdict: tie``
    and MT-Bench style ``[[A]]``; the last verdict in the reply wins.

    Raises:
      ParseError: no verdict can be read.
    """
    for m in reversed(list(_VERDICT_RE.finditer(reply or ""))):
        verdict = _classify(m.group("rest"))
        if verdict:
            return verdict
    brackets = _BRACKET_RE.findall(reply or "")
    if brackets:
        last = brackets[-1].lower()
        return "tie" if last == "tie" else last.upper()
    raise ParseError(NO_VERDICT, "no readable 'Verdict: A|B|tie' line in the judge reply")
