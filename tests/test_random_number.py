"""The random-number task on a tiny model: exact evaluation, rewards, SFT data."""

import math

import pytest
import torch
from conftest import make_policy, make_tiny_lm, needs_native_bf16

from gfnlm.tasks.random_number import RandomNumberOptions, RandomNumberTask, target_distribution


@pytest.fixture
def task(tokenizer):
    return RandomNumberTask(RandomNumberOptions(prompt="7+", low=0, high=20, max_len=3, eval_batch_size=1000), tokenizer)


@pytest.mark.parametrize("precision", ["no", pytest.param("bf16", marks=needs_native_bf16)])
def test_exact_evaluation_agrees_with_sampling(task, precision):
    """The exact distribution is the one the policy samples from, in its own precision."""
    model = make_policy(make_tiny_lm(seed=5), task.tokenizer, task.action_space(), precision=precision)
    probs, valid_mass = task.exact_distribution(model)
    assert 0.01 < valid_mass < 1.0 and valid_mass == pytest.approx(sum(probs))
    n = 6000
    draws = task.sample_integers(model, n, seed=1)
    valid_fraction = sum(d is not None for d in draws) / n
    assert abs(valid_fraction - valid_mass) < 4 * math.sqrt(valid_mass * (1 - valid_mass) / n)
    for value, p in zip(task.integers, probs):
        freq = draws.count(value) / n
        assert abs(freq - p) < 4 * math.sqrt(p * (1 - p) / n) + 2e-3, (value, freq, p)


def test_rewards_for_valid_and_invalid_text(task):
    log_p = math.log(1 / 21)
    rewards = task.log_reward(["7", "20", "21", "07", " 7", "", "1-", "3</s>"], None)
    assert rewards[:2] == [pytest.approx(log_p)] * 2
    assert rewards[2:] == [task.options.invalid_log_reward] * 6


def test_targets_are_normalised_and_shaped():
    uniform = target_distribution(RandomNumberOptions(low=0, high=100))
    assert len(uniform) == 101 and sum(uniform) == pytest.approx(1.0)
    binomial = target_distribution(RandomNumberOptions(low=0, high=10, target="binomial", binomial_p=0.5))
    assert binomial[5] == pytest.approx(math.comb(10, 5) / 2**10)
    poisson = target_distribution(RandomNumberOptions(low=0, high=100, target="poisson", poisson_rate=3.0))
    assert max(range(101), key=poisson.__getitem__) in (2, 3)
    with pytest.raises(ValueError, match="one weight per integer"):
        target_distribution(RandomNumberOptions(low=0, high=3, target="weights", weights=[1.0, 2.0]))


def test_sft_examples_follow_the_target(task):
    records = task.sft_examples(2000, torch.Generator().manual_seed(0))
    texts = [task.tokenizer.decode(r.generated_ids) for r in records]
    assert all(task.parse(t) is not None for t in texts)
    assert abs(texts.count("7") / 2000 - 1 / 21) < 0.02
