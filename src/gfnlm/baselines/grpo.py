"""GRPO, the reward-maximising baseline users would reach for: TRL's ``GRPOTrainer``, driven with our task.

The trainer is TRL's, not a rewrite. This module only hands it what our GFlowNet runs get: the task's
queries as a ``datasets.Dataset`` (column ``prompt``, and ``query`` to find each row's query again),
the task's log-reward of the whole completion as a TRL reward function, the same policy (its model,
its bf16 weights and a LoRA adapter made as ours are), the same number of queries x samples a step,
the same maximum length, learning-rate schedule and time budget. It writes our ``metrics.jsonl``
rows and the final adapter where ``gfnlm eval --adapter`` finds ours (``checkpoints/step-N/adapter``);
TRL's own checkpoints, for ``--resume``, go to ``trl/``.

The action space becomes generation settings: the stop tokens are the ``eos_token_id``, the tokens
outside the space are ``suppress_tokens``, ``min_len`` is ``min_new_tokens`` and ``max_len`` is
``max_new_tokens`` (a completion cut there is our forced stop: its stop has probability 1). What TRL
cannot express: its loss reads the completion's log-probs under the whole vocabulary, while it
samples under the suppressed one, so the distribution it trains is not the one it samples (ours are
one definition, ``ActionSpace``); and a tool that inserts tokens mid-generation (the arithmetic
calculator): TRL's tools are chat-template function calls, so arithmetic keeps our PPO.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Sequence

import torch
from peft import set_peft_model_state_dict
from safetensors.torch import load_file
from transformers import TrainerCallback

from gfnlm.config import ConfigError, TrainConfig
from gfnlm.distributed import Ranks
from gfnlm.policy import Policy
from gfnlm.rewards import Reward, terminal_log_rewards
from gfnlm.sampling import encode_prompts, require_pad_token
from gfnlm.runlog import append_logged_metrics, logged_training_minutes, read_logged_metrics, truncate_logged_metrics
from gfnlm.trajectories import Query, TrajectoryRecord, Trajectories

logger = logging.getLogger("gfnlm")

TRL_FOLDER = "trl"
"""TRL's own checkpoints inside a run folder (``--resume`` continues from the latest)."""


def generation_settings(policy: Policy) -> dict:
    """The policy's action space as ``transformers`` generation settings (see the module docstring)."""
    space = policy.space
    settings = {"eos_token_id": list(space.stop_token_ids), "max_new_tokens": space.max_len,
                "min_new_tokens": space.min_len, "temperature": 1.0, "top_p": 1.0, "top_k": 0}
    if space.allowed_token_ids is not None:
        writable = set(space.allowed_token_ids) | set(space.stop_token_ids)
        vocabulary = policy.model.get_output_embeddings().weight.shape[0]
        settings["suppress_tokens"] = [t for t in range(vocabulary) if t not in writable]
    return settings


class TaskRewardForTRL:
    """A TRL reward function (``f(prompts, completions, completion_ids, **columns) -> list[float]``) that gives each
    completion our reward's log R of its terminal state: the completion's tokens, less the stop token, are the
    trajectory's actions after the query's prompt."""

    def __init__(self, reward: Reward, policy: Policy, queries: Sequence[Query]):
        self.reward, self.policy, self.queries = reward, policy, list(queries)
        self.prompt_ids = encode_prompts(policy.tokenizer, self.queries)  # once, not per completion
        self.stops = set(policy.space.stop_token_ids)
        self.__name__ = "task_log_reward"  # TRL logs a reward function under its name

    def __call__(self, prompts: list, completions: list, completion_ids: list[list[int]], query: list[int],
                 **columns) -> list[float]:
        records = []
        for index, ids in zip(query, completion_ids, strict=True):
            actions = list(ids[:-1] if ids and ids[-1] in self.stops else ids)
            records.append(TrajectoryRecord(self.queries[index], self.prompt_ids[index], actions, [True] * len(actions)))
        traj = Trajectories.from_records(records, require_pad_token(self.policy.tokenizer), self.policy.device)
        return terminal_log_rewards(self.reward, traj).tolist()


