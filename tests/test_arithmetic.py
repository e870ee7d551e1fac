"""The arithmetic task: data loading and generation, rationale records, reward context, evaluation."""

from __future__ import annotations

import json
import re
import string

import pytest
import torch
from peft import LoraConfig, get_peft_model

from conftest import DEVICES, make_char_tokenizer, make_policy, make_tiny_lm, needs_cuda
from gfnlm.cli import main
from gfnlm.rewards import LMSuffixReward, lm_prefix_log_likelihoods
from gfnlm.scoring import score_policy
from gfnlm.tasks.arithmetic import ArithmeticOptions, ArithmeticTask, calls_histogram, generate_problems, load_problems
from gfnlm.trajectories import Trajectories

WORKED = [
    {"str_query": "Question: 6 - 0 - 4 = ? Answer:", "num_sol": 2, "str_rationale": "6 - 0 =, 6 - 4 =",
     "str_sol": ". The answer is 2."},
    {"str_query": "Question: 9 + 4 - 8 = ? Answer:", "num_sol": 5, "str_rationale": "9 + 4 =, 13 - 8 =",
     "str_sol": ". The answer is 5."},
    {"str_query": "Question: 1 + 5 - 7 = ? Answer:", "num_sol": -1, "str_rationale": "1 + 5 =, 6 - 7 =",
     "str_sol": ". The answer is -1."},
]
PLAIN = [{"str_query": "Question: 2 + 2 + 2 = ? Answer:", "num_sol": 6, "str_sol": ". The answer is 6."},
         {"str_query": "Question: 3 - 1 + 2 = ? Answer:", "num_sol": 4}]


def _tokenizer():
    return make_char_tokenizer(chars=string.ascii_letters + string.digits + " +-=,.?:")


@pytest.fixture
def files(tmp_path):
    worked, plain = tmp_path / "worked.json", tmp_path / "plain.json"
    worked.write_text(json.dumps(WORKED))
    plain.write_text("\n".join(json.dumps(r) for r in PLAIN))  # JSON lines are read too
    return worked, plain


