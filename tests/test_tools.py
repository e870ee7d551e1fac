"""The two-term calculator: values, refusals, robustness, and the sampler hook."""

from __future__ import annotations

import random

import pytest

from conftest import make_char_tokenizer
from gfnlm.tools import (MAX_EXPRESSION_CHARS, CalculatorTool, calculator, calculator_insertion, fill_in_results,
                         last_tool_result)
from gfnlm.trajectories import Query


@pytest.mark.parametrize("expression, value", [
    ("6 - 4", 2), ("6 - 4 =", 2), ("2 - 8 =", -6), ("14 + 3", 17), ("-6 + 3 =", -3), ("5 - -3", 8),
    ("9+4=", 13), ("1 + 2 + 3 =", 5),  # only the last two terms: 2 + 3
    ("12 - 30 =", -18), (" 7 -  2 = ", 5),
])
def test_calculator_values(expression, value):
    assert calculator(expression) == value


@pytest.mark.parametrize("expression", [
    "", "6", "6 -", "- 4 =", "6 * 2 =", "x - 1 =", "6 - 4 = 2", "1234567890123 + 1 =", "6 - 4 ?", "=",
])
def test_calculator_refuses_what_it_cannot_parse(expression):
    assert calculator(expression) is None


def test_calculator_never_raises_on_arbitrary_text():
    rng = random.Random(0)
    alphabet = "0123456789+-=, x*()\n."
    for _ in range(2000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 40)))
        value = calculator(text)
        assert value is None or isinstance(value, int)
    assert calculator(None) is None  # type: ignore[arg-type]


def test_calculator_reads_a_bounded_tail():
    long = "1" * 100_000 + " + 2 =" + " " * 10
    assert calculator(long) is None  # the first operand would exceed the digit bound
    assert calculator("x" * 100_000 + "3 + 4 =") == 7
    assert len(" " * MAX_EXPRESSION_CHARS + "3 + 4 =") > MAX_EXPRESSION_CHARS
    assert calculator("3 + 4" + " " * MAX_EXPRESSION_CHARS + "=") is None  # "=" too far from the terms


def test_insertion_uses_the_segment_after_the_last_comma():
    assert calculator_insertion(" 6 - 0 =") == " 6"
    assert calculator_insertion(" 6 - 0 = 6, 6 - 4 =") == " 2"
    assert calculator_insertion(" 6 - 0 = 6, 6 - 4") == ""
    assert calculator_insertion(" 6 - 0 = 6, 4 =") == ""  # one term after the comma: nothing
    assert fill_in_results("6 - 0 =, 6 - 4 =, 2 - 8 =") == "6 - 0 = 6, 6 - 4 = 2, 2 - 8 = -6"


def test_tool_hook_inserts_value_tokens_after_equals():
    tokenizer = make_char_tokenizer(chars="0123456789+-=, ")
    tool = CalculatorTool(tokenizer)
    query = Query("q")
    ids = tokenizer(" 6 - 8", add_special_tokens=False)["input_ids"]
    assert tool(query, ids) == []
    equals = tokenizer(" =", add_special_tokens=False)["input_ids"]
    inserted = tool(query, ids + equals)
    assert tokenizer.decode(inserted) == " -2"
    assert tool(query, []) == []


def test_chain_answer_is_the_last_result_the_calculator_inserted():
    assert last_tool_result(fill_in_results(" 7 - 8 =, -1 + 7 =")) == 6  # reads what the calculator writes
    assert last_tool_result(fill_in_results(" 7 - 8 =, -1 + =")) == -1  # the last call inserted nothing
    assert last_tool_result(" 1000") is None
