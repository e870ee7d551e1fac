"""Sampler and scorer agree, respect the action space, and handle tools and padding."""

import pytest
import torch

from conftest import make_policy

from gfnlm.sampling import Tool, text_records
from gfnlm.scoring import score_policy, terminal_log_prob
from gfnlm.trajectories import ActionSpace, Query, TrajectoryRecord, Trajectories

STOP = 2  # "</s>"
DIGITS = tuple(range(3, 13))
PLUS = 13


def queries(n):
    prompts = ["1", "23+4", "5-", "67"]
    return [Query(prompts[i % len(prompts)]) for i in range(n)]


def double_plus_tool(query, generated):
    """Inserts "-" "-" after every "+": a stand-in for the calculator."""
    return [14, 14] if generated[-1] == PLUS else []


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("with_tool", [False, True])
def test_scorer_equals_log_probs_seen_while_sampling(tiny_lm, tokenizer, temperature, with_tool):
    space = ActionSpace(stop_token_ids=(STOP,), max_len=6, min_len=1, allowed_token_ids=DIGITS + (PLUS,))
    g = torch.Generator().manual_seed(0)
    policy = make_policy(tiny_lm, tokenizer, space, double_plus_tool if with_tool else None)
    traj = policy.sample(queries(12), temperature, g)
    log_pf, log_pterm = score_policy(tiny_lm, traj, space)
    lengths = traj.lengths
    valid_pf = torch.arange(log_pf.shape[1])[None] < lengths[:, None]
    valid_pt = torch.arange(log_pterm.shape[1])[None] <= lengths[:, None]
    torch.testing.assert_close(log_pf[valid_pf], traj.sampling_log_pf[valid_pf], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(log_pterm[valid_pt], traj.sampling_log_pterm[valid_pt], atol=2e-5, rtol=1e-5)
    if with_tool:
        assert (~traj.is_action & traj.attention_mask.bool())[:, traj.prompt_len:].any(), "tool never fired"


def test_stop_rules_and_token_mask(tiny_lm, tokenizer):
    space = ActionSpace(stop_token_ids=(STOP,), max_len=4, min_len=2, allowed_token_ids=(3, 4))
    traj = make_policy(tiny_lm, tokenizer, space).sample(queries(64), 2.0, torch.Generator().manual_seed(1))
    lengths = traj.lengths
    assert lengths.min() >= 2 and lengths.max() <= 4
    assert (lengths == 4).any() and (lengths < 4).any()
    actions = traj.input_ids[traj.is_action]
    assert set(actions.tolist()) <= {3, 4}
    # the forced stop at max_len has probability one under the policy
    log_pf, log_pterm = score_policy(tiny_lm, traj, space)
    full = lengths == 4
    assert (log_pterm[full, 4] == 0).all()


def test_score_is_padding_invariant(tiny_lm, tokenizer):
    """A trajectory scored alone or inside a ragged batch gets the same log-probabilities."""
    space = ActionSpace(stop_token_ids=(STOP,), max_len=5)
    records = [
        TrajectoryRecord(Query("1"), [1, 4], [5, 6, 13, 14, 14, 7], [True, True, True, False, False, True]),
        TrajectoryRecord(Query("23+4"), [1, 5, 6, 13, 7], [8], [True]),
        TrajectoryRecord(Query("5"), [1, 8], [], []),
        # fewer actions than the horizon but the most tokens: its last state ends after the insertions
        TrajectoryRecord(Query("67"), [1, 9, 10], [5, 13, 14, 14, 14, 14, 14], [True, True] + [False] * 5),
    ]
    batch = Trajectories.from_records(records, pad_token_id=0)
    log_pf, log_pterm = score_policy(tiny_lm, batch, space)
    for b, record in enumerate(records):
        alone = Trajectories.from_records([record], pad_token_id=0)
        pf1, pt1 = score_policy(tiny_lm, alone, space)
        n = record.length
        torch.testing.assert_close(log_pf[b, :n], pf1[0, :n], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(log_pterm[b, : n + 1], pt1[0, : n + 1], atol=1e-5, rtol=1e-5)
    assert batch.lengths.tolist() == [4, 1, 0, 2]
    assert batch.records()[0].generated_ids == records[0].generated_ids


def test_empirical_frequencies_match_policy_probabilities(tiny_lm, tokenizer):
    space = ActionSpace(stop_token_ids=(STOP,), max_len=2, allowed_token_ids=(3, 4))
    n = 4000
    traj = make_policy(tiny_lm, tokenizer, space).sample([Query("5")] * n, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        log_q = terminal_log_prob(*score_policy(tiny_lm, traj, space), traj.lengths)
    texts = traj.generated_texts(tokenizer)
    for text in set(texts):
        p = float(log_q[texts.index(text)].exp())
        freq = texts.count(text) / n
        assert abs(freq - p) < 4 * (p * (1 - p) / n) ** 0.5 + 1e-3, (text, freq, p)


def test_bad_sampling_arguments(tiny_lm, tokenizer):
    with pytest.raises(ValueError, match="min_len"):
        ActionSpace(stop_token_ids=(STOP,), max_len=2, min_len=3)
    space = ActionSpace(stop_token_ids=(STOP,), max_len=2)
    policy = make_policy(tiny_lm, tokenizer, space)
    with pytest.raises(ValueError, match="temperature"):
        policy.sample(queries(2), temperature=-1.0)
    tokenizer.pad_token = None
    with pytest.raises(ValueError, match="pad token"):
        policy.sample(queries(2))


def test_draw_tokens_follows_the_probabilities_and_skips_zeros():
    from gfnlm.sampling import draw_tokens

    probs = torch.tensor([[0.0, 0.5, 0.0, 0.2, 0.3, 0.0]]).expand(20000, -1)
    draws = draw_tokens(probs * 7.0, torch.Generator().manual_seed(0))  # unnormalised input is fine
    counts = torch.bincount(draws, minlength=6).double() / len(draws)
    assert counts[[0, 2, 5]].sum() == 0
    assert torch.allclose(counts, probs[0].double(), atol=0.015)


def head_rows(model) -> list[int]:
    """Records how many positions each call of the output head receives."""
    rows: list[int] = []
    model.get_output_embeddings().register_forward_hook(lambda _m, args, _out: rows.append(args[0].shape[0]))
    return rows


def test_output_head_runs_only_at_reached_states(tiny_lm):
    """Batch padding adds states past each trajectory's end; the vocabulary-sized head skips them."""
    space = ActionSpace(stop_token_ids=(STOP,), max_len=5)
    records = [
        TrajectoryRecord(Query("1"), [1, 4], [5, 6, 13, 7], [True] * 4),
        TrajectoryRecord(Query("23+4"), [1, 5, 6, 13, 7], [8], [True]),
        TrajectoryRecord(Query("5"), [1, 8], [], []),
    ]
    rows = head_rows(tiny_lm)
    log_pf, log_pterm = score_policy(tiny_lm, Trajectories.from_records(records, pad_token_id=0), space)
    assert sum(rows) == 5 + 2 + 1  # n_b + 1 states each, not 3 * (T + 1) = 15
    assert log_pterm.shape == (3, 5) and log_pf.shape == (3, 4)
    assert torch.isfinite(log_pterm[0]).all() and (log_pterm[2, 1:] == 0).all()


def test_text_records_write_each_text_after_its_prompt(tokenizer):
    records = text_records(tokenizer, [(Query("23+4"), "5+6"), (Query("1"), "")])
    assert [r.generated_ids for r in records] == [tokenizer("5+6", add_special_tokens=False)["input_ids"], []]
    assert records[0].prompt_ids == tokenizer("23+4")["input_ids"] and records[0].is_action == [True] * 3
    assert records[1].length == 0 and records[1].query == Query("1")


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_static_cache_samples_the_same_tokens_with_the_same_log_probs(tiny_lm, tokenizer, temperature, monkeypatch):
    """The preallocated cache changes where keys and values live, not what is sampled: greedy and
    seeded sampling agree token for token, with a tool whose insertions outgrow the first buffers."""
    import gfnlm.sampling

    space = ActionSpace(stop_token_ids=(STOP,), max_len=6, min_len=5, allowed_token_ids=DIGITS + (PLUS,))
    chatty_tool = lambda query, generated: [14] * 6  # noqa: E731  (7 columns per action: 35 or more in all)
    copies = []
    static_copy = gfnlm.sampling._static_copy
    monkeypatch.setattr(gfnlm.sampling, "_static_copy", lambda *args: copies.append(args[3]) or static_copy(*args))
    runs = [make_policy(tiny_lm, tokenizer, space, chatty_tool, static_cache=static).sample(
        queries(12), temperature, torch.Generator().manual_seed(3)) for static in (False, True)]
    growing, static = runs
    assert torch.equal(growing.input_ids, static.input_ids) and torch.equal(growing.is_action, static.is_action)
    assert len(copies) >= 2 and copies == sorted(copies), copies  # the prompts' copy, then at least one regrowth
    torch.testing.assert_close(static.sampling_log_pf, growing.sampling_log_pf, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(static.sampling_log_pterm, growing.sampling_log_pterm, atol=1e-5, rtol=1e-5)


def test_static_cache_on_a_sliding_window_model(tokenizer):
    """Gemma 3 mixes sliding-window and full layers: the static cache agrees within the window and
    is refused, with the reason, beyond it."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    def tiny_gemma(window: int):
        torch.manual_seed(0)
        config = Gemma3TextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=window,
                                  layer_types=["sliding_attention", "full_attention"], max_position_embeddings=64,
                                  pad_token_id=0, bos_token_id=1, eos_token_id=STOP)
        return Gemma3ForCausalLM(config).eval()

    space = ActionSpace(stop_token_ids=(STOP,), max_len=6, min_len=1, allowed_token_ids=DIGITS)
    model = tiny_gemma(window=32)
    growing, static = [make_policy(model, tokenizer, space, static_cache=s).sample(
        queries(6), 1.0, torch.Generator().manual_seed(4)) for s in (False, True)]
    assert torch.equal(growing.input_ids, static.input_ids)
    torch.testing.assert_close(static.sampling_log_pf, growing.sampling_log_pf, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="sliding window \\(4 tokens\\)"):
        make_policy(tiny_gemma(window=4), tokenizer, space, static_cache=True).sample(queries(6))


def test_a_restricted_space_scores_with_the_head_rows_of_its_tokens_only(tiny_lm, tokenizer):
    """A space of a few tokens multiplies only their rows of the output head; the log-probs are those of the
    whole head restricted to the space, and a disallowed action gets -inf."""
    from gfnlm.scoring import PolicyHead

    space = ActionSpace(stop_token_ids=(STOP,), max_len=4, allowed_token_ids=(3, 4, 5))
    layout = space.layout(len(tokenizer), "cpu")
    head = PolicyHead(tiny_lm, layout)
    assert head.rows is not None and head.rows[0].shape[0] == layout.width == 4
    hidden = torch.randn(6, tiny_lm.config.hidden_size)
    whole = tiny_lm.get_output_embeddings()(hidden)
    torch.testing.assert_close(head(hidden), whole[:, [2, 3, 4, 5]])
    log_probs = space.policy_log_probs(whole, torch.tensor([0, 1, 2, 3, 4, 4]))
    assert torch.isinf(log_probs[:, 6:]).all() and (log_probs[4:, STOP] == 0).all()
    torch.testing.assert_close(log_probs[:4, [2, 3, 4, 5]], whole[:4, [2, 3, 4, 5]].log_softmax(-1))
    records = [TrajectoryRecord(Query("1"), [1, 4], [3, 9], [True, True])]  # 9 is not in the space
    log_pf, _ = score_policy(tiny_lm, Trajectories.from_records(records, pad_token_id=0), space)
    assert torch.isfinite(log_pf[0, 0]) and log_pf[0, 1] == float("-inf")


class PlusTool(Tool):
    """``double_plus_tool`` as a Tool that says only "+" can trigger it, counting the rows it is asked about."""

    def __init__(self):
        self.asked = 0

    def triggers(self, token_ids):
        return [t == PLUS for t in token_ids]

    def __call__(self, query, generated):
        self.asked += 1
        return double_plus_tool(query, generated)


def test_a_tool_is_asked_only_after_its_trigger_tokens(tiny_lm, tokenizer):
    space = ActionSpace(stop_token_ids=(STOP,), max_len=6, min_len=1, allowed_token_ids=DIGITS + (PLUS,))
    asked_always = []
    counting = lambda query, generated: asked_always.append(1) or double_plus_tool(query, generated)  # noqa: E731
    tool = PlusTool()
    every, triggered = [make_policy(tiny_lm, tokenizer, space, t).sample(queries(16), 1.5, torch.Generator().manual_seed(5))
                        for t in (counting, tool)]
    assert torch.equal(every.input_ids, triggered.input_ids) and torch.equal(every.is_action, triggered.is_action)
    pluses = int((triggered.input_ids[triggered.is_action] == PLUS).sum())
    assert pluses > 0 and tool.asked == pluses  # once per "+" written, not once per action
    assert len(asked_always) == int(triggered.lengths.sum())
