"""Batched prefix rewards against one forward pass per prefix, and reward validation."""

import pytest
import torch
from conftest import make_policy

from gfnlm.bench.reference import per_prefix_log_likelihoods
from gfnlm.rewards import (
    LMStopReward,
    LMSuffixReward,
    RewardError,
    SumReward,
    TextReward,
    check_log_rewards,
    lm_prefix_log_likelihoods,
    terminal_log_rewards,
    terminal_values,
)
from gfnlm.trajectories import ActionSpace, Query, TrajectoryRecord, Trajectories

SPACE = ActionSpace(stop_token_ids=(2,), max_len=8)


def policy_of(model, tokenizer):
    return make_policy(model, tokenizer, SPACE)

RECORDS = [
    # with tool-inserted tokens (False) after the third action
    TrajectoryRecord(Query("1", target="=7"), [1, 4], [5, 6, 13, 14, 14, 7], [True, True, True, False, False, True]),
    TrajectoryRecord(Query("23+4", target="9"), [1, 5, 6, 13, 7], [8, 9], [True, True]),
    TrajectoryRecord(Query("5", target="+12"), [1, 8], [], []),
    # samples sharing a prompt with the rows above (the rewards run each distinct prompt once)
    TrajectoryRecord(Query("23+4", target="9"), [1, 5, 6, 13, 7], [4, 14, 9], [True, True, True]),
    TrajectoryRecord(Query("1", target="=7"), [1, 4], [7], [True]),
]


@pytest.fixture
def batch():
    return Trajectories.from_records(RECORDS, pad_token_id=0)


def test_stop_reward_matches_per_prefix_passes(tiny_lm, batch):
    fast = lm_prefix_log_likelihoods(tiny_lm, batch, stop_token_ids=[2])
    slow = per_prefix_log_likelihoods(tiny_lm, batch, stop_token_ids=[2])
    for b, n in enumerate(batch.lengths.tolist()):
        torch.testing.assert_close(fast[b, : n + 1], slow[b, : n + 1], atol=1e-4, rtol=1e-5)


def test_suffix_reward_matches_per_prefix_passes(tiny_lm, tokenizer, batch):
    suffixes = [tokenizer(q.target, add_special_tokens=False)["input_ids"] for q in batch.queries]
    fast = lm_prefix_log_likelihoods(tiny_lm, batch, suffix_ids=suffixes)
    slow = per_prefix_log_likelihoods(tiny_lm, batch, suffix_ids=suffixes)
    for b, n in enumerate(batch.lengths.tolist()):
        torch.testing.assert_close(fast[b, : n + 1], slow[b, : n + 1], atol=1e-4, rtol=1e-5)
    # the reward objects agree with the function and validate their output
    reward = LMSuffixReward(policy_of(tiny_lm, tokenizer))(batch)
    torch.testing.assert_close(reward[0, :5], fast[0, :5])
    prior = lm_prefix_log_likelihoods(tiny_lm, batch)
    for w, v in ((0.0, 1.0), (0.5, 1.0), (1.0, 3.0)):  # w log p(s_i | X) + v log p(Y | X s_i), one pass
        weighted = LMSuffixReward(policy_of(tiny_lm, tokenizer), prior_weight=w, likelihood_weight=v)(batch)
        for b, n in enumerate(batch.lengths.tolist()):
            expected = w * prior[b, : n + 1] + v * (fast - prior)[b, : n + 1]
            torch.testing.assert_close(weighted[b, : n + 1], expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="non-negative"):
        LMSuffixReward(policy_of(tiny_lm, tokenizer), likelihood_weight=-1.0)


