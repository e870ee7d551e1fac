"""The sentence-continuation task: the stop rule and action space, the reward, the metrics, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import make_char_tokenizer, make_policy, make_tiny_lm, save_tiny_model

from gfnlm.cli import main
from gfnlm.data import read_lines
from gfnlm.metrics import embedding_diversity
from gfnlm.reports.continuation import ContinuationReport, pareto_front
from gfnlm.rewards import LMStopReward
from gfnlm.sentence import allowed_tokens, banned_token
from gfnlm.tasks.continuation import ContinuationOptions, ContinuationTask
from gfnlm.trajectories import Query, TrajectoryRecord, Trajectories

LIGHT = "all-MiniLM-L6-v2"
PROMPTS = ["ab ba. ", "b a. ", "aa b. ", "ba ab. ", "a b a. "]  # the last two held out (train_prompts=3)


@pytest.fixture
def prompts_file(tmp_path) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text("".join(p + "\n" for p in PROMPTS))
    return path


@pytest.fixture
def tokenizer():
    return make_char_tokenizer("ab .")


def _task(tokenizer, prompts_file, **options) -> ContinuationTask:
    settings = dict(prompts_file=str(prompts_file), prompts_used=5, train_prompts=3, max_len=4, eval_samples=3,
                    encoder=LIGHT) | options
    return ContinuationTask(ContinuationOptions(**settings), tokenizer)


@pytest.mark.parametrize(("text", "banned"), [
    (".", False), (" the", False), (" A", False), (" I", False), ("-", False), ("Ñ", False), (" don't", False),
    (" .", True), (".com", True), ("..", True), ('."', True), ("\n", True), (" hi\n", True), ("!", True),
    ("?", True), (' "', True), ("“", True), ("http", True), (" www", True), ("--", True), ("==", True),
    (" Mr", True), ("Dr", True), (" US", True), (" B", True), ("Z", True), (" ", True), ("\ufffd", True),
])
def test_a_sentence_can_only_end_with_a_period(text, banned):
    assert banned_token(text) is banned


def test_the_action_space_has_the_period_as_its_only_stop(tokenizer, prompts_file):
    stops, allowed = allowed_tokens(tokenizer)
    ids = tokenizer.get_vocab()
    assert stops == (ids["."],)
    assert set(allowed) == {ids["a"], ids["b"]}  # " " alone is no word; <pad>, <s>, </s> are special
    task = _task(tokenizer, prompts_file)
    space = task.action_space()
    assert (space.stop_token_ids, space.max_len, space.min_len) == (stops, 4, 1)
    assert [q.prompt for q in task.train_queries()] == ["ab ba.", "b a.", "aa b."]  # trailing space stripped
    assert task.test_prompts() == ["ba ab.", "a b a."]


def test_the_reward_of_every_prefix_is_the_base_models_sentence_probability(tokenizer, prompts_file):
    """log R(s_i ⊤) = log p(z_1..z_i . | X) with the LM renormalised over the allowed tokens and the
    stop, checked against one forward pass per prefix."""
    model = make_tiny_lm(vocab_size=len(tokenizer), seed=5)
    task = _task(tokenizer, prompts_file)
    ids = tokenizer.get_vocab()
    query = Query("ab ba.")
    prompt = tokenizer(query.prompt)["input_ids"]
    z = [ids["a"], ids["b"], ids["b"]]
    batch = Trajectories.from_records([TrajectoryRecord(query, prompt, z, [True] * 3),
                                       TrajectoryRecord(query, prompt, z[:1], [True])], tokenizer.pad_token_id)
    log_r = task.reward(make_policy(model, tokenizer, task.action_space()))(batch)  # [2, 4]
    allowed = [ids["a"], ids["b"], ids["."]]
    for i in range(4):
        with torch.no_grad():
            logits = model(torch.tensor([prompt + z[:i]])).logits[0, len(prompt) - 1 :]  # predicts z_1 .. z_i, then "."
        log_p = logits[:, allowed].log_softmax(dim=-1)
        expected = sum(float(log_p[k, allowed.index(z[k])]) for k in range(i)) + float(log_p[i, 2])
        assert float(log_r[0, i]) == pytest.approx(expected, abs=1e-5)
    assert float(log_r[1, 1]) == pytest.approx(float(log_r[0, 1]), abs=1e-5)  # the same prefix in another row
    assert isinstance(task.reward(make_policy(model, tokenizer, task.action_space())), LMStopReward)


def test_diversity_is_zero_for_identical_samples_and_one_for_orthogonal_ones():
    assert embedding_diversity(torch.tensor([[1.0, 0.0], [1.0, 0.0]])) == pytest.approx(0.0)
    assert embedding_diversity(torch.eye(3)) == pytest.approx(1.0)
    third = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])  # cosines 0, 0.6, 0.8: mean 7/15
    assert embedding_diversity(third) == pytest.approx(1 - 1.4 / 3)
    with pytest.raises(ValueError, match="at least 2"):
        embedding_diversity(torch.ones(1, 4))


def test_prompt_metrics_of_hand_made_samples(tokenizer, prompts_file):
    model = make_tiny_lm(vocab_size=len(tokenizer), seed=5)
    task = _task(tokenizer, prompts_file)
    ids, query = tokenizer.get_vocab(), Query("ab ba.")
    prompt = tokenizer(query.prompt)["input_ids"]
    sentences = [[ids["a"]], [ids["a"]], [ids["b"], ids["a"], ids["b"], ids["b"]]]
    records = [TrajectoryRecord(query, prompt, z, [True] * len(z)) for z in sentences]
    reward = task.reward(make_policy(model, tokenizer, task.action_space()))
    metrics = task._prompt_metrics(reward, records)
    log_r = reward(Trajectories.from_records(records, tokenizer.pad_token_id))
    own = [float(log_r[0, 1]), float(log_r[1, 1]), float(log_r[2, 4])]
    assert metrics["max_log_likelihood"] == pytest.approx(max(own), abs=1e-5)
    assert metrics["mean_log_likelihood"] == pytest.approx(sum(own) / 3, abs=1e-5)
    assert metrics["mean_length"] == pytest.approx(2.0)
    assert metrics["ended_fraction"] == pytest.approx(2 / 3)  # the 4-token one had its stop forced
    assert metrics["distinct"] == 2
    assert [s["text"] for s in metrics["samples"]] == ["a.", "a.", "babb."]
    same = task._prompt_metrics(reward, records[:2])
    assert same["diversity"] == pytest.approx(0.0, abs=1e-6)


def test_bad_input_is_one_clear_error_each(tokenizer, prompts_file, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match="no lines"):
        _task(tokenizer, empty)
    with pytest.raises(ValueError, match="line 2: empty"):
        read_lines(_write(tmp_path / "gap.txt", "a.\n\nb.\n"))
    with pytest.raises(ValueError, match="eval_samples must be at least 2"):
        _task(tokenizer, prompts_file, eval_samples=1)
    with pytest.raises(ValueError, match="unknown decoding rule"):
        _task(tokenizer, prompts_file, decoding="top-p")
    with pytest.raises(ValueError, match="no prompts to evaluate"):
        _task(tokenizer, prompts_file, train_prompts=5)
    long = _write(tmp_path / "long.txt", "a" * 300 + ".\nb.\n")
    task = _task(tokenizer, long, prompts_used=2, train_prompts=1)
    with pytest.raises(ValueError, match="needs 307 positions; the model has 256"):
        task.prepare_base_model(make_tiny_lm(vocab_size=len(tokenizer)))


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.fixture
def model_dir(tmp_path, tokenizer) -> Path:
    return save_tiny_model(tmp_path / "tiny-model", tokenizer)


def test_cli_trains_a_gflownet_and_evaluates_it_and_a_baseline(model_dir, prompts_file, tmp_path, capsys):
    common = ["--task", "continuation", "--model", str(model_dir), "--prompts_file", str(prompts_file),
              "--prompts_used", "5", "--train_prompts", "3", "--max_len", "4", "--eval_samples", "3",
              "--encoder", LIGHT, "--device", "cpu"]
    run = tmp_path / "gfn"
    assert main(["train", "--method", "gfn", "--reward_temp", "0.5", "--steps", "2", "--queries_per_step", "2",
                 "--samples_per_query", "4", "--lora_rank", "4", "--progress", "false", "--output-dir", str(run),
                 *common]) == 0
    config = (run / "config.yaml").read_text()
    assert "reward_temp_end: 0.5" in config and "log_z_init: estimate" in config
    result = json.loads((run / "eval.json").read_text())
    assert result["label"] == "GFlowNet T=0.5" and result["decoding"] == "policy"
    for key in ("max_log_likelihood", "diversity", "mean_log_likelihood", "mean_length", "ended_fraction", "distinct",
                "forward_tokens_per_prompt", "seconds_per_prompt"):
        assert isinstance(result[key], float), key
    assert result["n_prompts"] == 2 and result["encoder"] == LIGHT
    assert (run / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    samples = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert [s["prompt"] for s in samples] == ["ba ab.", "a b a."] and all(len(s["continuations"]) == 3 for s in samples)

    beam = tmp_path / "beam"
    assert main(["eval", "--method", "diverse-beam", "--beam_factor", "2", "--output-dir", str(beam), *common]) == 0
    assert json.loads((beam / "eval.json").read_text())["label"] == "diverse-beam penalty=1 x2"
    table = ContinuationReport.results_tables()[""].build([run, beam])
    gfn_row, beam_row = [[cell.strip() for cell in line.strip("|").split("|")] for line in table.splitlines()[2:]]
    assert gfn_row[0] == "GFlowNet T=0.5" and gfn_row[-1].startswith("2 x 8 / ")  # 2 steps of 2 prompts x 4
    assert beam_row[0] == "diverse-beam penalty=1 x2" and beam_row[-1] == "-"
    assert main(["eval", "--method", "beam", "--adapter", str(run), "--output-dir", str(beam), *common]) == 2
    assert "evaluates the base model; drop --adapter" in capsys.readouterr().err
    assert main(["eval", "--method", "top-p", "--output-dir", str(beam), *common]) == 2
    assert "task 'continuation' has no method 'top-p'" in capsys.readouterr().err


def test_the_pareto_front_keeps_each_row_that_no_other_beats_on_both_axes():
    points = {"likely": (-9.8, 0.65), "diverse": (-30.0, 0.83), "between": (-12.4, 0.81), "beaten": (-13.4, 0.68),
              "tie": (-12.4, 0.81), "beaten on one axis only by a tie": (-12.4, 0.80)}
    results = [{"max_log_likelihood": ll, "diversity": d} for ll, d in points.values()]
    assert dict(zip(points, pareto_front(results))) == {
        "likely": True, "diverse": True, "between": True, "beaten": False, "tie": True,
        "beaten on one axis only by a tie": False}
