"""Tools the policy can call while it writes: a two-term calculator (paper §4.4).

When the policy writes "=", the expression since the last comma (or the start of the answer)
is evaluated and " <value>" is inserted as context. Only the last two terms are evaluated, as in
the paper, so the policy has to plan a chain of two-term steps. The parser never calls Python
``eval``, never raises on arbitrary text and reads a bounded amount of input.
"""

from __future__ import annotations

import re
from typing import Sequence

from gfnlm.sampling import Tool
from gfnlm.trajectories import Query

MAX_EXPRESSION_CHARS = 64
"""Only this many characters before "=" are read: enough for two signed terms, bounded work."""
MAX_OPERAND_DIGITS = 12

_TWO_TERMS = re.compile(
    rf"(?:^|[^0-9])(-?\d{{1,{MAX_OPERAND_DIGITS}}})\s*([+-])\s*(-?\d{{1,{MAX_OPERAND_DIGITS}}})\s*=?\s*$"
)


def calculator(expression: str) -> int | None:
    """The value of the last two terms of ``expression`` ("a + b" or "a - b", signed integers).

    A trailing "=" is allowed. Returns None (and never raises) when the end of the text is not
    such an expression, e.g. "6 -", "6 * 2", "x - 1" or a lone number.
    """
    if not isinstance(expression, str):
        return None
    tail = expression[-MAX_EXPRESSION_CHARS:]
    match = _TWO_TERMS.search(tail)
    if match is None:
        return None
    left, op, right = int(match.group(1)), match.group(2), int(match.group(3))
    return left + right if op == "+" else left - right


def calculator_insertion(text: str) -> str:
    """What the calculator adds after ``text`` (the answer so far): " <value>" if it ends in "=", else ""."""
    if not text.rstrip(" ").endswith("="):
        return ""
    segment = text.rsplit(",", 1)[-1]
    value = calculator(segment)
    return "" if value is None else f" {value}"


_INSERTED_RESULT = re.compile(r"= (-?\d+)")
"""A calculator result as it stands in a rationale: "=" followed by the " <value>" ``calculator_insertion`` adds."""


def last_tool_result(rationale: str) -> int | None:
    """The value the calculator inserted last in ``rationale`` (filled in), or None if it inserted none."""
    results = _INSERTED_RESULT.findall(rationale)
    return int(results[-1]) if results else None


def fill_in_results(rationale: str) -> str:
    """A rationale as the policy sees it after tool calls: "6 - 0 =, 6 - 4 =" -> "6 - 0 = 6, 6 - 4 = 2"."""
    out = ""
    for piece in re.split(r"(=)", rationale):
        out += piece
        if piece == "=":
            out += calculator_insertion(out)
    return out


class CalculatorTool(Tool):
    """A tool for the sampler: after an action that writes "=", insert the value's tokens."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._ends_with_equals: dict[int, bool] = {}

    def writes_equals(self, token_id: int) -> bool:
        if token_id not in self._ends_with_equals:
            self._ends_with_equals[token_id] = self.tokenizer.decode([token_id]).rstrip(" ").endswith("=")
        return self._ends_with_equals[token_id]

    def triggers(self, token_ids: Sequence[int]) -> list[bool]:
        """Only tokens that end with "=" can call the calculator."""
        return [self.writes_equals(int(t)) for t in token_ids]

    def __call__(self, query: Query, generated: Sequence[int]) -> list[int]:
        if not generated or not self.writes_equals(int(generated[-1])):
            return []
        text = self.tokenizer.decode(list(generated), skip_special_tokens=True)
        insertion = calculator_insertion(text)
        return self.tokenizer(insertion, add_special_tokens=False)["input_ids"] if insertion else []
