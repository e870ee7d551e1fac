"""Results tables: the docs' tables come from run folders, grouped and averaged right, and the
README's table from the docs' generated tables."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from gfnlm.reports import arithmetic, subjectivity
from gfnlm.reports.infilling import metrics_table
from gfnlm.reports import tables as report

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "results_table.py"


def write_eval(folder: Path, **result) -> None:
    folder.mkdir(parents=True)
    (folder / "eval.json").write_text(json.dumps(result))


def rows(markdown: str) -> dict[str, list[str]]:
    """Table body as {first cell: other cells}."""
    body = [line.strip("| ").split(" | ") for line in markdown.splitlines()[2:]]
    return {cells[0]: cells[1:] for cells in body}


def test_subjectivity_table_averages_seeds_and_keeps_the_ablation_rows(tmp_path):
    write_eval(tmp_path / "zero-shot", accuracy=0.61, n_reviews=100)
    write_eval(tmp_path / "n10" / "gfn-seed0", accuracy=0.70, n_reviews=100, train_steps=60)
    write_eval(tmp_path / "n10" / "gfn-seed1", accuracy=0.60, n_reviews=100, train_steps=60)
    write_eval(tmp_path / "n20" / "gfn-seed0", accuracy=0.80, n_reviews=100, train_steps=60)
    write_eval(tmp_path / "n10" / "gfn-noseed-seed0", accuracy=0.55, n_reviews=100, train_steps=60)
    write_eval(tmp_path / "n10" / "gfn-noseed-noagg-seed0", accuracy=0.52, n_reviews=100)
    write_eval(tmp_path / "n10" / "unknown-seed0", accuracy=0.99, n_reviews=100)

    table = rows(subjectivity.accuracy_table(tmp_path))

    assert list(table) == ["zero-shot prompting", "GFlowNet fine-tuning", "GFlowNet, (-) seed buffer",
                           "GFlowNet, (-) seed buffer (-) aggregating"]
    assert table["zero-shot prompting"][:3] == ["61.0", "61.0", "1"]  # no training: same figure per column
    assert table["GFlowNet fine-tuning"][:4] == ["65.0 ± 7.1", "80.0", "2 / 1", "60"]  # seeds per column
    assert table["GFlowNet, (-) seed buffer"][:3] == ["55.0", "-", "1"]
    assert table["GFlowNet, (-) seed buffer (-) aggregating"][:2] == ["52.0", "-"]


def test_subjectivity_rows_are_named_by_any_learning_rate(tmp_path):
    for name, accuracy in (("sft-lr1e-4", 0.8), ("sft-lr5e-4", 0.7), ("sft-lr1e-3", 0.6), ("em-lr2e-4", 0.5),
                           ("sft-lrfast", 0.9)):
        write_eval(tmp_path / "n10" / f"{name}-seed0", accuracy=accuracy, n_reviews=100, train_steps=50)

    table = rows(subjectivity.accuracy_table(tmp_path))

    assert list(table) == ["supervised fine-tuning, lr 1e-3", "supervised fine-tuning, lr 5e-4",
                           "supervised fine-tuning, lr 1e-4", "GFlowNet + M-step (EM), lr 2e-4"]  # "lrfast": not a rate
    assert table["supervised fine-tuning, lr 5e-4"][0] == "70.0"


def test_subjectivity_table_can_rank_by_roc_auc(tmp_path):
    def write_run(folder, log_odds_by_label):
        write_eval(folder, accuracy=0.5, n_reviews=4)
        predictions = [{"label": y, "log_odds": [v]} for y, values in enumerate(log_odds_by_label) for v in values]
        (folder / "predictions.jsonl").write_text("".join(json.dumps(p) + "\n" for p in predictions))

    write_run(tmp_path / "n10" / "sft-lr1e-4-seed0", ([-3.0, -2.0], [-1.0, -0.5]))  # all below 0, ranked right
    write_run(tmp_path / "n10" / "sft-lr1e-4-seed1", ([-1.0, 2.0], [1.0, 1.0]))  # subjective above one of two

    table = rows(subjectivity.accuracy_table(tmp_path, metric="auc"))

    assert table["supervised fine-tuning, lr 1e-4"][0] == "75.0 ± 35.4"  # AUC 1 and 0.5


def test_subjectivity_log_odds_table_splits_the_mean_by_true_label_and_ranks_the_reviews(tmp_path):
    run = tmp_path / "em-seed0"
    run.mkdir()
    predictions = [{"label": 0, "prediction": 0, "correct": True, "log_odds": [-3.0, -1.0]},
                   {"label": 0, "prediction": 1, "correct": False, "log_odds": [1.0, 1.0]},
                   {"label": 1, "prediction": 0, "correct": False, "log_odds": [-0.5, -1.5]},
                   {"label": 1, "prediction": 1, "correct": True, "log_odds": [2.0]}]
    (run / "predictions.jsonl").write_text("".join(json.dumps(p) + "\n" for p in predictions))

    table = rows(subjectivity.log_odds_table([run]))

    # objective reviews: means -2 and 1; subjective: -1 and 2, above -2 twice and above 1 once, so AUC 3/4
    assert table[str(run)] == ["2 / 4", "2", "-0.50", "0.50", "0.75"]


def test_arithmetic_table_names_methods_and_seed_counts(tmp_path):
    for seed, accuracy in ((0, 0.9), (1, 0.7)):
        write_eval(tmp_path / f"gfn-seed{seed}" / "eval-3ops", method="gfn", operands=3, accuracy=accuracy,
                   train_steps=26, samples_per_step=64, train_minutes=29.1)
    write_eval(tmp_path / "gfn-seeds10" / "eval-3ops", method="gfn", operands=3, accuracy=0.4, seed_rationales=10)
    write_eval(tmp_path / "gfn-worked-seed0" / "eval-3ops", method="gfn", operands=3, accuracy=0.5,
               settings={"p_replay": "0.5", "train_file": "../data/train_50.json"})
    write_eval(tmp_path / "gfn-worked-seeds0" / "eval-3ops", method="gfn", operands=3, accuracy=0.3,
               seed_rationales=0, settings={"p_replay": "0.5"})
    write_eval(tmp_path / "prompting-0" / "eval-3ops", method="prompting", operands=3, accuracy=0.1, shots=0,
               chain_accuracy=0.25)
    write_eval(tmp_path / "prompting-0" / "eval-5ops", method="prompting", operands=5, accuracy=0.0, shots=0)

    table = rows(arithmetic.accuracy_table(tmp_path))

    # columns: accuracy at 3 and 5 operands, then the chains' own accuracy at 3 and 5 operands
    assert table["GFlowNet fine-tuning"][:5] == ["80.0 ± 14.1", "-", "-", "-", "2"]
    assert table["GFlowNet fine-tuning"][5] == "26 x 64 / 29.1 min; 26 x 64 / 29.1 min"
    assert table["GFlowNet fine-tuning, 10 seed rationales"][:2] == ["40.0", "-"]
    assert table["GFlowNet fine-tuning (p_replay=0.5), 0 seed rationales"][:2] == ["30.0", "-"]
    assert table["GFlowNet fine-tuning (p_replay=0.5, train_file=train_50.json)"][:2] == ["50.0", "-"]
    assert table["0-shot prompting (step by step)"][:4] == ["10.0", "0.0", "25.0", "-"]


def test_replace_section_rewrites_only_its_block_and_refuses_a_missing_one(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- results:a -->\nold\n<!-- /results:a -->\noutro\n")
    report.replace_section(readme, "a", "new")
    assert readme.read_text() == "intro\n<!-- results:a -->\nnew\n<!-- /results:a -->\noutro\n"
    with pytest.raises(SystemExit, match="no <!-- results:b -->"):
        report.replace_section(readme, "b", "x")


def test_arithmetic_curves_order_steps_per_run_and_draw_a_figure(tmp_path):
    runs = [tmp_path / "gfn-seed0", tmp_path / "gfn-prior-seed0"]
    for run, scale in zip(runs, (1.0, 2.0)):
        for step, accuracy in ((50, 0.25), (25, 0.125)):
            for operands in (3, 5):
                write_eval(run / "curve" / f"step-{step}" / f"eval-{operands}ops", operands=operands, train_steps=step,
                           accuracy=scale * accuracy / (operands - 2),
                           chain_accuracy=scale * accuracy if operands == 3 else None)

    curves = {run.name: arithmetic.learning_curve(run) for run in runs}
    lines = arithmetic.curve_table(curves).splitlines()[2:]
    table = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]

    assert [row[:2] for row in table] == [["gfn-seed0", "25"], ["gfn-seed0", "50"],
                                          ["gfn-prior-seed0", "25"], ["gfn-prior-seed0", "50"]]
    assert table[1][2:] == ["25", "8", "25", "-"]  # accuracy at 3 and 5 operands, then the chains'
    assert table[3][2:] == ["50", "17", "50", "-"]
    figure = arithmetic.draw_curves(curves, tmp_path / "curve.png")
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit, match="--curve"):
        arithmetic.learning_curve(tmp_path / "empty")


def _run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True)


def test_the_script_writes_a_tasks_default_table_into_a_page(tmp_path):
    for name, kl in (("base", 0.9), ("gfn", 0.001)):
        write_eval(tmp_path / name, label=name, valid_mass=0.5, kl=kl, tv=0.1, js=0.01)
    (tmp_path / "gfn" / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "step_time_s": 30.0}) + "\n"
                                                            for s in (1, 2)))
    page = tmp_path / "page.md"
    page.write_text("# page\n<!-- results:rn -->\nold\n<!-- /results:rn -->\n")

    done = _run_script("random-number", str(tmp_path / "base"), str(tmp_path / "gfn"), "--doc", str(page),
                       "--section", "rn")

    assert done.returncode == 0, done.stderr
    table = {row["model"]: row for row in report.read_section_table(page, "rn")}
    assert page.read_text().startswith("# page\n") and "old" not in page.read_text()
    assert list(table["base"].values()) == ["base", "0.5", "0.9", "0.1", "0.01", "-", "-"]
    assert list(table["gfn"].values()) == ["gfn", "0.5", "0.001", "0.1", "0.01", "2", "1.0"]  # 2 steps of 30 s


def test_the_script_names_a_tasks_tables_when_one_is_unknown():
    done = _run_script("arithmetic:nope")
    assert done.returncode != 0
    assert "arithmetic:curve" in done.stderr


def _page_with_table(path: Path, section: str, header: list[str], body: list[list[str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"text\n<!-- results:{section} -->\n{report.markdown_table(header, body)}\n<!-- /results:{section} -->\n")


def test_summary_picks_the_headline_rows_of_the_generated_tables(tmp_path):
    _page_with_table(tmp_path / "experiments" / "toy.md", "toy", ["method", "a", "b", "training"],
                     [["GFlowNet", "1.0", "2.0", "10 x 8 / 3 min; 11 x 8 / 3 min"], ["SFT", "0.5", "0.6", "-"],
                     ["GFlowNet", "9.0", "9.0", "99 x 8"]])
    headline = report.Headline(
        experiment="Toy (§9)", page="toy.md", metric="score", columns=("a", "b"),
        gfn=report.Pick("toy", {"method": "GFlowNet", "b": "2.0"}), baseline=report.Pick("toy", {"method": "SFT"}),
        baseline_name="SFT", paper="3 / 4", setting="tiny", budget="{training}")

    table = rows(report.summary_table([headline], tmp_path))

    assert table["[Toy (§9)](docs/experiments/toy.md)"] == ["score", "1.0 / 2.0", "SFT: 0.5 / 0.6", "3 / 4",
                                                             "tiny; 10 x 8 / 3 min"]
    ambiguous = report.Headline(**{**headline.__dict__, "gfn": report.Pick("toy", {"method": "GFlowNet"})})
    with pytest.raises(SystemExit, match="2 rows match"):
        report.summary_table([ambiguous], tmp_path)


def test_every_tasks_headline_is_found_in_the_committed_docs():
    from gfnlm.reports import REPORTS

    headlines = [r.headline for r in REPORTS.values() if r.headline is not None]
    assert len(headlines) >= 3
    table = rows(report.summary_table(headlines, SCRIPT.parents[1] / "docs"))
    assert len(table) == len(headlines)
    assert all(cells[1] and "-" not in cells[1].split(" / ") for cells in table.values())


def test_a_pipe_inside_a_cell_survives_the_round_trip(tmp_path):
    _page_with_table(tmp_path / "p.md", "s", ["reward", "value"], [["p(Z | X)", "1"]])
    assert "p(Z \\| X)" in (tmp_path / "p.md").read_text()
    assert report.read_section_table(tmp_path / "p.md", "s") == [{"reward": "p(Z | X)", "value": "1"}]


def test_infilling_table_averages_a_methods_seeds_and_keeps_one_runs_draws(tmp_path):
    def infilling_eval(folder: Path, label: str, bertscore: float, draws_std: float, stories: int = 50) -> Path:
        metrics = {key: bertscore for key in ("bertscore", "bleu4", "gleu4", "sacrebleu", "log_p_ending")}
        write_eval(folder, label=label, **metrics, **{f"{key}_std": draws_std for key in metrics}, distinct=9.0,
                   eval_samples=10, mean_words=8.0, n_stories=stories)
        return folder

    runs = [infilling_eval(tmp_path / "gfn-seed0", "GFlowNet fine-tuning", 0.10, 0.5),
            infilling_eval(tmp_path / "prompting", "prompting", 0.05, 0.25),
            infilling_eval(tmp_path / "gfn-seed1", "GFlowNet fine-tuning", 0.14, 0.5)]

    table = rows(metrics_table(runs))

    assert list(table) == ["GFlowNet fine-tuning", "prompting"]  # one row per method, in order of appearance
    assert table["GFlowNet fine-tuning"][0] == "0.120 ± 0.028"  # mean and std over the two seeds, not the draws
    assert table["GFlowNet fine-tuning"][-2:] == ["2", "-"]  # seeds; no metrics.jsonl: no training budget
    assert table["prompting"][0] == "0.050 ± 0.250" and table["prompting"][-2] == "1"  # one run: its draws' std
    other = infilling_eval(tmp_path / "gfn-100-stories", "GFlowNet fine-tuning", 0.2, 0.5, stories=100)
    with pytest.raises(SystemExit, match="different evaluations"):
        metrics_table([*runs, other])