class GRPOBaseline:
    """TRL's GRPO on ``policy`` with ``reward`` over ``queries``, with a run's ``config``; for the command line it
    behaves as our trainers do (``train(resume)``, ``policy``, ``step``, ``ranks``). One process."""

    name = "grpo"

    def __init__(self, policy: Policy, reward: Reward, queries: Sequence[Query], config: TrainConfig,
                 output_dir: str | Path | None = None):
        from datasets import Dataset
        from trl import GRPOConfig, GRPOTrainer

        if policy.tool is not None:
            raise ConfigError("--method grpo runs TRL's GRPOTrainer, whose tools are chat-template function calls: it "
                              "cannot insert a tool's tokens mid-generation as this task's policy does (use ppo)")
        if config.grad_accum != 1:
            raise ConfigError("--method grpo takes one micro-batch a step (grad_accum 1)")
        self.config, self.policy = config, policy
        self.output_dir = Path(output_dir) if output_dir is not None else Path("runs/grpo")
        self.step = 0
        torch.manual_seed(config.seed)  # the adapter's initialisation, as our trainers do it
        policy.add_adapter(config)
        policy.model.generation_config.eos_token_id = list(policy.space.stop_token_ids)  # TRL's ends of a completion
        # TRL draws queries_per_step distinct rows a step: a task with fewer queries (random-number has one)
        # repeats them, as our trainer's draw with replacement does
        rows = [{"prompt": queries[i % len(queries)].prompt, "query": i % len(queries)}
                for i in range(max(len(queries), config.queries_per_step))]
        samples = config.queries_per_step * config.samples_per_query
        arguments = GRPOConfig(
            output_dir=str(self.output_dir / TRL_FOLDER), per_device_train_batch_size=samples,
            num_generations=config.samples_per_query, max_completion_length=policy.space.max_len,
            generation_kwargs=generation_settings(policy), learning_rate=config.lr, max_steps=config.steps,
            lr_scheduler_type=config.lr_decay, warmup_steps=config.warmup_steps, weight_decay=config.weight_decay,
            max_grad_norm=config.max_grad_norm if config.max_grad_norm > 0 else 1e9, seed=config.seed,
            logging_steps=1, save_steps=config.save_every, save_total_limit=config.keep_checkpoints,
            bf16=False, fp16=False, use_cpu=policy.device.type == "cpu", gradient_checkpointing=False,
            report_to=[] if config.report_to == "none" else [config.report_to], remove_unused_columns=False, disable_tqdm=not config.progress, dataloader_num_workers=0,
        )
        self.trl = GRPOTrainer(model=policy.model, reward_funcs=TaskRewardForTRL(reward, policy, queries),
                               args=arguments, train_dataset=Dataset.from_list(rows),
                               processing_class=policy.tokenizer, callbacks=[RunLog(self)])
        self.ranks = Ranks(self.trl.accelerator)

    def train(self, resume: bool = False) -> list[dict]:
        """Train until ``config.steps`` or ``time_limit_minutes``; the adapter then goes to
        ``checkpoints/step-N/adapter``. ``resume`` continues from TRL's latest checkpoint."""
        trl_dir = self.output_dir / TRL_FOLDER
        checkpoints = sorted(trl_dir.glob("checkpoint-*")) if trl_dir.is_dir() else []
        if checkpoints and not resume:
            raise FileExistsError(f"{self.output_dir} already holds checkpoints; pass --resume to continue that run, "
                                  "or choose another output directory")
        self.output_dir.mkdir(parents=True, exist_ok=True)
        resumed_step = int(checkpoints[-1].name.rsplit("-", 1)[1]) if checkpoints and resume else 0
        truncate_logged_metrics(self.output_dir, resumed_step)
        # the time limit counts the run's steps, resumed sessions included (TRL logs every step: logging_steps=1)
        self.train_seconds = 60 * logged_training_minutes(self.history)
        if resumed_step and self.time_is_up():  # TRL would take one more step before a callback could stop it
            set_peft_model_state_dict(self.policy.model, load_file(checkpoints[-1] / "adapter_model.safetensors"))
            self.step = resumed_step
        else:
            self.trl.train(resume_from_checkpoint=str(checkpoints[-1]) if resumed_step else None)
            self.step = self.trl.state.global_step
        self.policy.model.save_pretrained(self.output_dir / "checkpoints" / f"step-{self.step:07d}" / "adapter")
        return self.history

    @property
    def history(self) -> list[dict]:
        return read_logged_metrics(self.output_dir)

    def time_is_up(self) -> bool:
        limit = self.config.time_limit_minutes
        return limit > 0 and self.train_seconds >= 60 * limit


class RunLog(TrainerCallback):
    """Our ``metrics.jsonl`` rows from TRL's logs (loss, reward, the step's time and samples/s), and the time limit:
    training stops, with a checkpoint, once ``time_limit_minutes`` have passed."""

    def __init__(self, baseline: GRPOBaseline):
        self.baseline, self.step_started, self.step_time = baseline, 0.0, 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self.step_started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.step_time = time.perf_counter() - self.step_started
        self.baseline.train_seconds += self.step_time
        if self.baseline.time_is_up():
            logger.info("time limit of %g minutes reached at step %d", self.baseline.config.time_limit_minutes,
                        state.global_step)
            control.should_training_stop = control.should_save = True

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "loss" not in logs:
            return
        c = self.baseline.config
        row = {"step": state.global_step, "loss": logs["loss"], "reward_mean": logs.get("reward"),
               "reward_std": logs.get("reward_std"), "lr": logs.get("learning_rate"), "grad_norm": logs.get("grad_norm"),
               "mean_length": logs.get("completions/mean_length"),
               "samples_per_s": c.queries_per_step * c.samples_per_query / self.step_time, "step_time_s": self.step_time}
        append_logged_metrics(self.baseline.output_dir, row)
