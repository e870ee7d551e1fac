"""A shared context (k-shot demonstrations) cached once gives what prepending its tokens would."""

from __future__ import annotations

import torch

from conftest import make_char_tokenizer, make_policy, make_tiny_lm
from gfnlm.context import SharedContext
from gfnlm.rewards import lm_prefix_log_likelihoods
from gfnlm.trajectories import ActionSpace, Query, TrajectoryRecord, Trajectories

CONTEXT = "12+3 45-6 "


def _records(tokenizer, prefix_ids: list[int]) -> list[TrajectoryRecord]:
    rows = [("7+", "81", [True, True]), ("3", "2-11", [True, True, False, True]), ("95-", "", [])]
    out = []
    for prompt, generated, is_action in rows:
        prompt_ids = prefix_ids + tokenizer(prompt)["input_ids"]
        gen_ids = tokenizer(generated, add_special_tokens=False)["input_ids"]
        out.append(TrajectoryRecord(Query(prompt, target="0"), prompt_ids, gen_ids, is_action))
    return out


def test_prefix_likelihoods_with_context_equal_prepended_prompt():
    tokenizer = make_char_tokenizer(add_bos=False)
    model = make_tiny_lm(seed=3)
    context = SharedContext(model, tokenizer, CONTEXT)
    ctx_ids = tokenizer(CONTEXT)["input_ids"]
    suffix = [tokenizer("5-", add_special_tokens=False)["input_ids"]] * 3
    with_ctx = Trajectories.from_records(_records(tokenizer, []), 0)
    prepended = Trajectories.from_records(_records(tokenizer, ctx_ids), 0)
    for kwargs in ({}, {"stop_token_ids": [2]}, {"suffix_ids": suffix}):
        got = lm_prefix_log_likelihoods(model, with_ctx, context=context, **kwargs)
        want = lm_prefix_log_likelihoods(model, prepended, **kwargs)
        assert torch.allclose(got, want, atol=1e-4), kwargs
        # and the context changes the result (the check above is not vacuous)
        assert not torch.allclose(got, lm_prefix_log_likelihoods(model, with_ctx, **kwargs), atol=1e-3)


def test_sampling_with_context_equals_prepended_prompt():
    tokenizer = make_char_tokenizer(add_bos=False)
    model = make_tiny_lm(seed=4)
    context = SharedContext(model, tokenizer, CONTEXT)
    space = ActionSpace(stop_token_ids=(2,), max_len=5)
    prompts = ["7+", "3", "7+", "95-"]
    policy = make_policy(model, tokenizer, space)
    a = policy.sample([Query(p) for p in prompts], generator=torch.Generator().manual_seed(0), context=context)
    b = policy.sample([Query(CONTEXT + p) for p in prompts], generator=torch.Generator().manual_seed(0))
    assert [r.generated_ids for r in a.records()] == [r.generated_ids for r in b.records()]
    assert torch.allclose(a.sampling_log_pf, b.sampling_log_pf, atol=1e-4)


def test_temperature_zero_is_greedy():
    tokenizer = make_char_tokenizer()
    model = make_tiny_lm(seed=5)
    space = ActionSpace(stop_token_ids=(2,), max_len=6)
    queries = [Query("1+")] * 4
    traj = make_policy(model, tokenizer, space).sample(queries, 0.0, torch.Generator().manual_seed(1))
    rows = {tuple(r.generated_ids) for r in traj.records()}
    assert len(rows) == 1
    # each greedy token is the argmax of the policy at its state
    ids = torch.tensor([tokenizer("1+")["input_ids"] + list(next(iter(rows)))])
    logits = model(input_ids=ids).logits[0]
    prompt_len = len(tokenizer("1+")["input_ids"])
    for i, tok in enumerate(next(iter(rows))):
        masked = space.policy_log_probs(logits[prompt_len - 1 + i][None], torch.tensor([i]))
        assert int(masked.argmax()) == tok
