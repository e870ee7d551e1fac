"""Data-parallel training on two CPU processes (torchrun, gloo, the Accelerator's MULTI_CPU): the same step as one process
that accumulates both ranks' micro-batches, exact resume, the exactness test, and the failures."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gfnlm.config import ConfigError, TrainConfig, apply_settings
from gfnlm.distributed import make_accelerator
from gfnlm.policy import cpu_supports_bf16, resolve_precision
from gfnlm.runlog import TIMING_KEYS, read_logged_metrics

WORKER = Path(__file__).parent / "distributed_worker.py"
spec = importlib.util.spec_from_file_location("distributed_worker", WORKER)
worker = importlib.util.module_from_spec(spec)
spec.loader.exec_module(worker)


def launch(mode: str, out: Path, *args: str, processes: int = 2, timeout: float = 600) -> subprocess.CompletedProcess:
    """N processes of the worker on the CPU, one thread each, through torch.distributed's launcher (``torchrun``;
    ``accelerate launch --cpu`` starts one process unless MPI is installed): the Accelerator sees MULTI_CPU."""
    with socket.socket() as probe:  # a free port for the rendezvous
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port", port,
               str(WORKER), mode, str(out), *args]
    env = os.environ | {"OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "MASTER_ADDR": "127.0.0.1"}
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)


def test_two_processes_take_the_step_of_one_that_accumulates_both_micro_batches(tmp_path):
    done = launch("step", tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    reference = worker.make_trainer(grad_accum=2)
    batches = iter([worker.fixed_trajectories(reference, 0), worker.fixed_trajectories(reference, 1)])
    reference.draw_trajectories = lambda: next(batches)
    before = worker.trained_state(reference)
    reference.train()
    expected = worker.trained_state(reference)
    for state in ranks:
        assert state["params"].keys() == expected["params"].keys()
        for name, value in expected["params"].items():
            torch.testing.assert_close(state["params"][name], value, atol=1e-5, rtol=0, msg=name)
        torch.testing.assert_close(state["log_z"], expected["log_z"], atol=1e-5, rtol=0)
        assert state["ready"].tolist() == [True] * 4  # every query seen on some rank has its estimate everywhere
    for name in expected["params"]:
        assert torch.equal(ranks[0]["params"][name], ranks[1]["params"][name]), name  # the ranks agree exactly
    assert any(not torch.equal(before["params"][n], v) for n, v in expected["params"].items())  # the step did move


def _metrics(run: Path) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in read_logged_metrics(run)]


def test_two_process_kill_and_resume_gives_identical_metrics(tmp_path):
    for args in (("whole", "4"), ("part", "2"), ("part", "4")):  # "part" stops after 2 steps, then resumes
        done = launch("train", tmp_path / args[0], args[1])
        assert done.returncode == 0, done.stderr[-3000:]
    whole, part = _metrics(tmp_path / "whole"), _metrics(tmp_path / "part")
    assert len(whole) == 4 and part == whole
    ranks = [torch.load(tmp_path / "whole" / f"rank{r}.pt") for r in (0, 1)]  # sampling never unhooks DDP's averaging
    for name, value in ranks[0]["params"].items():
        assert torch.equal(value, ranks[1]["params"][name]), name
    state = torch.load(sorted((tmp_path / "part" / "checkpoints").glob("step-*"))[-1] / "trainer_state.pt")
    assert len(state["ranks"]) == 2 and state["ranks"][0]["buffer"] != state["ranks"][1]["buffer"]
    single = worker.make_trainer(tmp_path / "part", steps=6, samples_per_query=4, p_replay=0.3)
    with pytest.raises(ValueError, match="written by 2 processes; resume it with as many"):
        single.train(resume=True)


def test_two_processes_train_to_the_exact_target(tmp_path):
    done = launch("exact", tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert max(json.loads((tmp_path / "tv.json").read_text())["tv"]) <= 0.05


def test_a_crashed_rank_stops_the_others_with_an_error(tmp_path):
    started = time.monotonic()
    done = launch("crash", tmp_path, timeout=300)
    assert done.returncode != 0
    assert "rank 1 fails on purpose" in done.stderr
    assert time.monotonic() - started < 240  # dist_timeout_s is 20 s: nobody waits forever


def test_more_processes_than_queries_is_refused(tmp_path):
    done = launch("one-query", tmp_path)
    assert done.returncode != 0 and "2 processes need at least as many training queries, got 1" in done.stderr


def test_mixed_precision_is_refused_where_the_device_cannot_run_it():
    cpu = torch.device("cpu")
    with pytest.raises(ConfigError, match="fp16 needs a CUDA device"):
        resolve_precision("fp16", cpu)
    if cpu_supports_bf16():
        assert resolve_precision("bf16", cpu) == resolve_precision("auto", cpu) == "bf16"
    with pytest.raises(ConfigError, match=r"mixed_precision must be one of \['auto', 'no', 'bf16', 'fp16'\]"):
        apply_settings([TrainConfig()], {"mixed_precision": "fp8"})  # --mixed_precision fp8
    with pytest.raises(ConfigError, match="must be auto, no, bf16 or fp16, got 'fp8'"):
        resolve_precision("fp8", cpu)


def test_without_native_bf16_auto_is_float32_said_once_and_bf16_is_refused(monkeypatch, caplog):
    """No silent slow emulation: bf16 asked for on a CPU without AVX512-BF16 / AMX is one clear error, and auto
    falls back to float32 with one line in the log."""
    import gfnlm.policy

    monkeypatch.setattr(gfnlm.policy, "cpu_supports_bf16", lambda: False)
    monkeypatch.setattr(gfnlm.policy, "_said_auto", set())
    cpu = torch.device("cpu")
    with pytest.raises(ConfigError, match="this CPU has no native bfloat16"):
        resolve_precision("bf16", cpu)
    with caplog.at_level("INFO", logger="gfnlm"):
        assert resolve_precision("auto", cpu) == resolve_precision("auto", cpu) == "no"
    assert caplog.text.count("float32 on cpu, which has no native bfloat16") == 1


def test_the_launchers_precision_applies_unless_the_run_sets_its_own(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")  # what accelerate launch --mixed_precision fp16 sets
    with pytest.raises(ConfigError, match="fp16 needs a CUDA device"):
        resolve_precision("auto", cpu)
    assert resolve_precision("no", cpu) == "no"
    assert make_accelerator(TrainConfig(), cpu, "no").mixed_precision == "no"


@pytest.mark.parametrize("name", ["multi-gpu", "multi-node", "fsdp"])
def test_the_example_accelerate_configs_load(name):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(Path(__file__).parents[1] / "examples" / "accelerate" / f"{name}.yaml"))
    assert config.num_processes >= 2 and config.mixed_precision == "bf16"


def test_the_command_line_trains_on_two_processes_and_rank_0_alone_writes(tmp_path):
    from conftest import make_char_tokenizer, save_tiny_model

    model_dir = save_tiny_model(tmp_path / "tiny", make_char_tokenizer("ab ."))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("ab ba.\nb a.\naa b.\nba ab.\na b a.\n")
    run = tmp_path / "run"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
               "-m", "gfnlm", "train", "--task", "continuation", "--model", str(model_dir), "--prompts_file",
               str(prompts), "--prompts_used", "5", "--train_prompts", "3", "--max_len", "4", "--eval_samples", "2",
               "--encoder", "all-MiniLM-L6-v2", "--device", "cpu", "--steps", "3", "--queries_per_step", "2",
               "--samples_per_query", "2", "--lora_rank", "4", "--progress", "false", "--output-dir", str(run)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600,
                          env=os.environ | {"OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"})
    assert done.returncode == 0, done.stderr[-3000:]
    rows = read_logged_metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3]  # one line a step: rank 0's, with both ranks' samples
    assert all(r["samples_per_s"] > 0 for r in rows)
    assert done.stdout.count("max_log_likelihood") == 1  # evaluated and printed once
    assert json.loads((run / "eval.json").read_text())["train_steps"] == 3


def test_metrics_reduce_over_ranks():
    from gfnlm.distributed import reduce_metrics

    rows = [{"step": 3, "loss": 1.0, "log_reward_max": -2.0, "buffer_size": 10, "skipped": False, "samples_per_s": 1.0},
            {"step": 3, "loss": 3.0, "log_reward_max": -1.0, "buffer_size": 12, "skipped": True, "samples_per_s": 9.0}]
    out = reduce_metrics(rows, samples=[32, 32], seconds=[2.0, 4.0])
    assert out["step"] == 3 and isinstance(out["step"], int)  # shared by every rank: kept as it is
    assert (out["loss"], out["log_reward_max"], out["buffer_size"], out["skipped"]) == (2.0, -1.0, 22, True)
    assert (out["samples_per_s"], out["step_time_s"]) == (16.0, 4.0)  # 64 samples over the slowest rank's 4 s
