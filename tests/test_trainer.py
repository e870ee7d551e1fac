"""Trainer mechanics: exact resume, gradient accumulation, NaN handling, batch composition."""

import itertools
import json

import pytest
import torch
from conftest import make_tiny_lm
from test_exactness import ALLOWED, QUERY, STOP, TableReward

from gfnlm.config import TrainConfig
from gfnlm.modes import eval_mode
from gfnlm.policy import Policy
from gfnlm.rewards import RewardError
from gfnlm.scoring import score_policy, terminal_log_prob
from gfnlm.gflownet import GFlowNetTrainer
from gfnlm.runlog import TIMING_KEYS, logged_training_minutes, read_logged_metrics
from gfnlm.trainer import TrainingDiverged
from gfnlm.trajectories import ActionSpace, Query, TrajectoryRecord, Trajectories

SPACE = ActionSpace(stop_token_ids=(STOP,), max_len=3, allowed_token_ids=ALLOWED)
QUERIES = [QUERY, Query("8"), Query("9+1")]


def make_trainer(tokenizer, output_dir=None, reward=None, **overrides):
    settings = dict(steps=6, queries_per_step=2, samples_per_query=4, lr=1e-3, lora_rank=4, lora_dropout=0.1,
                    save_every=2, device="cpu", progress=False, p_replay=0.3, p_tempered=0.4)
    settings.update(overrides)
    config = TrainConfig(**settings)
    policy = Policy.from_config(make_tiny_lm(), tokenizer, SPACE, config)  # the default precision unless overridden
    return GFlowNetTrainer(policy, reward or TableReward(0), QUERIES, config, output_dir=output_dir)


def read_metrics(path):
    return [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in read_logged_metrics(path)]


def record_sampling_temperatures(trainer, monkeypatch) -> list:
    """Each call to ``trainer.sample_records`` appends its per-sample temperatures to the returned list."""
    temperatures = []
    sample = trainer.sample_records
    monkeypatch.setattr(trainer, "sample_records", lambda qs, t: temperatures.append(t) or sample(qs, t))
    return temperatures


