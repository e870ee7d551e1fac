"""The benchmark's reference path computes the same loss as ours; the command prints its summary line."""

from __future__ import annotations

import json
import re
import string

import pytest
import torch
from conftest import make_char_tokenizer, make_tiny_lm
from test_arithmetic import PLAIN, WORKED
from gfnlm.bench import BenchSettings, PeakMemory, StepPaths, cpu_memory_mb, op_profile, rank_operators, run_bench
from gfnlm.config import TrainConfig
from gfnlm.rewards import TextReward
from gfnlm.tasks.arithmetic import ArithmeticOptions, ArithmeticTask, generate_problems
from gfnlm.gflownet import GFlowNetTrainer

CHARS = string.ascii_letters + string.digits + " +-=,.?:"


@pytest.fixture(autouse=True)
def _arithmetic_data_at_its_default_place(tmp_path, monkeypatch):
    """The task's default files (../shared/data/arithmetic/...), written small, relative to a fresh cwd."""
    data = tmp_path / "shared" / "data" / "arithmetic"
    data.mkdir(parents=True)
    worked = WORKED + generate_problems(3, 47, seed=0)  # 50 worked examples, as the real file has
    (data / "1digit_34_op+-_train_50.json").write_text(json.dumps(worked))
    (data / "1digit_34_op+-_hw.json").write_text(json.dumps(PLAIN))
    (tmp_path / "project").mkdir()
    monkeypatch.chdir(tmp_path / "project")


def _trainer(task, model, reward=None):
    config = TrainConfig(queries_per_step=2, samples_per_query=3, p_replay=0.0, p_tempered=0.0, lora_rank=4,
                         lora_alpha=8, progress=False, mixed_precision="no")  # the reference path runs in float32
    policy = task.policy(model, config)
    return GFlowNetTrainer(policy, reward or task.reward(policy), task.train_queries(), config)


def test_reference_and_fast_losses_agree_on_the_same_trajectories():
    tokenizer = make_char_tokenizer(chars=CHARS)
    task = ArithmeticTask(ArithmeticOptions(max_len=8, min_len=2, reward_shots=2), tokenizer)
    trainer = _trainer(task, make_tiny_lm(seed=1, vocab_size=len(tokenizer)))
    paths = StepPaths(trainer, trainer.queries[:2], samples=3, seed=0)
    fast, ref, seconds = paths.check_equal()
    assert fast == pytest.approx(ref, rel=1e-4)
    assert fast > 0 and seconds > 0
    # both steps update the policy
    before = [p.detach().clone() for p in trainer.model.parameters() if p.requires_grad]
    paths.reference_step()
    paths.fast_step()
    after = [p for p in trainer.model.parameters() if p.requires_grad]
    assert any(not torch.equal(a, b) for a, b in zip(before, after))


def test_reference_path_needs_a_suffix_reward():
    tokenizer = make_char_tokenizer(chars=CHARS)
    task = ArithmeticTask(ArithmeticOptions(max_len=6, min_len=1), tokenizer)
    reward = TextReward(lambda texts, queries: [0.0] * len(texts), tokenizer)
    trainer = _trainer(task, make_tiny_lm(vocab_size=len(tokenizer)), reward)
    with pytest.raises(ValueError, match="LMSuffixReward"):
        StepPaths(trainer, trainer.queries[:1], samples=2, seed=0)


def test_peak_memory_sees_a_temporary_allocation():
    memory = PeakMemory(torch.device("cpu"))
    with memory.measure():
        x = torch.ones(50_000_000)  # 200 MB
        del x
    assert memory.peak_mb > 150
    assert cpu_memory_mb() > 0