@pytest.fixture
def model_dir(tmp_path):
    """A tiny model and the task's tokenizer saved to disk, for the command line."""
    folder, tokenizer = tmp_path / "tiny", _tokenizer()
    make_tiny_lm(vocab_size=len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def task(files):
    worked, plain = files
    options = ArithmeticOptions(train_file=str(plain), worked_file=str(worked), reward_shots=2, seed_rationales=2,
                                max_len=12, min_len=2, eval_samples=3, eval_max_len=6, answer_max_tokens=4)
    return ArithmeticTask(options, _tokenizer())


def test_load_problems_reads_release_format(files):
    worked, plain = files
    problems = load_problems(worked)
    assert [p.answer for p in problems] == [2, 5, -1]
    assert problems[1].demonstration() == "Question: 9 + 4 - 8 = ? Answer: 9 + 4 = 13, 13 - 8 = 5. The answer is 5.\n"
    assert load_problems(plain)[1].solution == ". The answer is 4."  # derived when str_sol is missing


@pytest.mark.parametrize("row, message", [
    ({"num_sol": 3}, "row 1: missing field(s) str_query"),
    ({"str_query": "Question: 1 + 1 = ? Answer:", "num_sol": "two"}, "row 1: num_sol must be an integer"),
    ({"str_query": "Question: 1 + 1 = ? Answer:", "num_sol": 2.5}, "row 1: num_sol must be an integer"),
    ({"str_query": "Question: 1 + 1 = ? Answer:"}, "row 1: missing field(s) num_sol"),
])
def test_bad_rows_are_named(tmp_path, row, message):
    path = tmp_path / "test.json"
    path.write_text(json.dumps([PLAIN[0], row]))
    with pytest.raises(ValueError, match=re.escape(message)) as err:
        load_problems(path)
    assert str(path) in str(err.value)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_problems(tmp_path / "nope.json")


def test_generated_problems_are_correct_new_and_reproducible():
    exclude = {"Question: 1 + 2 + 3 = ? Answer:"}
    rows = generate_problems(3, 200, seed=1, exclude=exclude)
    assert rows == generate_problems(3, 200, seed=1, exclude=exclude)
    assert len({r["str_query"] for r in rows}) == 200 and not exclude & {r["str_query"] for r in rows}
    for row in rows:
        expression = row["str_query"].removeprefix("Question: ").removesuffix(" = ? Answer:")
        terms = expression.split(" ")
        assert len(terms) == 5
        value = int(terms[0])
        for op, digit in zip(terms[1::2], terms[2::2]):
            value = value + int(digit) if op == "+" else value - int(digit)
        assert row["num_sol"] == value and row["str_sol"] == f". The answer is {value}."
    with pytest.raises(ValueError, match="distinct"):
        generate_problems(2, 10**4, seed=0)


def test_rationale_record_replays_the_calculator(task):
    record = task.rationale_record(task.worked[1])
    tok = task.tokenizer
    assert tok.decode(record.generated_ids) == " 9 + 4 = 13, 13 - 8 = 5"
    inserted = "".join(tok.decode([t]) for t, a in zip(record.generated_ids, record.is_action) if not a)
    assert inserted == " 13 5"
    assert len(task.seed_records(None, torch.Generator())) == 2
    space = task.action_space()
    assert all(t in space.allowed_token_ids for t, a in zip(record.generated_ids, record.is_action) if a)
    assert tok.decode(list(space.stop_token_ids)) == "."


def test_rationale_record_splits_a_token_that_spans_the_calculators_place(files):
    """Gemma's tokenizer writes " =," as one token; the calculator's result must go between "=" and ","."""
    worked, plain = files
    tok = make_char_tokenizer(chars=string.ascii_letters + string.digits + " +-=,.?:", merged=(" =,",))
    assert tok.convert_tokens_to_ids(" =,") in tok(" 9 + 4 =, 13", add_special_tokens=False)["input_ids"]
    task = ArithmeticTask(ArithmeticOptions(train_file=str(plain), worked_file=str(worked), reward_shots=2, seed_rationales=2), tok)
    record = task.rationale_record(task.worked[1])
    assert tok.decode(record.generated_ids) == " 9 + 4 = 13, 13 - 8 = 5"
    assert all(t in task.allowed_ids for t, a in zip(record.generated_ids, record.is_action) if a)


def test_train_queries_are_worked_plus_plain_without_duplicates(task):
    queries = task.train_queries()
    assert [q.prompt for q in queries][:3] == [r["str_query"] for r in WORKED]
    assert len(queries) == 5 and queries[4].target == ". The answer is 4."


def policy_of(task, model):
    return make_policy(model, task.tokenizer, task.action_space(), task.tool())


def test_reward_is_conditioned_on_the_demonstrations(task):
    model = make_tiny_lm(seed=2, vocab_size=len(task.tokenizer))
    policy = policy_of(task, model)
    traj = Trajectories.from_records(task.seed_records(None, torch.Generator()), task.tokenizer.pad_token_id)
    with_demos = task.reward(policy)(traj)
    without = LMSuffixReward(policy)(traj)
    assert with_demos.shape == without.shape == (2, traj.horizon + 1)
    assert torch.isfinite(with_demos).all()
    assert not torch.allclose(with_demos, without, atol=1e-3)
    assert task.reward_context(model) is task.reward_context(model)  # computed once


def test_reward_likelihood_weight_scales_only_the_answers_likelihood(task):
    """R = p(Z | X) p(Y | X Z)^v: raising v to 3 adds twice the answer's log-likelihood to each prefix's reward."""
    model = make_tiny_lm(seed=2, vocab_size=len(task.tokenizer))
    traj = Trajectories.from_records(task.seed_records(None, torch.Generator()), task.tokenizer.pad_token_id)
    policy = policy_of(task, model)
    joint = task.reward(policy)(traj)
    task.options.reward_likelihood_weight = 3.0
    weighted = task.reward(policy)(traj)
    prior = lm_prefix_log_likelihoods(model, traj, context=task.reward_context(model))
    for b, n in enumerate(traj.lengths.tolist()):
        likelihood = (joint - prior)[b, : n + 1]
        torch.testing.assert_close(weighted[b, : n + 1], joint[b, : n + 1] + 2 * likelihood, atol=1e-4, rtol=1e-5)


def test_evaluate_votes_and_counts_unparsable_answers(task, tmp_path, caplog):
    model = make_tiny_lm(seed=3, vocab_size=len(task.tokenizer))
    result = task.evaluate(policy_of(task, model), tmp_path, "tiny")
    assert "evaluating on training questions" in caplog.text  # no test_file: said, not silent
    assert result["n_questions"] == 2 and result["eval_samples"] == 3
    predictions = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 2
    for p in predictions:
        assert len(p["rationales"]) == len(p["answers"]) == 3
        parsed = [a for a in p["answers"] if a is not None]
        assert p["unparsable"] == 3 - len(parsed)
        assert p["prediction"] == (max(parsed, key=parsed.count) if parsed else None)
    assert result["unparsable_answers"] == sum(p["unparsable"] for p in predictions)
    assert result["n_correct"] == sum(p["correct"] for p in predictions)
    assert sum(result["calculator_calls"].values()) == 2 * 3
    assert result["chain_accuracy"] == sum(p["chain_correct"] for p in predictions) / 2


def test_calls_histogram_counts_the_calls_per_rationale():
    rationales = [" 7 - 8 = -1", " 7 - 8 = -1, -1 + 7 = 6", " 1000", " 7 - 8 = -1, -1 + 7 = 6, 6 ="]
    assert calls_histogram(rationales) == {0: 1, 1: 1, 2: 1, 3: 1}
    assert list(calls_histogram([" 1 =", " 1", " 2 = 2"])) == [0, 1]  # sorted keys


def test_answer_completion_parses_the_first_integer(task, monkeypatch):
    model = make_tiny_lm(seed=4, vocab_size=len(task.tokenizer))
    answers = task.complete_answers(policy_of(task, model), ["Question: 1 + 1 = ? Answer: 1 + 1 = 2.", "Question: 1 + 1 = ? Answer: 1 + 1 = 2."])
    assert len(answers) == 2 and answers[0] == answers[1]  # greedy: the same prompt gets the same answer


def test_prompting_puts_shuffled_examples_in_a_shared_context(task):
    model = make_tiny_lm(seed=4, vocab_size=len(task.tokenizer))
    task.options.shots, task.options.cue = 2, "Think."
    assert task.policy_prompt(task.worked[0]) == task.worked[0].question + " Think."
    context = task.shots_context(model)
    assert context.text.count("The answer is") == 2
    texts = set()
    for seed in range(5):  # the examples are shuffled per seed
        task.options.shot_seed = seed
        texts.add(task.shots_context(model).text)
    assert context.text in texts and len(texts) > 1
    with pytest.raises(ValueError, match="base model"):
        task.shots_context(get_peft_model(model, LoraConfig(r=2, target_modules="all-linear")))


def test_evaluation_batches_shrink_to_the_token_budget(task):
    """Long k-shot contexts make each row's KV cache long: a batch takes fewer questions, never none."""
    model = make_tiny_lm(seed=4, vocab_size=len(task.tokenizer))
    task.options.shots, task.options.eval_samples, task.options.eval_batch_questions = 3, 2, 16
    problems = task.worked
    context = task.shots_context(model)
    prompt = max(len(task.tokenizer(task.policy_prompt(p))["input_ids"]) for p in problems)
    task.options.eval_batch_tokens = 2 * 2 * (len(context) + prompt + task.options.eval_max_len)  # room for 2 questions
    assert task.questions_per_batch(problems, context) == 2
    budget = task.options.eval_batch_tokens  # without the shots' context more fit
    assert task.questions_per_batch(problems, None) == min(16, budget // (2 * (prompt + task.options.eval_max_len))) > 2
    task.options.eval_batch_tokens = 1
    assert task.questions_per_batch(problems, context) == 1


def test_k_shot_evaluation_samples_after_the_shots_within_the_budget(task, tmp_path, monkeypatch):
    from gfnlm.policy import Policy

    calls = []

    def spy(policy, queries, temperature=1.0, generator=None, **kwargs):
        context = kwargs.get("context")
        calls.append((len(queries), context.text if context is not None else None, policy.tool is not None))
        return sample(policy, queries, temperature, generator, **kwargs)

    sample = Policy.sample
    monkeypatch.setattr(Policy, "sample", spy)
    model = make_tiny_lm(seed=3, vocab_size=len(task.tokenizer))
    task.options.shots, task.options.eval_batch_tokens = 2, 1
    result = task.evaluate(policy_of(task, model), tmp_path, "2-shot")
    rationale_calls = [c for c in calls if c[2]]  # the answer completions run without the calculator
    assert result["n_questions"] == 2 and len(rationale_calls) == 2  # one question per batch: the budget binds
    assert all(rows == task.options.eval_samples and text.count("The answer is") == 2 for rows, text, _ in rationale_calls)


def test_gfn_runs_get_table_e2_reward_tempering_unless_overridden():
    from gfnlm.cli import build_parser, resolve_settings

    args = build_parser().parse_args(["train", "--output-dir", "x", "--task", "arithmetic", "--method", "gfn"])
    train = resolve_settings(args, ["--reward_temp_horizon", "40"]).train
    assert (train.reward_temp_start, train.reward_temp_end, train.reward_temp_horizon) == (1.1, 0.5, 40)
    assert train.log_z_init == "estimate"
    sft = resolve_settings(build_parser().parse_args(["train", "--output-dir", "x", "--task", "arithmetic",
                                                      "--method", "sft"]), []).train
    assert (sft.reward_temp_start, sft.reward_temp_horizon) == (1.0, 0)


def test_cli_data_command_writes_disjoint_questions(tmp_path, files, capsys):
    worked, plain = files
    out = tmp_path / "test3.json"
    assert main(["data", "arithmetic", "--operands", "3", "--n", "50", "--seed", "2", "--out", str(out),
                 "--exclude", f"[{worked}, {plain}]"]) == 0
    rows = load_problems(out)
    assert len(rows) == 50
    assert not {p.question for p in rows} & {r["str_query"] for r in WORKED + PLAIN}
    assert "wrote 50 rows" in capsys.readouterr().out


def test_cli_eval_reports_a_bad_test_file(tmp_path, files, model_dir, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"str_query": "Question: 1 + 1 = ? Answer:", "num_sol": "x"}]))
    worked, plain = files
    code = main(["eval", "--task", "arithmetic", "--model", str(model_dir), "--test-file", str(bad),
                 "--worked-file", str(worked), "--train-file", str(plain), "--seed-rationales", "2", "--output-dir", str(tmp_path / "ev")])
    assert code == 2
    assert f"{bad}, row 0: num_sol must be an integer" in capsys.readouterr().err


