"""Every registered task keeps the contract the engine and the command line rely on."""

from __future__ import annotations

import dataclasses

import pytest

from gfnlm.baselines.ppo import PPOConfig
from gfnlm.config import TrainConfig, apply_settings
from gfnlm.rewards import LMSuffixReward, TerminalReward
from gfnlm.tasks import TASKS, TaskOptions


@pytest.mark.parametrize("name", sorted(TASKS))
def test_a_task_declares_the_shared_options_with_its_defaults(name):
    task = TASKS[name]
    options = task.Options()
    shared = {f.name for f in dataclasses.fields(TaskOptions)}
    assert shared <= {f.name for f in dataclasses.fields(options)}
    assert options.max_len >= 1 and 0 <= options.min_len <= options.max_len and options.eval_samples >= 1
    if name != "prompts":  # the user's data and reward have no default
        options.validate()
    for value, message in [({"min_len": options.max_len + 1}, "min_len must be between 0 and max_len"),
                           ({"max_len": 0, "min_len": 0}, "max_len must be at least 1"),
                           ({"eval_samples": 0}, "eval_samples must be at least")]:
        with pytest.raises(ValueError, match=message):
            dataclasses.replace(options, **value).validate()


@pytest.mark.parametrize("name", sorted(TASKS))
def test_every_method_setting_a_task_gives_names_a_real_key(name):
    task = TASKS[name]
    for method in task.train_methods + task.eval_methods:
        defaults = task.method_settings(method, {})
        apply_settings([TrainConfig(), task.Options(), PPOConfig()], defaults)  # an unknown key raises


def test_the_suffix_reward_declares_its_terminal_computation_and_a_plain_function_does_not():
    assert issubclass(LMSuffixReward, TerminalReward)
    assert not isinstance(lambda traj: traj, TerminalReward)
