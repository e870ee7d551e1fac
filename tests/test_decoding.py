"""Decoding rules: every rule stays in the action space; beam searches against brute force and each other."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from conftest import make_char_tokenizer, make_policy, make_tiny_lm

from gfnlm.decoding import RULES, DecodingRule, TokenCounter, beam_search, decode, diverse_beam_search
from gfnlm.rewards import policy_prefix_log_likelihoods, terminal_values
from gfnlm.sampling import truncate
from gfnlm.trajectories import ActionSpace, Query, TrajectoryRecord, Trajectories


@pytest.fixture
def setup():
    """A tiny LM over "a", "b", " " and "."; sentences of "a" and "b" that end with "."."""
    tokenizer = make_char_tokenizer("ab .")
    model = make_tiny_lm(vocab_size=len(tokenizer), seed=3)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in "ab."}
    space = ActionSpace(stop_token_ids=(ids["."],), max_len=3, min_len=1, allowed_token_ids=(ids["a"], ids["b"]))
    return model, tokenizer, space, ids


def _log_q(model, tokenizer, query, space, sequences) -> list[float]:
    """log q(z ⊤) of whole sequences under the policy of ``space`` (the stop forced at max_len)."""
    prompt = tokenizer(query.prompt)["input_ids"]
    records = [TrajectoryRecord(query, prompt, list(z), [True] * len(z)) for z in sequences]
    batch = Trajectories.from_records(records, tokenizer.pad_token_id)
    return terminal_values(policy_prefix_log_likelihoods(make_policy(model, tokenizer, space), batch), batch).tolist()


def test_truncate_keeps_the_top_k_and_the_nucleus():
    log_probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    top2 = truncate(log_probs, top_k=2).exp()
    assert torch.allclose(top2, torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    nucleus = truncate(log_probs, top_p=0.8).exp()  # the smallest set with mass >= 0.8: the first two
    assert torch.allclose(nucleus, top2)
    assert torch.allclose(truncate(log_probs, top_p=0.81).exp()[0, :3].sum(), torch.tensor(1.0))
    assert torch.equal(truncate(log_probs), log_probs)
    with pytest.raises(ValueError, match="top_p"):
        truncate(log_probs, top_p=0.0)


@pytest.mark.parametrize("name", RULES)
def test_every_rule_returns_n_sentences_inside_the_action_space(setup, name):
    model, tokenizer, space, ids = setup
    rule = DecodingRule(name, temperature=0.7, top_k=1, top_p=0.9)
    queries = [Query("ab "), Query("b ")]
    out = decode(make_policy(model, tokenizer, space), queries, rule, n=3, generator=torch.Generator().manual_seed(0))
    assert len(out) == 2 and all(len(records) == 3 for records in out)
    for query, records in zip(queries, out):
        for record in records:
            assert record.query == query
            assert space.min_len <= record.length <= space.max_len
            assert set(record.generated_ids) <= {ids["a"], ids["b"]}  # the stop is the end, never a token
    if name in ("greedy", "top-k"):  # top-1 sampling is greedy decoding
        assert len({tuple(r.generated_ids) for r in out[0]}) == 1
    if name == "beam":  # hypotheses of one beam search are distinct (diverse groups may meet)
        assert len({tuple(r.generated_ids) for r in out[0]}) == 3


def test_one_wide_group_is_exact_beam_search(setup):
    """With as many beams as sequences of any length, beam search finds the n most likely whole sentences."""
    model, tokenizer, space, ids = setup
    query = Query("ab ")
    every = [z for length in range(1, 4) for z in itertools.product([ids["a"], ids["b"]], repeat=length)]
    scores = _log_q(model, tokenizer, query, space, every)
    best = [list(z) for _, z in sorted(zip(scores, every), reverse=True)[:5]]
    found = diverse_beam_search(make_policy(model, tokenizer, space), query, n=5, groups=1, group_beams=8,
                                diversity_penalty=1.0)
    assert [r.generated_ids for r in found] == best
    hf = beam_search(make_policy(model, tokenizer, space), query, n=5, beams=8)  # transformers' beam search agrees
    assert [r.generated_ids for r in hf] == best


def _reference_diverse_greedy(model, tokenizer, query, space, groups, penalty):
    """Groups of one beam, written out naively: each step re-runs the whole prefix; group g picks the
    best of log q(token) - penalty x (earlier groups that picked it this step); a stop ends the group."""
    prompt = tokenizer(query.prompt)["input_ids"]
    sequences, scores, alive = [[] for _ in range(groups)], [0.0] * groups, [True] * groups
    for step in range(space.max_len + 1):
        chosen = {}
        for g in range(groups):
            if not alive[g]:
                continue
            with torch.no_grad():
                logits = model(torch.tensor([prompt + sequences[g]])).logits[:, -1]
            log_q = space.policy_log_probs(logits, torch.tensor([step]))[0].double()
            for token, count in chosen.items():
                log_q[token] -= penalty * count
            token = int(log_q.argmax())
            scores[g] += float(log_q[token])
            if token in space.stop_token_ids:
                alive[g] = False
            else:
                sequences[g].append(token)
                chosen[token] = chosen.get(token, 0) + 1
    return [z for _, z in sorted(zip(scores, sequences), key=lambda pair: -pair[0])]


@pytest.mark.parametrize("penalty", [0.0, 0.7, 100.0])
def test_diverse_beam_search_with_one_beam_per_group_matches_a_naive_reference(setup, penalty):
    model, tokenizer, space, ids = setup
    space = ActionSpace(space.stop_token_ids, max_len=4, min_len=1, allowed_token_ids=space.allowed_token_ids)
    query = Query("b ")
    found = diverse_beam_search(make_policy(model, tokenizer, space), query, n=3, groups=3, group_beams=1,
                                diversity_penalty=penalty)
    assert [r.generated_ids for r in found] == _reference_diverse_greedy(model, tokenizer, query, space, 3, penalty)
    if penalty == 100.0:  # the second group never starts as the first did
        first_tokens = {r.generated_ids[0] for r in found}
        assert len(first_tokens) == 2


def test_token_counter_counts_the_positions_each_rule_runs(setup):
    model, tokenizer, space, _ = setup
    counter = TokenCounter(model)
    decode(make_policy(model, tokenizer, space), [Query("ab ")], DecodingRule("greedy"), n=2)
    counter.remove()
    # greedy: the prompt once (3 tokens + <s>), then 2 rows x at most max_len steps of one token
    assert 4 < counter.total <= 4 + 2 * space.max_len
    assert counter.with_grad == 0


def test_an_unknown_rule_is_refused():
    with pytest.raises(ValueError, match="unknown decoding rule 'top-p'"):
        DecodingRule("top-p")
    assert math.isfinite(DecodingRule("beam", beam_factor=5).beam_factor)
    assert DecodingRule("diverse-beam", beam_factor=5).label == "diverse-beam penalty=1 x5"


def test_several_stop_tokens_are_one_way_to_stop_for_the_searches(setup):
    model, tokenizer, space, ids = setup
    two_stops = ActionSpace(stop_token_ids=(ids["."], ids["a"]), max_len=3, min_len=1, allowed_token_ids=(ids["b"],))
    from gfnlm.decoding import search_log_probs

    logits = torch.randn(2, len(tokenizer))
    merged = search_log_probs(two_stops, logits, torch.tensor([1, 1]))
    policy = two_stops.policy_log_probs(logits, torch.tensor([1, 1]))
    torch.testing.assert_close(merged[:, ids["."]], policy[:, [ids["."], ids["a"]]].logsumexp(-1))
    assert torch.isinf(merged[:, ids["a"]]).all()
    for found in (beam_search(make_policy(model, tokenizer, two_stops), Query("ab "), n=3, beams=3),
                  diverse_beam_search(make_policy(model, tokenizer, two_stops), Query("ab "), n=3, groups=1,
                                      group_beams=3, diversity_penalty=0.0)):
        assert len({tuple(r.generated_ids) for r in found}) == 3  # b., bb., bbb.: each once, not once per stop
