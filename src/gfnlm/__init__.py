"""gfnlm: GFlowNet fine-tuning of causal language models.

The names a user needs are importable from here: load a model, describe the policy's actions, give a
reward, train (``from gfnlm import GFlowNetTrainer, Policy, ...``). They load on first use, so that
importing a submodule (the command line) does not import torch and transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "ActionSpace": "gfnlm.trajectories",
    "CalculatorTool": "gfnlm.tools",
    "GFlowNetTrainer": "gfnlm.gflownet",
    "LMStopReward": "gfnlm.rewards",
    "LMSuffixReward": "gfnlm.rewards",
    "Policy": "gfnlm.policy",
    "Query": "gfnlm.trajectories",
    "Reward": "gfnlm.rewards",
    "SumReward": "gfnlm.rewards",
    "TextReward": "gfnlm.rewards",
    "Tool": "gfnlm.sampling",
    "TrainConfig": "gfnlm.config",
    "Trajectories": "gfnlm.trajectories",
    "load_model_and_tokenizer": "gfnlm.models",
    "stop_token_ids": "gfnlm.models",
}
__all__ = [
    "ActionSpace", "CalculatorTool", "GFlowNetTrainer", "LMStopReward", "LMSuffixReward", "Policy", "Query", "Reward",
    "SumReward", "TextReward", "Tool", "TrainConfig", "Trajectories", "load_model_and_tokenizer", "stop_token_ids",
]

if TYPE_CHECKING:
    from gfnlm.config import TrainConfig
    from gfnlm.models import load_model_and_tokenizer, stop_token_ids
    from gfnlm.policy import Policy
    from gfnlm.rewards import LMStopReward, LMSuffixReward, Reward, SumReward, TextReward
    from gfnlm.sampling import Tool
    from gfnlm.tools import CalculatorTool
    from gfnlm.gflownet import GFlowNetTrainer
    from gfnlm.trajectories import ActionSpace, Query, Trajectories


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'gfnlm' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return __all__
