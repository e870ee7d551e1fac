"""Story infilling: the loader, the prompt, the story-order reward, the text metrics, every method's CLI."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from conftest import make_char_tokenizer, make_policy, make_tiny_lm, save_tiny_model

from gfnlm.cli import main
from gfnlm.metrics import BertScore, bleu4, gleu4, sacrebleu4
from gfnlm.reports.infilling import InfillingReport
from gfnlm.tasks.infilling import InfillingOptions, InfillingTask, Story, load_stories
from gfnlm.trajectories import TrajectoryRecord, Trajectories

FIELDS = ["storyid", *(f"sentence{i}" for i in range(1, 6))]
LIGHT = "all-MiniLM-L6-v2"


def _stories(n: int) -> list[list[str]]:
    words = ["ab", "ba", "aab", "bab", "abb"]
    return [[f"s{i}", *(f"{words[(i + j) % 5]} {words[(2 * i + j) % 5]} a." for j in range(5))] for i in range(n)]


def _write_csv(path: Path, rows: list[list[str]], fields: list[str] = FIELDS) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(fields)
        writer.writerows(rows)
    return path


def write_stories(path: Path) -> Path:
    return _write_csv(path, _stories(9))  # 2 validate, 3 train, 4 more for the story LM


@pytest.fixture
def stories_file(tmp_path) -> Path:
    return write_stories(tmp_path / "stories.csv")


def story_tokenizer():
    """Letters, and words with their leading space as one token each (as BPE vocabularies have them)."""
    return make_char_tokenizer("ab .", merged=(" aab", " bab", " abb", " ab", " ba", " a"))


@pytest.fixture
def tokenizer():
    return story_tokenizer()


def _task(tokenizer, stories_file, **options) -> InfillingTask:
    settings = dict(stories_file=str(stories_file), validation_stories=2, train_stories=3, min_len=1, max_len=8,
                    eval_samples=3, bertscore_model=LIGHT, bertscore_layer=4, bertscore_baseline_pairs=8) | options
    return InfillingTask(InfillingOptions(**settings), tokenizer)


def test_loader_reads_both_formats_and_names_bad_rows(tmp_path, stories_file):
    stories = load_stories(stories_file)
    assert len(stories) == 9 and stories[0].ending == _stories(1)[0][5]
    cloze = ["InputStoryid", *(f"InputSentence{i}" for i in range(1, 5)), "RandomFifthSentenceQuiz1",
             "RandomFifthSentenceQuiz2", "AnswerRightEnding"]
    good = _write_csv(tmp_path / "cloze.csv", [["x", "a.", "b.", "c.", "d.", "wrong.", "right.", "2"]], cloze)
    assert load_stories(good)[0] == Story(("a.", "b.", "c.", "d.", "right."))
    bad = _write_csv(tmp_path / "bad.csv", [["x", "a.", "b.", "c.", "d.", "e.", "f.", "3"]], cloze)
    with pytest.raises(ValueError, match=r"bad.csv, row 0: AnswerRightEnding must be 1 or 2"):
        load_stories(bad)
    gap = _write_csv(tmp_path / "gap.csv", [["x", "a.", "b.", "", "d.", "e."], ["y", "a.", "b.", "c.", "d.", "e."]])
    with pytest.raises(ValueError, match=r"gap.csv, row 0: missing or empty sentence3"):
        load_stories(gap)
    lines = tmp_path / "stories.jsonl"
    lines.write_text(json.dumps(dict(zip(FIELDS, _stories(1)[0]))) + "\n")
    assert load_stories(lines) == stories[:1]
    with pytest.raises(ValueError, match="does not exist"):
        load_stories(tmp_path / "none.csv")


def test_the_prompt_and_the_splits(tokenizer, stories_file):
    task = _task(tokenizer, stories_file)
    story = task.test[0]
    assert task.policy_prompt(story) == f"Beginning: {story.beginning}\n End: {story.ending}\n Middle:"
    assert [len(task.validation), len(task.train), len(task.story_lm_stories)] == [2, 3, 4]
    assert _task(tokenizer, stories_file, infill_prompt=False).policy_prompt(story) == story.beginning
    seeds = task.seed_records(None, None)
    assert [r.query.meta["reference"] for r in seeds] == [s.middle for s in task.train]
    assert tokenizer.decode(seeds[0].generated_ids) == " " + task.train[0].middle.removesuffix(".")
    with pytest.raises(ValueError, match="too few"):
        _task(tokenizer, stories_file, validation_stories=9)


def test_the_reward_of_every_prefix_is_the_story_read_in_order(tokenizer, stories_file):
    """log R(s_i ⊤) = log p(z_1..z_i . Y | X) under the base model, against one pass per prefix."""
    model = make_tiny_lm(vocab_size=len(tokenizer), seed=4)
    task = _task(tokenizer, stories_file)
    story = task.train[0]
    query = task.query(story)
    prompt = tokenizer(query.prompt)["input_ids"]
    z = tokenizer(" ab ba", add_special_tokens=False)["input_ids"]
    traj = Trajectories.from_records([TrajectoryRecord(query, prompt, z, [True] * len(z))], tokenizer.pad_token_id)
    policy = make_policy(model, tokenizer, task.action_space())
    log_r = task.reward(policy)(traj)  # [1, len(z) + 1]
    x = tokenizer(story.beginning)["input_ids"]
    for i in range(len(z) + 1):
        text_ids = x + z[:i] + tokenizer(f". {story.ending}", add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            log_p = model(torch.tensor([text_ids])).logits[0].log_softmax(-1)
        expected = sum(float(log_p[k - 1, text_ids[k]]) for k in range(len(x), len(text_ids)))
        assert float(log_r[0, i]) == pytest.approx(expected, abs=1e-4)
    assert float(task.reward(policy).terminal(traj)[0]) == pytest.approx(expected, abs=1e-4)  # buffer seeding


def test_bleu_gleu_and_bertscore_on_hand_made_pairs(stories_file, tokenizer):
    assert bleu4("He went home after the game.", "He went home after the game.") == pytest.approx(100.0)
    assert bleu4("He went home.", "He went home.") < 60  # no 4-grams in three words: method1 smooths their 0
    assert gleu4("He went home.", "He went home.") == pytest.approx(100.0)
    # "a b c d" against "a b c e": n-gram matches 3/4, 2/3, 1/2, 0/1; method1 puts 0.1 in the last numerator
    assert bleu4("a b c d", "a b c e") == pytest.approx(100 * (0.75 * (2 / 3) * 0.5 * 0.1) ** 0.25)
    assert gleu4("a b c d", "a b c e") == pytest.approx(60.0)  # 6 of the 10 n-grams of each side match
    assert sacrebleu4("He went home.", "He went home.") == pytest.approx(100.0)
    task = _task(tokenizer, stories_file)
    scorer = task.bertscore()
    assert scorer.backbone == LIGHT and scorer.layer == 4 and 0 < scorer.baseline < 1
    same, other = scorer.f1(["He walked the dog home.", "He walked the dog home."],
                            ["He walked the dog home.", "Interest rates rose in March."])
    assert same == pytest.approx(1.0, abs=1e-4) and other < 0.5
    with pytest.raises(ValueError, match="baseline_pairs"):
        BertScore(LIGHT, 4)


@pytest.fixture
def model_dir(tmp_path, tokenizer) -> Path:
    return save_tiny_model(tmp_path / "tiny-model", tokenizer)


def test_every_method_trains_or_evaluates_through_the_cli(model_dir, stories_file, tmp_path, capsys):
    common = ["--task", "infilling", "--model", str(model_dir), "--stories_file", str(stories_file),
              "--validation_stories", "2", "--train_stories", "3", "--min_len", "1", "--max_len", "8",
              "--eval_samples", "3", "--bertscore_model", LIGHT, "--bertscore_layer", "4",
              "--bertscore_baseline_pairs", "8", "--device", "cpu", "--progress", "false"]
    short = ["--steps", "2", "--queries_per_step", "2", "--lora_rank", "4"]
    story_lm = tmp_path / "story-lm"
    assert main(["train", "--method", "story-lm", "--output-dir", str(story_lm), *short, *common]) == 0
    with_lm = [*common, "--story_lm", str(story_lm)]
    assert main(["train", "--method", "gfn", "--samples_per_query", "4", "--output-dir", str(tmp_path / "gfn"),
                 *short, *with_lm]) == 0
    assert main(["train", "--method", "sft", "--output-dir", str(tmp_path / "sft"), *short, *with_lm]) == 0
    for method in ("prompting", "left-to-right"):
        assert main(["eval", "--method", method, "--output-dir", str(tmp_path / method), *with_lm]) == 0
    labels = {}
    for name in ("story-lm", "gfn", "sft", "prompting", "left-to-right"):
        result = json.loads((tmp_path / name / "eval.json").read_text())
        labels[name] = result["label"]
        for key in ("bertscore", "bleu4", "gleu4", "sacrebleu", "log_p_ending", "bertscore_std", "distinct",
                    "mean_words", "story_log_likelihood"):
            assert isinstance(result[key], (int, float)), (name, key)
        assert result["bertscore_model"] == LIGHT and result["bertscore_layer"] == 4 and result["n_stories"] == 2
        samples = [json.loads(line) for line in (tmp_path / name / "samples.jsonl").read_text().splitlines()]
        assert len(samples) == 2 and all(len(s["infills"]) == 3 and s["infills"][0].endswith(".") for s in samples)
    assert labels == {"story-lm": "story LM (prompting)", "gfn": "GFlowNet fine-tuning", "sft": "supervised fine-tuning",
                      "prompting": "prompting", "left-to-right": "left-to-right"}
    assert json.loads((tmp_path / "left-to-right" / "eval.json").read_text())["infill_prompt"] is False
    table = InfillingReport.results_tables()[""].build([tmp_path / "gfn", tmp_path / "prompting"])
    gfn_row, prompting_row = [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines()[2:]]
    assert gfn_row[0] == "GFlowNet fine-tuning" and gfn_row[-1].startswith("2 x 8 / ") and prompting_row[-1] == "-"
    gfn_config = (tmp_path / "gfn" / "config.yaml").read_text()
    assert "buffer_sampling: reward" in gfn_config and "reward_temp_end: 0.85" in gfn_config
    assert main(["train", "--method", "story-lm", "--output-dir", str(tmp_path / "again"), *short, *with_lm]) == 2
    assert "drop story_lm" in capsys.readouterr().err
