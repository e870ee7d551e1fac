"""The command line end to end on a tiny model saved to disk, and its errors for bad input."""

import dataclasses
import json

import pytest
import yaml
from conftest import DEVICES, make_char_tokenizer, make_tiny_lm

from gfnlm.cli import build_parser, main
from gfnlm.config import ConfigError, TrainConfig, apply_settings, parse_key_values, parse_overrides

TINY_RUN = ["--task", "random-number", "--prompt", "1+2", "--high", "20", "--max_len", "3", "--steps", "3",
            "--samples_per_query", "4", "--lora_rank", "2", "--eval_samples", "50", "--save_every", "2",
            "--progress", "false", "--device", "cpu"]


@pytest.fixture
def tiny_model_dir(tmp_path):
    folder = tmp_path / "tiny"
    make_tiny_lm().save_pretrained(folder)
    make_char_tokenizer().save_pretrained(folder)
    return folder


@pytest.mark.parametrize("device", DEVICES)
def test_train_eval_and_resume(tiny_model_dir, tmp_path, capsys, device):
    run = tmp_path / "run"
    assert main(["train", "--model", str(tiny_model_dir), "--output-dir", str(run), *TINY_RUN, "--device", device]) == 0
    for name in ("config.yaml", "metrics.jsonl", "eval.json", "histogram.png"):
        assert (run / name).is_file(), name
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["steps"] == 3 and saved["prompt"] == "1+2" and saved["method"] == "gfn" and saved["device"] == device
    result = json.loads((run / "eval.json").read_text())
    assert set(result) >= {"valid_mass", "kl", "tv", "js", "train_steps"} and result["train_steps"] == 3
    assert "valid_mass" in capsys.readouterr().out

    # resume to more steps: settings come from the run's config.yaml, overrides on top
    assert main(["train", "--output-dir", str(run), "--resume", "--steps", "5"]) == 0
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]

    # evaluate the trained adapter into another folder
    out = tmp_path / "eval"
    assert main(["eval", "--adapter", str(run), "--output-dir", str(out), "--eval_samples", "20"]) == 0
    assert json.loads((out / "eval.json").read_text())["label"] == "gfn"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", ["sft", "ppo"])
def test_baseline_methods_run(tiny_model_dir, tmp_path, method, device):
    run = tmp_path / method
    assert main(["train", "--method", method, "--model", str(tiny_model_dir), "--output-dir", str(run), *TINY_RUN,
                 "--device", device]) == 0
    assert json.loads((run / "eval.json").read_text())["label"] == method


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--stepz", "3"], "unknown config key 'stepz'; did you mean steps"),
        (["--steps", "many"], "steps: expected int"),
        (["--max_len", "0"], "max_len must be at least 1"),
        (["--pf_temp_min", "0"], "pf_temp_min must be positive"),
        (["--target", "zipf"], "target must be one of"),
    ],
)
def test_bad_settings_get_one_clear_error(tiny_model_dir, tmp_path, capsys, argv, message):
    code = main(["train", "--model", str(tiny_model_dir), "--output-dir", str(tmp_path / "r"), *TINY_RUN, *argv])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err


def test_missing_model_is_named(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = main(["eval", "--model", str(tmp_path / "nowhere"), "--eval_samples", "1"])
    err = capsys.readouterr().err
    assert code == 1 and "nowhere" in err and "smollm2-135m" in err
    assert not (tmp_path / "eval").exists()  # a failed eval leaves no empty output folder behind


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("steps: 7\nlr: 0.01\nlora_target_modules: [q_proj, v_proj]\n")
    args = build_parser().parse_args(["train", "--output-dir", "x", "--config", str(path)])
    from gfnlm.cli import resolve_settings

    run = resolve_settings(args, ["--lr", "0.5", "--loss=tb"])
    assert (run.train.steps, run.train.lr, run.train.loss) == (7, 0.5, "tb")
    assert run.train.lora_target_modules == ["q_proj", "v_proj"]
    with pytest.raises(ConfigError, match="needs a value"):
        parse_overrides(["--lr"])
    assert parse_key_values(["lr=1e-3", "p-replay=0.5"]) == {"lr": "1e-3", "p_replay": "0.5"}
    with pytest.raises(ConfigError, match=r"KEY=VALUE, got \['lr'\]"):
        parse_key_values(["lr"])
    config = TrainConfig()
    apply_settings([config], {"progress": "no", "lora_target_modules": "all-linear"})
    assert config.progress is False and config.lora_target_modules == "all-linear"


@pytest.mark.parametrize("name", ["loss", "lr_decay", "log_z_init", "buffer_sampling"])
def test_config_built_in_code_is_checked_against_its_declared_choices(name):
    config = dataclasses.replace(TrainConfig(), **{name: "nonsense"})  # bypasses the command line's coercion
    with pytest.raises(ConfigError, match=f"{name} must be one of"):
        config.validate()
    TrainConfig().validate()


@pytest.mark.parametrize("task", ["random-number", "arithmetic", "subjectivity"])
def test_every_key_has_one_owner_and_seed_reaches_training(task):
    """A key declared twice would silently set only one config (a task's own `seed` once shadowed training's)."""
    from gfnlm.cli import resolve_settings

    args = build_parser().parse_args(["train", "--output-dir", "x", "--task", task])
    run = resolve_settings(args, ["--seed", "7"])
    assert run.train.seed == 7


def test_a_key_declared_twice_is_an_error():
    from dataclasses import dataclass

    @dataclass
    class Clash:
        seed: int = 0

    with pytest.raises(ConfigError, match="both declare 'seed'"):
        apply_settings([TrainConfig(), Clash()], {})


def test_prompting_is_a_method_of_eval_only(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("method: prompting\ntask: subjectivity\n")
    assert main(["train", "--output-dir", str(tmp_path / "r"), "--config", str(config)]) == 2
    assert "task 'subjectivity' has no method 'prompting'; methods: gfn, sft, ppo, grpo, em" in capsys.readouterr().err
    assert main(["eval", "--task", "random-number", "--method", "prompting"]) == 2  # no such baseline there
    assert "task 'random-number' has no method 'prompting'; methods: gfn, sft, ppo, grpo" in capsys.readouterr().err


def test_help_documents_every_setting(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert "--subtb_lambda: Weight lambda^(j-i-1)" in out and "--invalid_log_reward" in out