def test_a_one_token_suffix_needs_no_copies(tiny_lm, batch):
    """Y's first token is read at the state itself; with one-token suffixes nothing is packed behind the rows."""
    suffixes = [[7]] * len(batch)
    fast = lm_prefix_log_likelihoods(tiny_lm, batch, suffix_ids=suffixes)
    slow = per_prefix_log_likelihoods(tiny_lm, batch, suffix_ids=suffixes)
    for b, n in enumerate(batch.lengths.tolist()):
        torch.testing.assert_close(fast[b, : n + 1], slow[b, : n + 1], atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("weights", [(1.0, 1.0), (0.5, 3.0)])
def test_terminal_suffix_reward_equals_the_full_rewards_last_state(tiny_lm, tokenizer, batch, weights):
    """The buffer-seeding path (two plain passes) gives every row's terminal log R of the full
    per-prefix computation: tool insertions, an empty Z, shared prompts, weights, a context."""
    from gfnlm.context import SharedContext

    for context in (None, SharedContext(tiny_lm, tokenizer, "12+3")):
        reward = LMSuffixReward(policy_of(tiny_lm, tokenizer), prior_weight=weights[0], likelihood_weight=weights[1],
                                context=context)
        full = terminal_values(reward(batch), batch)  # [B]
        torch.testing.assert_close(reward.terminal(batch), full, atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(terminal_log_rewards(reward, batch), full, atol=1e-4, rtol=1e-5)
    stop = LMStopReward(policy_of(tiny_lm, tokenizer))  # no terminal method: called in full, read at the end
    torch.testing.assert_close(terminal_log_rewards(stop, batch), terminal_values(stop(batch), batch))


def test_suffix_reward_scores_only_real_tokens_of_reached_states(tiny_lm, tokenizer, batch, monkeypatch):
    """The head skips padding and the suffix copies of states past each trajectory's end."""
    suffixes = [tokenizer(q.target, add_special_tokens=False)["input_ids"] for q in batch.queries]
    rows: list[int] = []
    linear = torch.nn.functional.linear
    head = tiny_lm.get_output_embeddings().weight

    def counting(x, weight, bias=None):  # the reward's head (its weights in the decoder's dtype: here the same)
        if weight.data_ptr() == head.data_ptr():
            rows.append(x.shape[0])
        return linear(x, weight, bias)

    monkeypatch.setattr(torch.nn.functional, "linear", counting)
    lm_prefix_log_likelihoods(tiny_lm, batch, suffix_ids=suffixes)
    generated = int(batch.attention_mask[:, batch.prompt_len :].sum())  # tool insertions included
    states = batch.lengths + 1
    suffix_lengths = torch.tensor([len(s) for s in suffixes])
    # Y's first token from each state, its later tokens inside the state's copy of Y
    assert sum(rows) == generated + int(states.sum()) + int((states * (suffix_lengths - 1)).sum())


def test_lm_reward_built_before_lora_keeps_scoring_with_the_base_model(tiny_lm, tokenizer, batch):
    """peft injects LoRA layers into the plain model in place. A reward built from it before the trainer
    wraps it (the CLI's order) must score with the base weights however far the adapter has moved, and
    leave the adapter on and trainable afterwards."""
    from gfnlm.config import TrainConfig

    suffixes = [tokenizer(q.target, add_special_tokens=False)["input_ids"] for q in batch.queries]
    policy = policy_of(tiny_lm, tokenizer)
    reward = LMSuffixReward(policy)
    base = reward(batch)
    policy.add_adapter(TrainConfig(lora_rank=4))
    with torch.no_grad():
        for name, param in policy.model.named_parameters():
            if "lora_B" in name:  # a trained adapter: B is no longer zero
                param.normal_(std=1.0)
        adapted = lm_prefix_log_likelihoods(tiny_lm, batch, suffix_ids=suffixes)
    assert (adapted - base).abs().max() > 0.1  # the adapter changes the plain model's scores
    torch.testing.assert_close(reward(batch), base)
    torch.testing.assert_close(lm_prefix_log_likelihoods(tiny_lm, batch, suffix_ids=suffixes), adapted)
    assert all(p.requires_grad for n, p in policy.model.named_parameters() if "lora_" in n)


def test_stop_reward_object(tiny_lm, tokenizer, batch):
    reward = LMStopReward(policy_of(tiny_lm, tokenizer))(batch)
    assert reward.shape == (len(RECORDS), 5)
    assert torch.isfinite(reward[0]).all() and (reward[0] < 0).all()


def test_suffix_reward_needs_a_target(tiny_lm, tokenizer):
    batch = Trajectories.from_records([TrajectoryRecord(Query("1"), [1, 4], [5], [True])], pad_token_id=0)
    with pytest.raises(RewardError, match="target"):
        LMSuffixReward(policy_of(tiny_lm, tokenizer))(batch)


def test_text_reward_sees_every_prefix(tokenizer, batch):
    seen = []

    def length_reward(texts, queries):
        seen.extend(texts)
        return [float(len(t)) for t in texts]

    log_r = TextReward(length_reward, tokenizer)(batch)
    assert seen[:5] == ["", "2", "23", "23+--", "23+--4"]
    assert log_r[0].tolist() == [0.0, 1.0, 2.0, 5.0, 6.0]
    assert log_r[2, 0] == 0.0
    doubled = SumReward([TextReward(length_reward, tokenizer)], [2.0])(batch)
    assert doubled[0, 4] == 12.0


@pytest.mark.parametrize(
    "fn, message",
    [
        (lambda texts, queries: [float("nan")] * len(texts), "non-finite"),
        (lambda texts, queries: [0.0], "returned 1 rewards"),
    ],
)
def test_bad_rewards_get_clear_errors(tokenizer, batch, fn, message):
    with pytest.raises(RewardError, match=message):
        TextReward(fn, tokenizer)(batch)


def test_wrong_shape_is_named(batch):
    with pytest.raises(RewardError, match=r"shape \[B, T\+1\]"):
        check_log_rewards(torch.zeros(3, 2), batch)


def test_continuations_after_a_prompt_longer_than_the_sliding_window():
    """Gemma-3 style sliding-window layers drop the oldest keys once the window is full, so the cache
    cannot be cropped back after a continuation unless it records the past; the scores must equal one
    full forward pass per continuation (regression: 20-shot prompting on gemma3-270m crashed)."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from gfnlm.rewards import lm_continuation_log_likelihoods

    config = Gemma3TextConfig(vocab_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=4,
                              layer_types=["sliding_attention", "full_attention"], max_position_embeddings=64)
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(config).eval()
    prompt = [1, 5, 6, 7, 8, 9, 10, 11, 12]  # 9 tokens: longer than the window of 4
    records = [TrajectoryRecord(Query("a"), prompt, [3, 4], [True, True]),
               TrajectoryRecord(Query("b"), prompt[::-1], [13, 14], [True, True])]
    continuations = [[6, 7, 8], [9, 10]]
    scores = lm_continuation_log_likelihoods(model, Trajectories.from_records(records, pad_token_id=0), continuations)
    for b, record in enumerate(records):
        for k, ids in enumerate(continuations):
            full = torch.tensor([record.prompt_ids + record.generated_ids + ids])
            with torch.no_grad():
                log_p = model(full).logits.log_softmax(-1)[0, -len(ids) - 1 : -1]  # [m, V]
            expected = log_p.gather(1, torch.tensor(ids)[:, None]).sum()
            torch.testing.assert_close(scores[b, k], expected, atol=1e-4, rtol=1e-5)