def test_operators_are_ranked_by_own_time_and_python_scopes_only_count_in_the_total():
    """Synthetic events, so that no machine load can reorder them: a Python scope with the most own time is
    not ranked (it is overhead between operators), but its time stays in the shares' denominator."""
    from types import SimpleNamespace

    events = [SimpleNamespace(key=k, self_cpu_time_total=t, count=c) for k, t, c in
              [("slow python scope", 600.0, 1), ("aten::mm", 300.0, 4), ("aten::add", 100.0, 9)]]
    ranked = rank_operators(events, top=5)
    assert [op["op"] for op in ranked] == ["aten::mm", "aten::add"]
    assert [op["share"] for op in ranked] == [0.3, 0.1] and ranked[0]["calls"] == 4
    assert ranked[0]["seconds"] == pytest.approx(3e-4)
    assert [op["op"] for op in rank_operators(events, top=1)] == ["aten::mm"]


def test_op_profile_ranks_the_aten_operators_of_a_real_call():
    a = torch.randn(256, 256)
    ranked = op_profile(lambda: (a @ a).sum(), torch.device("cpu"), top=3)
    assert "aten::mm" in [op["op"] for op in ranked] and all(op["op"].startswith("aten::") for op in ranked)
    assert all(0 < op["share"] <= 1 for op in ranked)


def test_bench_command_prints_a_parsable_summary(tmp_path):
    tokenizer = make_char_tokenizer(chars=CHARS)
    model_dir = tmp_path / "tiny"
    make_tiny_lm(vocab_size=len(tokenizer)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    lines: list[str] = []
    settings = BenchSettings(model=str(model_dir), queries=2, samples=2, max_len=6, warmup=0, repeats=1,
                             output=str(tmp_path / "bench.json"), lora_rank=4)
    result = run_bench(settings, echo=lines.append)
    match = re.fullmatch(r"step speedup vs reference: ([0-9.]+)x, peak memory ratio: ([0-9.]+|nan)", lines[-1])
    assert match, lines[-1]
    assert float(match.group(1)) == pytest.approx(result["speedup"], rel=0.05)
    assert (tmp_path / "bench.json").is_file()
    assert result["ours"]["step_flop"] > 0 and result["matmul_peak_gflops"] > 0


def test_fixed_length_bench_writes_exactly_max_len_actions_and_profiles_the_step(tmp_path):
    tokenizer = make_char_tokenizer(chars=CHARS)
    model_dir = tmp_path / "tiny"
    make_tiny_lm(vocab_size=len(tokenizer)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    settings = BenchSettings(model=str(model_dir), queries=1, samples=8, max_len=8, warmup=0, repeats=1,
                             reference_repeats=0, fixed_length=True, lora_rank=4, profile_ops=3)
    result = run_bench(settings, echo=lambda line: None)
    assert result["mean_actions"] == 8
    assert "reference" not in result and "loss_reference" not in result  # reference_repeats=0 skips the check too
    shares = [op["share"] for op in result["profile"]]
    assert len(shares) == 3 and shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 1
    assert all(op["op"].startswith("aten::") and op["calls"] >= 1 for op in result["profile"])


def test_static_cache_trainer_samples_the_arithmetic_tasks_trajectories_with_the_calculator():
    """TrainConfig.static_cache reaches the sampler (as bench --static_cache measures it) and changes
    nothing that is drawn, with the calculator inserting its results."""
    tokenizer = make_char_tokenizer(chars=CHARS)
    task = ArithmeticTask(ArithmeticOptions(max_len=12, min_len=4, reward_shots=2), tokenizer)
    drawn = []
    for static_cache in (False, True):
        config = TrainConfig(queries_per_step=2, samples_per_query=4, lora_rank=4, progress=False, seed=5,
                             static_cache=static_cache, mixed_precision="no")  # log-probs compared to 1e-5
        policy = task.policy(make_tiny_lm(seed=1, vocab_size=len(tokenizer)), config)
        trainer = GFlowNetTrainer(policy, task.reward(policy), task.train_queries(), config)
        drawn.append(trainer.sample([q for q in trainer.queries[:2] for _ in range(4)], 1.5))
    growing, static = drawn
    assert (~growing.is_action & growing.attention_mask.bool())[:, growing.prompt_len:].any(), "the calculator never ran"
    assert torch.equal(growing.input_ids, static.input_ids)
    torch.testing.assert_close(static.sampling_log_pf, growing.sampling_log_pf, atol=1e-5, rtol=1e-5)
