"""The Policy: bfloat16 against float32 on the same trajectories, and the compiled decoding step against eager."""

from __future__ import annotations

import pytest
import torch
from conftest import make_char_tokenizer, make_policy, make_tiny_lm, needs_native_bf16

from gfnlm import __all__ as public_names
from gfnlm.scoring import PolicyHead, output_logits, terminal_log_prob
from gfnlm.tools import CalculatorTool
from gfnlm.trajectories import ActionSpace, Query

BF16_TOKEN_TOLERANCE = 0.1
"""|log q| of one token, bf16 weights against float32, on the tiny test model (stated in docs/design.md for SmolLM2)."""


def test_every_public_name_imports_from_the_package_and_the_command_line_stays_light():
    import subprocess
    import sys

    import gfnlm

    assert {"GFlowNetTrainer", "TrainConfig", "Policy", "ActionSpace", "Query", "load_model_and_tokenizer"} <= set(public_names)
    for name in public_names:
        assert getattr(gfnlm, name).__name__ == name
    check = "import sys, gfnlm.cli; print('torch' in sys.modules)"  # the names load on first use, not on import
    assert subprocess.run([sys.executable, "-c", check], capture_output=True, text=True).stdout.strip() == "False"


@needs_native_bf16
def test_bf16_and_float32_policies_give_close_log_probs_on_the_same_trajectories(tokenizer):
    space = ActionSpace(stop_token_ids=(2,), max_len=6, min_len=1, allowed_token_ids=tuple(range(3, 14)))
    exact, fast = (make_policy(make_tiny_lm(seed=7), tokenizer, space, precision=p) for p in ("no", "bf16"))
    assert fast.model.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    traj = exact.sample([Query("12"), Query("3+4"), Query("5")] * 4, 1.0, torch.Generator().manual_seed(0))
    with torch.no_grad():
        (pf32, pt32), (pf16, pt16) = exact.score(traj), fast.score(traj)
    assert pf16.dtype == pt16.dtype == torch.float32  # the log-softmax is float32 whatever the weights
    steps = torch.arange(traj.horizon)[None] < traj.lengths[:, None]
    diff = (pf16 - pf32)[steps].abs()
    assert 0 < diff.max() < BF16_TOKEN_TOLERANCE  # bf16 does change the numbers, by little
    whole = (terminal_log_prob(pf16, pt16, traj.lengths) - terminal_log_prob(pf32, pt32, traj.lengths)).abs()
    assert whole.max() < BF16_TOKEN_TOLERANCE * (traj.horizon + 1)


@needs_native_bf16
@pytest.mark.parametrize("tied", [False, True])
def test_the_head_of_a_bf16_policy_computes_float32_logits_off_the_bf16_grid(tokenizer, tied):
    """A bf16 head would round every logit to 8 significant bits (0.125 apart between 16 and 32): the policy's
    log-probs could only move in such steps. Its head stays float32, tied input embeddings with it."""
    model = make_tiny_lm(seed=3)
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    space = ActionSpace(stop_token_ids=(2,), max_len=4, min_len=1)
    policy = make_policy(model, tokenizer, space, precision="bf16")
    head = policy.model.get_output_embeddings()
    assert head.weight.dtype == torch.float32 and policy.model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    hidden = torch.randn(5, model.config.hidden_size).bfloat16() * 8
    logits = output_logits(policy.model, hidden)
    assert torch.equal(logits, torch.nn.functional.linear(hidden.float(), head.weight))
    assert (logits.bfloat16().float() != logits).any()
    restricted = ActionSpace(stop_token_ids=(2,), max_len=4, min_len=1, allowed_token_ids=(3, 4, 5))
    layout = restricted.layout(policy.model.config.vocab_size, "cpu")
    assert torch.allclose(PolicyHead(policy.model, layout)(hidden), layout.select(logits), atol=1e-5, rtol=0)
    traj = policy.sample([Query("12")] * 3, 1.0, torch.Generator().manual_seed(0))  # the decoder runs in bf16
    assert torch.isfinite(policy.score(traj)[0]).all()


def _arithmetic_setup():
    tokenizer = make_char_tokenizer(chars="0123456789+-=, ")
    ids = tokenizer.get_vocab()
    space = ActionSpace(stop_token_ids=(2,), max_len=10, min_len=6, allowed_token_ids=tuple(ids[c] for c in "1+="))
    return tokenizer, space, CalculatorTool(tokenizer)


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def test_compiled_decoding_draws_the_eager_tokens_with_the_calculator_and_compiles_once_per_shape():
    """torch.compile (inductor) over the static cache: greedy and seeded draws agree token for token with the
    eager step, the log-probs within 1e-5, with the calculator inserting its results; a second call of the
    same batch shape compiles nothing, another batch size once more."""
    tokenizer, space, tool = _arithmetic_setup()
    model = make_tiny_lm(seed=5, vocab_size=len(tokenizer))  # a model whose draws make the calculator answer
    eager = make_policy(model, tokenizer, space, tool, static_cache=True, compile=False)
    compiled = make_policy(model, tokenizer, space, tool, compile=True)
    assert compiled.static_cache and compiled.compiled_step is not None and eager.compiled_step is None
    queries = [Query("1+1"), Query("2")] * 3
    before = _graphs()
    for temperature in (0.0, 1.0):
        runs = [p.sample(queries, temperature, torch.Generator().manual_seed(4)) for p in (eager, compiled)]
        assert torch.equal(runs[0].input_ids, runs[1].input_ids) and torch.equal(runs[0].is_action, runs[1].is_action)
        torch.testing.assert_close(runs[1].sampling_log_pf, runs[0].sampling_log_pf, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(runs[1].sampling_log_pterm, runs[0].sampling_log_pterm, atol=1e-5, rtol=1e-5)
    inserted = runs[1].attention_mask.bool() & ~runs[1].is_action
    assert inserted[:, runs[1].prompt_len :].any(), "the calculator never inserted anything"
    compiled_once = _graphs()
    assert compiled_once > before
    compiled.sample(queries, 1.0, torch.Generator().manual_seed(4))
    assert _graphs() == compiled_once  # the same shapes: nothing recompiled
    compiled.sample(queries[:4], 1.0, torch.Generator().manual_seed(4))
    assert compiled_once < _graphs() <= compiled_once + (compiled_once - before)  # one more batch size: once


def test_compile_needs_true_false_or_auto(tokenizer):
    from gfnlm.config import ConfigError

    space = ActionSpace(stop_token_ids=(2,), max_len=3)
    assert make_policy(make_tiny_lm(), tokenizer, space, compile="auto").compile is False  # CPU: auto is off
    with pytest.raises(ConfigError, match="compile must be true, false or auto"):
        make_policy(make_tiny_lm(), tokenizer, space, compile="yes")