@needs_cuda
def test_reward_and_policy_scores_agree_across_devices(task):
    """The same trajectories scored on the GPU and on the CPU: reward (with the cached demonstrations) and log P_F."""
    model = make_tiny_lm(seed=2, vocab_size=len(task.tokenizer))
    records = task.seed_records(None, torch.Generator())
    scores = {}
    for device in ("cpu", "cuda"):
        model.to(device)
        task = ArithmeticTask(task.options, task.tokenizer)  # a fresh reward context on this device
        traj = Trajectories.from_records(records, task.tokenizer.pad_token_id, device=device)
        with torch.no_grad():
            reward = task.reward(policy_of(task, model))
            scores[device] = [t.cpu() for t in (reward(traj), *score_policy(model, traj, task.action_space()))]
    for on_gpu, on_cpu in zip(scores["cuda"], scores["cpu"], strict=True):
        torch.testing.assert_close(on_gpu, on_cpu, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", ["gfn", "sft"])
def test_cli_trains_then_evaluates_on_the_test_file(tmp_path, files, model_dir, method, device):
    """Training with the calculator in the sampling loop, then the vote over rationales, on each device."""
    worked, plain = files
    run = tmp_path / "run"
    assert main(["train", "--task", "arithmetic", "--method", method, "--model", str(model_dir), "--output-dir", str(run),
                 "--worked-file", str(worked), "--train-file", str(plain), "--test-file", str(plain),
                 "--seed-rationales", "2", "--reward-shots", "2", "--max-len", "24", "--min-len", "2", "--eval-samples", "2",
                 "--eval-max-len", "6", "--answer-max-tokens", "3", "--steps", "2", "--queries-per-step", "2",
                 "--samples-per-query", "2", "--lora-rank", "2", "--progress", "false", "--device", device]) == 0
    result = json.loads((run / "eval.json").read_text())
    assert result["n_questions"] == 2 and result["train_steps"] == 2
    assert sum(result["calculator_calls"].values()) == 2 * 2
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert not any(step["skipped"] for step in steps)  # finite losses: SFT's worked rationales fit max_len