@pytest.mark.parametrize("loss", ["subtb", "tb"])  # tb learns log Z: its per-query first-visit state is saved too
def test_kill_and_resume_gives_identical_metrics(tokenizer, tmp_path, loss):
    whole = make_trainer(tokenizer, tmp_path / "whole", loss=loss, log_z_init="estimate")
    whole.train()
    # "killed" after step 4: a run configured for 6 steps that stops at 4, then a fresh process resumes
    part = make_trainer(tokenizer, tmp_path / "part", steps=4, loss=loss, log_z_init="estimate")
    part.train()
    with open(tmp_path / "part" / "metrics.jsonl", "a") as f:  # a line logged after the last checkpoint
        f.write(json.dumps({"step": 5, "loss": -1.0}) + "\n")
    resumed = make_trainer(tokenizer, tmp_path / "part", loss=loss, log_z_init="estimate")
    resumed.train(resume=True)
    assert resumed.step == 6
    assert read_metrics(tmp_path / "part") == read_metrics(tmp_path / "whole")
    assert len(read_metrics(tmp_path / "whole")) == 6
    # LoRA weights end identical, and the adapter is saved in peft format
    for (n, a), (_, b) in zip(whole.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.equal(a, b), n
    assert (resumed.latest_checkpoint() / "adapter" / "adapter_config.json").is_file()
    assert len(list((tmp_path / "part" / "checkpoints").glob("step-*"))) == 2  # keep_checkpoints


def draw(trainer: GFlowNetTrainer):
    """One rewarded micro-batch, as a step draws it."""
    return trainer.reward_batch(*trainer.draw_trajectories())


def test_log_z_starts_at_each_querys_first_estimate(tokenizer):
    trainer = make_trainer(tokenizer, loss="tb", log_z_init="estimate")
    index = torch.tensor([2, 0, 2])
    log_pf = torch.tensor([[-1.0, -2.0], [-0.5, 0.0], [-3.0, 0.0]])  # [B, T]
    log_pterm = torch.tensor([[-9.0, -9.0, -0.5], [-9.0, -0.25, -9.0], [-9.0, -1.0, -9.0]])  # [B, T+1]
    lengths = torch.tensor([2, 1, 1])
    log_r = torch.tensor([[0.0, 0.0, -10.0], [0.0, -4.0, 0.0], [0.0, -6.0, 0.0]])  # terminal at lengths
    log_r_end = log_r.gather(1, lengths[:, None]).squeeze(1)
    log_q = terminal_log_prob(log_pf, log_pterm, lengths)
    trainer.initialise_log_z(index, log_r_end, log_q)
    # query 2: mean(-10 - (-3.5), -6 - (-4)) = -4.25; query 0: -4 - (-0.75) = -3.25; query 1 unseen
    torch.testing.assert_close(trainer.log_z.as_tensor(), torch.tensor([-3.25, 0.0, -4.25]))
    assert trainer.log_z_ready.tolist() == [True, False, True]
    trainer.initialise_log_z(index, log_r_end - 5, log_q)  # seen queries keep their value
    torch.testing.assert_close(trainer.log_z.as_tensor(), torch.tensor([-3.25, 0.0, -4.25]))


@pytest.mark.parametrize("log_z_init", ["estimate", "zero"])
def test_log_z_is_estimated_from_on_policy_samples_only(tokenizer, monkeypatch, log_z_init):
    """Replayed seeds (the policy finds them unlikely, the reward likely) would put log Z far too high."""
    trainer = make_trainer(tokenizer, loss="tb", log_z_init=log_z_init, p_replay=1.0, p_tempered=0.0,
                           queries_per_step=3)
    trainer.seed_buffer([TrajectoryRecord(q, [1, 10], [3, 4], [True, True]) for q in QUERIES])
    temperatures = record_sampling_temperatures(trainer, monkeypatch)
    first = draw(trainer)
    if log_z_init == "zero":  # log Z is learned from 0: nothing to estimate, replay from the start
        assert not first.fresh.any()
        return
    assert first.fresh.all() and set(temperatures[0]) == {1.0}
    trainer.objective(first, 1.0)
    seen = {trainer.query_index[q.key] for q in first.traj.queries}
    assert trainer.log_z_ready.tolist() == [i in seen for i in range(len(QUERIES))]
    later = draw(trainer)
    for query, fresh in zip(later.traj.queries, later.fresh.tolist()):
        assert fresh == (trainer.query_index[query.key] not in seen)  # estimated queries are replayed


def test_a_query_with_nothing_to_replay_is_sampled_on_policy_not_tempered(tokenizer, monkeypatch):
    trainer = make_trainer(tokenizer, loss="tb", p_replay=1.0, p_tempered=0.0, queries_per_step=3)
    temperatures = record_sampling_temperatures(trainer, monkeypatch)
    batch = draw(trainer)  # the buffer is empty
    assert batch.fresh.all() and set(temperatures[0]) == {1.0}


def test_weight_decay_leaves_log_z_alone(tokenizer):
    trainer = make_trainer(tokenizer, loss="tb", weight_decay=0.5, lr=1e-2)
    trainer.log_z.load_(torch.full((len(QUERIES),), -30.0))
    for param in trainer.log_z.parameters():
        param.grad = torch.zeros_like(param)
    trainer.optimizer.step()  # a zero gradient: only weight decay could move log Z
    assert torch.equal(trainer.log_z.as_tensor(), torch.full((len(QUERIES),), -30.0))


def test_log_z_of_a_query_outside_the_batch_stays_put(tokenizer, monkeypatch):
    """Adam's momentum from earlier visits must not move the log Z of a query absent from the batch."""
    trainer = make_trainer(tokenizer, loss="tb", queries_per_step=1, p_replay=0.0, log_z_lr=0.5)
    picks = iter([0, 0, 0, 1, 1, 1])  # query 0 for three steps, then query 1 only
    monkeypatch.setattr(torch, "randint", lambda n, size, generator: torch.tensor([next(picks)]))
    for _ in range(3):
        trainer.train_step()
    visited = trainer.log_z.as_tensor()
    assert visited[0] != 0.0 and visited[2] == 0.0
    for _ in range(3):
        trainer.train_step()
    after = trainer.log_z.as_tensor()
    assert after[0] == visited[0]  # a shared [N] vector under Adam drifts here
    assert after[1] != 0.0 and after[2] == 0.0


def test_logged_log_z_mean_leaves_out_queries_not_yet_estimated(tokenizer):
    trainer = make_trainer(tokenizer, loss="tb", log_z_init="estimate", queries_per_step=1, log_z_lr=0.0)
    metrics = trainer.train_step()
    (estimated,) = trainer.log_z_ready.nonzero().flatten().tolist()
    assert metrics["log_z_mean"] == pytest.approx(trainer.log_z.as_tensor()[estimated].item())


def test_fresh_run_refuses_a_used_output_dir(tokenizer, tmp_path):
    make_trainer(tokenizer, tmp_path, steps=2).train()
    with pytest.raises(FileExistsError, match="--resume"):
        make_trainer(tokenizer, tmp_path, steps=2).train()


def test_resuming_with_an_optimizer_that_does_not_fit_names_the_checkpoint(tokenizer, tmp_path):
    make_trainer(tokenizer, tmp_path, steps=2, loss="tb").train()  # optimizer: LoRA and one log Z per query
    with pytest.raises(ValueError, match="step-0000002.*start a fresh run"):
        make_trainer(tokenizer, tmp_path, steps=4, loss="subtb").train(resume=True)  # no log Z to learn


def test_time_limit_stops_with_a_checkpoint_and_resume_continues(tokenizer, tmp_path, monkeypatch):
    import gfnlm.trainer as trainer_module

    clock = iter(range(0, 10_000, 25))  # every reading of the clock is 25 s later
    monkeypatch.setattr(trainer_module.time, "perf_counter", lambda: float(next(clock)))
    limited = make_trainer(tokenizer, tmp_path, time_limit_minutes=1.0, save_every=100)
    limited.train()
    assert 0 < limited.step < 6
    assert limited.latest_checkpoint().name == f"step-{limited.step:07d}"
    resumed = make_trainer(tokenizer, tmp_path)
    resumed.train(resume=True)
    assert resumed.step == 6


def test_time_limit_counts_the_sessions_before_a_resume(tokenizer, tmp_path, monkeypatch):
    """A killed and resumed run trains for its time limit in all, not for the limit again."""
    import gfnlm.trainer as trainer_module

    clock = itertools.count(0, 25)  # every reading of the clock is 25 s later
    monkeypatch.setattr(trainer_module.time, "perf_counter", lambda: float(next(clock)))
    first = make_trainer(tokenizer, tmp_path, steps=20, time_limit_minutes=1.0, save_every=100)
    first.train()
    again = make_trainer(tokenizer, tmp_path, steps=20, time_limit_minutes=1.0, save_every=100)
    again.train(resume=True)
    assert again.step == first.step and again.train_seconds == first.train_seconds >= 60
    longer = make_trainer(tokenizer, tmp_path, steps=20, time_limit_minutes=2.0, save_every=100)
    longer.train(resume=True)
    assert first.step < longer.step < 20 and longer.train_seconds >= 120


def test_training_changes_only_lora_parameters(tokenizer):
    trainer = make_trainer(tokenizer, steps=3)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    changed = {n for n, p in trainer.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed)


def test_gradient_accumulation_averages_micro_batches(tokenizer):
    """A step with grad_accum=2 accumulates the gradient of the mean of the two micro-batch losses."""
    trainer = make_trainer(tokenizer, grad_accum=2, lora_dropout=0.0, p_replay=0.0, max_grad_norm=0.0)
    g_state = trainer.generator.get_state()
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    batches = [draw(trainer) for _ in range(2)]
    manual = torch.autograd.grad(sum(trainer.objective(b, 1.0) for b in batches) / 2, params)
    single = torch.autograd.grad(trainer.objective(batches[0], 1.0), params)
    trainer.generator.set_state(g_state)
    trainer.train_step()  # leaves the accumulated gradients in .grad until the next step
    for p, expected, one in zip(params, manual, single):
        torch.testing.assert_close(p.grad, expected, atol=1e-6, rtol=1e-4)
    assert any(not torch.allclose(e, o) for e, o in zip(manual, single))


def test_nan_loss_skips_update_then_stops(tokenizer, tmp_path):
    class OverflowAfterTwo(TableReward):
        """Finite log-rewards so large that the squared residuals overflow float32."""

        def __call__(self, traj):
            out = super().__call__(traj)
            return out + 1e30 * torch.arange(out.shape[1]) if self.calls > 2 else out

    trainer = make_trainer(tokenizer, tmp_path, reward=OverflowAfterTwo(0), steps=20, max_nan_steps=3, save_every=1,
                           p_replay=0.0)
    with pytest.raises(TrainingDiverged, match="3 non-finite losses in a row"):
        trainer.train()
    rows = read_metrics(tmp_path)
    assert [r["skipped"] for r in rows] == [False, False, True, True, True]
    assert trainer.latest_checkpoint().name == "step-0000002"  # the last good one


def test_replay_buffer_is_filled_and_used(tokenizer):
    trainer = make_trainer(tokenizer, steps=4, p_replay=0.5)
    trainer.seed_buffer([TrajectoryRecord(QUERY, [1, 10], [3, 4], [True, True])])
    assert trainer.buffer.size(QUERY) == 1
    assert trainer.seed_buffer_from_texts([(QUERY, "12"), (Query("8"), "2")]) == 2
    assert sorted(r.generated_ids for _, r in trainer.buffer.best(QUERY, 5)) == [[3, 4], [4, 5]]
    with pytest.raises(ValueError, match="tokens"):
        trainer.seed_buffer_from_texts([(QUERY, "1234")])
    trainer.train()
    assert len(trainer.buffer) > 3


def test_deficit_replay_weighs_each_stored_trajectory_by_the_current_policy(tokenizer, monkeypatch):
    trainer = make_trainer(tokenizer, steps=3, p_replay=0.7, p_tempered=0.2, buffer_sampling="deficit", queries_per_step=3)
    trainer.seed_buffer([TrajectoryRecord(QUERY, [1, 10], [3, 4], [True, True])])
    trainer.train()  # the policy moves; the weights of replay must move along
    trainer.config.p_replay, trainer.config.p_tempered = 1.0, 0.0
    given: dict[str, list[float]] = {}  # the log q each replayed query's draw was weighted with
    draw = trainer.buffer.sample

    def recording_draw(query, n, generator, log_probs):
        given[query.key] = log_probs
        return draw(query, n, generator, log_probs)

    monkeypatch.setattr(trainer.buffer, "sample", recording_draw)
    replayed = {q.key: q for q in trainer.draw_trajectories()[0].queries}
    assert given.keys() == replayed.keys()
    for query in replayed.values():
        traj = Trajectories.from_records(trainer.buffer.records(query), trainer.pad_id, trainer.device)
        with torch.no_grad(), eval_mode(trainer.model):
            expected = terminal_log_prob(*score_policy(trainer.model, traj, trainer.space), traj.lengths)
        assert given[query.key] == pytest.approx(expected.tolist(), abs=1e-5)
    assert sum(trainer.buffer.size(q) for q in replayed.values()) > 1


def test_a_reward_returning_nan_is_an_error(tokenizer):
    trainer = make_trainer(tokenizer, reward=lambda traj: torch.full((len(traj), traj.horizon + 1), float("nan")))
    with pytest.raises(RewardError, match="non-finite log-reward"):
        trainer.train()


def test_reward_temperature_anneals_linearly(tokenizer):
    trainer = make_trainer(tokenizer, reward_temp_start=2.0, reward_temp_end=1.0, reward_temp_horizon=10)
    assert [trainer.reward_temperature(s) for s in (0, 5, 10, 50)] == [2.0, 1.5, 1.0, 1.0]


def test_learning_rate_warms_up_then_decays(tokenizer):
    trainer = make_trainer(tokenizer, steps=10, warmup_steps=2, lr_decay="linear", lr=1.0)
    assert [round(trainer.lr_factor(s), 3) for s in (0, 1, 2, 6, 10)] == [0.5, 1.0, 1.0, 0.5, 0.0]
    cosine = make_trainer(tokenizer, steps=10, lr_decay="cosine")
    assert cosine.lr_factor(5) == pytest.approx(0.5) and cosine.lr_factor(0) == 1.0


def test_base_model_samples_are_drawn_with_the_adapter_off(tokenizer, monkeypatch):
    import contextlib

    import gfnlm.gflownet as gflownet_module

    state = {"off": False, "sampled_off": 0, "sampled_on": 0}

    @contextlib.contextmanager
    def spy(model):
        state["off"] = True
        with model.disable_adapter():
            yield
        state["off"] = False

    monkeypatch.setattr(gflownet_module, "adapter_disabled", spy)
    trainer = make_trainer(tokenizer, steps=2, p_replay=0.0, p_tempered=0.0, p_base=1.0)
    original = trainer.sample_records

    def counting(queries, temperature):
        state["sampled_off" if state["off"] else "sampled_on"] += 1
        return original(queries, temperature)

    trainer.sample_records = counting
    trainer.train()
    assert state == {"off": False, "sampled_off": 2, "sampled_on": 0}


def test_logged_training_minutes_sums_step_times_across_resumes(tmp_path):
    assert read_logged_metrics(tmp_path) == [] and logged_training_minutes([]) == 0.0
    # a resumed run appends to the same log (its duplicates were truncated on resume)
    (tmp_path / "metrics.jsonl").write_text("".join(
        json.dumps({"step": s, "step_time_s": t}) + "\n" for s, t in ((1, 30.0), (2, 45.0), (3, 15.0))))
    assert logged_training_minutes(read_logged_metrics(tmp_path)) == pytest.approx(1.5)


def test_a_checkpoint_of_the_format_before_one_state_per_rank_still_resumes(tokenizer, tmp_path):
    whole = make_trainer(tokenizer, tmp_path / "whole", loss="subtb", log_z_init="estimate")
    whole.train()
    part = make_trainer(tokenizer, tmp_path / "part", steps=4, loss="subtb", log_z_init="estimate")
    part.train()
    path = part.latest_checkpoint() / "trainer_state.pt"
    state = torch.load(path, weights_only=True)
    (rank,) = state.pop("ranks")  # the old layout: the random states at the top, the buffer among the extras
    state["extra"]["buffer"] = rank.pop("buffer")
    torch.save(state | rank, path)
    resumed = make_trainer(tokenizer, tmp_path / "part", loss="subtb", log_z_init="estimate")
    resumed.train(resume=True)
    assert read_metrics(tmp_path / "part") == read_metrics(tmp_path / "whole")
