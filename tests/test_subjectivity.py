"""The subjectivity task: loading and splits, label scoring, voting, inverse prompting, EM, the CLI."""

from __future__ import annotations

import json
import re
import string

import pytest
import torch
from conftest import DEVICES, make_char_tokenizer, make_policy, make_tiny_lm
from peft import LoraConfig, get_peft_model

from gfnlm.cli import main
from gfnlm.rewards import lm_prefix_log_likelihoods
from gfnlm.sampling import encode_prompts
from gfnlm.tasks.subjectivity import (
    INVERSE_PROMPT,
    Review,
    SubjectivityOptions,
    SubjectivityTask,
    _vote,
    load_reviews,
    validation_split,
)
from gfnlm.trajectories import Query, Trajectories, TrajectoryRecord

CHARS = string.ascii_letters + " :,.\"'\n"


def _tokenizer():
    return make_char_tokenizer(chars=CHARS)


def _lm(seed: int = 0):
    return make_tiny_lm(seed=seed, vocab_size=len(_tokenizer()))


def write_reviews(folder):
    """A pool of 40 reviews; the 10-example training subset is its first 10."""
    folder.mkdir()
    rows = [{"text": f"review {'so ' * (i % 3)}{string.ascii_lowercase[i % 26]}{string.ascii_lowercase[i // 26]}",
             "label": i % 2, "label_text": ("objective", "subjective")[i % 2]} for i in range(40)]
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "train.10.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:10]))
    return folder


@pytest.fixture
def data_dir(tmp_path):
    return write_reviews(tmp_path / "subj")


def policy_of(task, model):
    return make_policy(model, task.tokenizer, task.action_space())


def _task(data_dir, **options) -> SubjectivityTask:
    settings = dict(data_dir=str(data_dir), validation_size=8, eval_samples=3, max_len=3, inverse_prompt_samples=2,
                    m_step_samples=2, eval_batch_reviews=3) | options
    return SubjectivityTask(SubjectivityOptions(**settings), _tokenizer())


def test_reviews_accept_numeric_and_word_labels(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"text": "a b", "label": 1}\n{"text": "c", "label": "objective"}\n{"text": "d", "label": "0"}\n')
    assert load_reviews(path) == [Review("a b", 1), Review("c", 0), Review("d", 0)]


