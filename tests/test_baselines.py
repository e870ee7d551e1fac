"""SFT and PPO share the engine; each one moves the policy the way its objective says."""

import pytest
import torch
from conftest import make_policy, make_tiny_lm

from gfnlm.baselines.ppo import PPOConfig, PPOTrainer, episode_log_probs, generalised_advantages
from gfnlm.baselines.sft import EpochDraws, SFTTrainer
from gfnlm.config import TrainConfig
from gfnlm.rewards import TextReward
from gfnlm.runlog import read_logged_metrics
from gfnlm.scoring import score_policy, terminal_log_prob
from gfnlm.trajectories import ActionSpace, Query, TrajectoryRecord, Trajectories

SPACE = ActionSpace(stop_token_ids=(2,), max_len=2, allowed_token_ids=(3, 4, 5))
QUERY = Query("7")
TARGET = TrajectoryRecord(QUERY, [1, 10], [4, 5], [True, True])  # "12"


def prob_of(model, record):
    traj = Trajectories.from_records([record], pad_token_id=0)
    with torch.no_grad():
        return terminal_log_prob(*score_policy(model, traj, SPACE), traj.lengths).exp().item()


def config(**kw):
    return TrainConfig(**{"steps": 15, "queries_per_step": 1, "samples_per_query": 16, "lr": 1e-2, "lora_rank": 0,
                          "device": "cpu", "progress": False, **kw})


def test_sft_raises_the_likelihood_of_its_examples(tokenizer):
    trainer = SFTTrainer(make_policy(make_tiny_lm(), tokenizer, SPACE), lambda n, g: [TARGET] * n, config())
    before = prob_of(trainer.model, TARGET)
    trainer.train()
    assert prob_of(trainer.model, TARGET) > max(0.9, before + 0.3)


def stop_prob_at_start(model):
    traj = Trajectories.from_records([TrajectoryRecord(QUERY, [1, 10], [], [])], pad_token_id=0)
    with torch.no_grad():
        return score_policy(model, traj, SPACE)[1][0, 0].exp().item()


def test_ppo_maximises_reward(tokenizer):
    """Reward 1 for any non-empty text, e^-30 for stopping at once (what the initial policy prefers)."""
    reward = TextReward(lambda texts, qs: [0.0 if t else -30.0 for t in texts], tokenizer)
    trainer = PPOTrainer(make_policy(make_tiny_lm(), tokenizer, SPACE), reward, [QUERY],
                         config(steps=15, samples_per_query=48), PPOConfig(init_kl_coef=0.0))
    before = stop_prob_at_start(trainer.model)
    history = trainer.train()
    assert before > 0.8
    assert stop_prob_at_start(trainer.model) < 0.1
    assert history[-1]["reward_mean"] > history[0]["reward_mean"]


def test_episode_includes_the_stop_action():
    log_pf = torch.tensor([[-1.0, -2.0], [-3.0, float("nan")]])
    log_pterm = torch.tensor([[-4.0, -5.0, 0.0], [-6.0, -7.0, -8.0]])
    out = episode_log_probs(log_pf, log_pterm, torch.tensor([2, 1]))
    assert out.tolist() == [[-1.0, -2.0, 0.0], [-3.0, -7.0, 0.0]]


def test_gae_with_lambda_one_is_return_minus_value():
    rewards = torch.tensor([[0.0, 1.0, 2.0]])
    values = torch.tensor([[0.5, 0.25, 9.0]])
    valid = torch.tensor([[True, True, False]])
    adv = generalised_advantages(rewards, values, valid, lam=1.0)
    assert torch.allclose(adv, torch.tensor([[1.0 - 0.5, 1.0 - 0.25, 0.0]]))


def test_epoch_draws_visit_every_record_once_a_pass_in_a_new_order():
    records = [TrajectoryRecord(Query(str(i)), [1], [3], [True]) for i in range(10)]
    draw, generator = EpochDraws(records), torch.Generator().manual_seed(0)
    first_pass = draw(4, generator) + draw(6, generator)
    second_pass = draw(10, generator)
    assert sorted(r.query.prompt for r in first_pass) == sorted(str(i) for i in range(10))
    assert sorted(r.query.prompt for r in second_pass) == sorted(str(i) for i in range(10))
    assert [r.query.prompt for r in first_pass] != [r.query.prompt for r in second_pass]  # a new order each pass
    assert len(draw(25, generator)) == 25  # across passes
    with pytest.raises(ValueError, match="no records"):
        EpochDraws([])


def test_sft_in_epochs_resumes_mid_pass_as_if_never_stopped(tokenizer, tmp_path):
    """A run killed in the middle of a pass draws, once resumed, the rest of that pass (its state is checkpointed)."""
    records = [TrajectoryRecord(QUERY, [1, 10], [a, b], [True, True]) for a in (3, 4, 5) for b in (3, 4)]  # 6

    def sft(out, steps):
        settings = config(steps=steps, samples_per_query=4, lora_rank=2, save_every=1, lr=1e-3)
        return SFTTrainer(make_policy(make_tiny_lm(), tokenizer, SPACE), EpochDraws(records), settings, out)

    sft(tmp_path / "whole", 5).train()
    sft(tmp_path / "part", 2).train()  # 8 draws: stopped 2 records into the second pass
    resumed = sft(tmp_path / "part", 5)
    resumed.train(resume=True)
    losses = lambda run: [row["loss"] for row in read_logged_metrics(run)]  # noqa: E731
    assert resumed.step == 5 and losses(tmp_path / "part") == losses(tmp_path / "whole")