@pytest.mark.parametrize("row, message", [
    ({"label": 1}, "row 1: missing or empty 'text'"),
    ({"text": "  ", "label": 1}, "row 1: missing or empty 'text'"),
    ({"text": "x", "label": 2}, "row 1: label must be 0, 1"),
    ({"text": "x", "label": "neutral"}, "row 1: label must be 0, 1"),
    ({"text": "x", "label": True}, "row 1: label must be 0, 1"),
    ({"text": "x"}, "row 1: label must be 0, 1"),
])
def test_bad_rows_are_named(tmp_path, row, message):
    path = tmp_path / "test.jsonl"
    path.write_text(json.dumps({"text": "fine", "label": 0}) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(ValueError, match=re.escape(message)) as err:
        load_reviews(path)
    assert str(path) in str(err.value)


def test_empty_file_is_an_error(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    with pytest.raises(ValueError, match="no rows"):
        load_reviews(path)


def test_evaluating_no_reviews_is_an_error(data_dir):
    """eval_reviews 0 once gave a ZeroDivisionError after training, not an error before it."""
    with pytest.raises(ValueError, match="eval_reviews must be at least 1"):
        _task(data_dir, eval_reviews=0)
    assert len(_task(data_dir, eval_reviews=3).test_reviews()[1]) == 3


def test_validation_split_is_reproducible_and_excludes_training(data_dir):
    pool = load_reviews(data_dir / "train.jsonl")
    train = {r.text for r in pool[:10]}
    split = validation_split(pool, 20, seed=3, exclude=train)
    assert split == validation_split(pool, 20, seed=3, exclude=train)
    assert split != validation_split(pool, 20, seed=4, exclude=train)
    assert not {r.text for r in split} & train and len({r.text for r in split}) == 20
    with pytest.raises(ValueError, match="only 30 reviews"):
        validation_split(pool, 31, seed=0, exclude=train)
    task = _task(data_dir)
    assert not {r.text for r in task.test_reviews()[1]} & train


def _full_log_prob(model, tokenizer, text: str, continuation: str) -> float:
    """log p(continuation | text) by one plain forward pass."""
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    cont = tokenizer(continuation, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([ids + cont])).logits[0].log_softmax(-1)
    return float(sum(logits[len(ids) - 1 + i, t] for i, t in enumerate(cont)))


@pytest.mark.parametrize("shots", [0, 2])
def test_direct_label_scores_are_the_lm_likelihoods(data_dir, shots):
    task, model, tok = _task(data_dir, rationales=False, shots=shots), _lm(), _tokenizer()
    review = task.train[3]
    query = Query(review.prompt())
    traj = Trajectories.from_records([TrajectoryRecord(query, encode_prompts(tok, [query])[0], [], [])], 0)
    scores = task.label_log_probs(model, traj, task.few_shot_context(model))[0]
    context = task.few_shot_context(model).text if shots else ""
    if shots:  # the demonstrations come first, then the prompt (its <s> included, as in the cached layout)
        assert context.count("This review is") == shots
    for j, label in enumerate(("objective", "subjective")):
        if shots:
            ids = tok(context)["input_ids"] + tok(review.prompt())["input_ids"]
            cont = tok(f" {label}.", add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                lp = model(torch.tensor([ids + cont])).logits[0].log_softmax(-1)
            expected = float(sum(lp[len(ids) - 1 + i, t] for i, t in enumerate(cont)))
        else:
            expected = _full_log_prob(model, tok, review.prompt(), f" {label}.")
        assert scores[j].item() == pytest.approx(expected, abs=1e-4)


def test_rationale_label_scores_are_the_lm_likelihoods_in_a_padded_batch(data_dir):
    """Rows of different prompt and rationale lengths (left- and right-padding), two of them sharing a
    prompt (whose cache is shared), score as if alone."""
    task, model, tok = _task(data_dir), _lm(), _tokenizer()
    rows = [(task.train[0], "abc"), (task.train[1], "a"), (task.train[2], "xyzzy"), (task.train[0], "q")]
    records = []
    for review, z in rows:
        query = Query(review.prompt())
        ids = tok(z, add_special_tokens=False)["input_ids"]
        records.append(TrajectoryRecord(query, encode_prompts(tok, [query])[0], ids, [True] * len(ids)))
    assert len({len(r.prompt_ids) for r in records}) > 1
    scores = task.label_log_probs(model, Trajectories.from_records(records, 0))
    for b, (review, z) in enumerate(rows):
        for j, label in enumerate(("objective", "subjective")):
            expected = _full_log_prob(model, tok, review.prompt() + z, f", so it is {label}.")
            assert scores[b, j].item() == pytest.approx(expected, abs=1e-4)


def test_reward_likelihood_weight_scales_only_the_labels_likelihood(data_dir):
    """R = p(Z | X) p(Y | X Z)^v: v = 3 adds twice log p(Y | X Z) to every prefix's log R."""
    model, tok = _lm(), _tokenizer()
    task = _task(data_dir)
    records = []
    for query, z in zip(task.train_queries()[:3], ("abc", "a", "xy")):
        ids = tok(z, add_special_tokens=False)["input_ids"]
        records.append(TrajectoryRecord(query, encode_prompts(tok, [query])[0], ids, [True] * len(ids)))
    traj = Trajectories.from_records(records, 0)
    joint = task.reward(policy_of(task, model))(traj)
    weighted = _task(data_dir, reward_likelihood_weight=3.0).reward(policy_of(task, model))(traj)
    prior = lm_prefix_log_likelihoods(model, traj)
    for b, n in enumerate(traj.lengths.tolist()):
        likelihood = (joint - prior)[b, : n + 1]
        assert (likelihood < 0).all()  # a label is never certain: the weight has something to scale
        torch.testing.assert_close(weighted[b, : n + 1], joint[b, : n + 1] + 2 * likelihood, atol=1e-4, rtol=1e-5)


def test_vote_is_the_majority_and_ties_go_to_the_log_odds():
    review = Review("x", 1)
    assert _vote(review, ["a", "b", "c"], [1.0, -0.5, 2.0])["prediction"] == 1
    assert _vote(review, ["a", "b", "c"], [-1.0, -0.5, 9.0])["prediction"] == 0  # 2 of 3 say objective
    assert _vote(review, ["a", "b"], [-1.0, 3.0])["prediction"] == 1  # tie: summed log-odds +2
    assert _vote(review, ["a", "b"], [-3.0, 1.0])["prediction"] == 0


def test_evaluate_writes_predictions_and_top_rationales(data_dir, tmp_path):
    task, model = _task(data_dir), _lm()
    result = task.evaluate(policy_of(task, model), tmp_path, "tiny")
    rows = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert result["n_reviews"] == len(rows) == 8
    assert result["accuracy"] == sum(r["correct"] for r in rows) / 8
    for row in rows:
        assert len(row["rationales"]) == 3 and row["votes"] == [int(v > 0) for v in row["log_odds"]]
        assert row["prediction"] == int(sum(row["votes"]) >= 2)
    top = result["top_rationales"]
    assert set(top) <= {"objective", "subjective"} and top
    for entries in top.values():
        assert entries and all(0 < e["frequency"] <= 1 for e in entries)
        assert [e["frequency"] for e in entries] == sorted((e["frequency"] for e in entries), reverse=True)
    # rationales are words only: letters, no stop comma inside
    assert all(re.fullmatch(r"[A-Za-z ]*", z) for r in rows for z in r["rationales"])


def test_inverse_prompting_seeds_records_for_the_policy_prompt(data_dir):
    task, model, tok = _task(data_dir), _lm(), _tokenizer()
    records = task.seed_records(policy_of(task, model), torch.Generator().manual_seed(5))
    assert len(records) == 10 * 2
    # the rationales are the base model's continuations of the inverse prompt (same draws) ...
    inverse = [Query(INVERSE_PROMPT.format(text=r.text, label=r.label_text)) for r in task.train for _ in range(2)]
    expected = policy_of(task, model).sample(inverse, 1.0, torch.Generator().manual_seed(5)).records()
    assert [r.generated_ids for r in records] == [e.generated_ids for e in expected]
    # ... put behind the policy's own prompt, with the review's label as the target Y
    allowed = set(task.allowed_ids)
    for i, record in enumerate(records):
        review = task.train[i // 2]
        assert record.query == task.query(review) and record.query.target.endswith(f"{review.label_text}.")
        assert record.prompt_ids == encode_prompts(tok, [record.query])[0]
        assert 1 <= len(record.generated_ids) <= 3 and set(record.generated_ids) <= allowed
    assert _task(data_dir, seed_buffer=False).seed_records(policy_of(task, model), torch.Generator()) == []


def _lora(model, seed: int):
    """``model`` with a LoRA adapter that changes its outputs (random B, not the zero init)."""
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules="all-linear"))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
    return peft_model


def _logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, -1]


@pytest.mark.parametrize("balance, subjective_share", [(False, 0.2), (True, 0.5)])
def test_supervised_examples_follow_the_label_shares_unless_balanced(data_dir, tmp_path, balance, subjective_share):
    rows = [{"text": f"review {i}", "label": int(i >= 8)} for i in range(10)]  # 8 objective, 2 subjective
    (tmp_path / "skewed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = _task(data_dir, train_file=str(tmp_path / "skewed.jsonl"), rationales=False, balance_labels=balance)

    examples = task.sft_examples(4000, torch.Generator().manual_seed(0))

    share = sum(e.query.meta["label"] for e in examples) / len(examples)
    assert share == pytest.approx(subjective_share, abs=0.03)
    assert len({e.query.prompt for e in examples}) == 10  # every review is drawn


def test_m_step_samples_the_e_step_policy_and_em_evaluation_uses_both_adapters(data_dir, tmp_path):
    tok = _tokenizer()
    e_step = _lora(_lm(), seed=1)
    e_step.save_pretrained(tmp_path / "e-step")
    task = _task(data_dir, e_step_run=str(tmp_path / "e-step"))
    ids = tok(task.train[0].prompt())["input_ids"]

    em = get_peft_model(_lm(), LoraConfig(r=2, target_modules="all-linear"))  # the M-step's fresh adapter
    trainable = {n for n, p in em.named_parameters() if p.requires_grad}
    task.prepare_m_step(make_policy(em, tok, task.lm_space()), torch.Generator().manual_seed(3))
    assert set(em.peft_config) == {"default"} and {n for n, p in em.named_parameters() if p.requires_grad} == trainable
    # the rationales are the E-step policy's samples (same draws), followed by ", so it is <label>"
    queries = [task.query(r) for r in task.train for _ in range(2)]
    expected = policy_of(task, e_step).sample(queries, 1.0, torch.Generator().manual_seed(3)).records()
    records = task._sft_records
    space = task.lm_space()
    for record, policy_record in zip(records, expected, strict=True):
        answer = tok(record.query.target.removesuffix("."), add_special_tokens=False)["input_ids"]
        assert record.generated_ids == policy_record.generated_ids + answer
        assert len(record.generated_ids) < space.max_len  # the "." after them is never forced

    # evaluation of the EM model: q is the E-step adapter, the answering LM the M-step adapter
    m_step = _lora(_lm(), seed=2)
    with task.rationale_policy(m_step):
        torch.testing.assert_close(_logits(m_step, ids), _logits(e_step, ids))
    with task.answering_model(m_step):
        answers = _logits(m_step, ids)
    assert m_step.active_adapter == "default"
    with m_step.disable_adapter():
        assert not torch.allclose(answers, _logits(m_step, ids))  # not the base model
    torch.testing.assert_close(answers, _logits(_lora(_lm(), seed=2), ids))
    assert task.evaluate(policy_of(task, m_step), None, "em")["n_reviews"] == 8


@pytest.mark.parametrize("device", DEVICES)
def test_cli_trains_gfn_then_em_and_evaluates_baselines(data_dir, tmp_path, device):
    folder = tmp_path / "tiny"
    _lm().save_pretrained(folder)
    _tokenizer().save_pretrained(folder)
    common = ["--model", str(folder), "--task", "subjectivity", "--data_dir", str(data_dir), "--validation_size", "6",
              "--eval_samples", "2", "--max_len", "3", "--inverse_prompt_samples", "2", "--steps", "2",
              "--queries_per_step", "2", "--samples_per_query", "2", "--lora_rank", "2", "--progress", "false",
              "--device", device]
    gfn = tmp_path / "gfn"
    assert main(["train", "--method", "gfn", "--output-dir", str(gfn), *common]) == 0
    saved = (gfn / "config.yaml").read_text()
    assert "reward_temp_start: 1.2" in saved and "log_z_init: estimate" in saved  # the task's defaults for gfn
    assert json.loads((gfn / "eval.json").read_text())["rationales"] is True
    em = tmp_path / "em"
    assert main(["train", "--method", "em", "--e_step_run", str(gfn), "--output-dir", str(em), *common]) == 0
    assert json.loads((em / "eval.json").read_text())["n_reviews"] == 6
    sft = tmp_path / "sft"
    assert main(["train", "--method", "sft", "--output-dir", str(sft), *common]) == 0
    assert json.loads((sft / "eval.json").read_text())["rationales"] is False
    for run in (em, sft):  # the targets fit the action space: every likelihood finite, no step skipped
        steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert len(steps) == 2 and not any(s["skipped"] for s in steps), run
    shots = tmp_path / "shots"
    assert main(["eval", "--method", "prompting", "--shots", "3", "--output-dir", str(shots), *common]) == 0
    result = json.loads((shots / "eval.json").read_text())
    assert result["shots"] == 3 and result["label"] == "3-shot prompting" and result["rationales"] is False


def test_cli_reports_a_bad_test_file(data_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok", "label": 0}\n{"text": "hm", "label": 7}\n')
    folder = tmp_path / "tiny"
    _lm().save_pretrained(folder)
    _tokenizer().save_pretrained(folder)
    code = main(["eval", "--task", "subjectivity", "--model", str(folder), "--data_dir", str(data_dir),
                 "--test_file", str(bad), "--output-dir", str(tmp_path / "out"), "--device", "cpu"])
    assert code == 2 and f"{bad}, row 1: label must be 0, 1" in capsys.readouterr().err


def test_rationales_may_not_use_the_label_words_unless_allowed(data_dir):
    """The policy's allowed set drops the label words, their stems ("subj", " Object") and words built on
    them (" objectively") by default, but keeps words that merely share two letters ("su", " obey")."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", ",", ".", " objective", " subjective", "objective", " about", " facts", "x",
             "subj", " Object", " su", " objectively", " obey"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="x"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r" ?[a-z]+|[,.]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>")
    options = dict(data_dir=str(data_dir), validation_size=8)
    strict = SubjectivityTask(SubjectivityOptions(**options), tok)
    assert sorted(tok.decode([t]) for t in strict.allowed_ids) == [" about", " facts", " obey", " su", "x"]
    loose = SubjectivityTask(SubjectivityOptions(**options, rationale_excludes_labels=False), tok)
    assert {" objective", " subjective", "objective", "subj", " Object"} <= {tok.decode([t]) for t in loose.allowed_ids}
