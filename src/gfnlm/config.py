"""Dataclass configs, loaded from YAML and overridden from the command line.

Every field is documented where it is declared (``metadata["help"]``); ``gfnlm train --help``
prints these texts. Overrides are ``--key value`` pairs; a key that exists nowhere is an error
that names the closest existing keys.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


def setting(default: Any, help: str, **kwargs: Any) -> Any:
    """A dataclass field with its documentation attached."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help}, **kwargs)
    return field(default=default, metadata={"help": help}, **kwargs)


BufferSampling = Literal["uniform", "reward", "deficit"]
"""How the replay buffer draws stored trajectories (``gfnlm.buffer.ReplayBuffer``)."""


class ConfigError(ValueError):
    """A configuration key or value that cannot be used."""


@dataclass
class TrainConfig:
    """How GFlowNet fine-tuning runs: batch composition, objective, optimiser, LoRA, logging."""

    seed: int = setting(0, "Seeds LoRA initialisation, sampling, batch composition and dropout.")
    steps: int = setting(200, "Number of optimizer steps.")
    time_limit_minutes: float = setting(
        0.0, "Stop once the run's training steps have taken this many minutes, resumed sessions included "
        "(checkpoint written; `--resume --time_limit_minutes M` with a larger M goes on); 0: no limit. "
        "The learning-rate schedule still follows `steps`."
    )
    queries_per_step: int = setting(4, "Distinct queries X in each micro-batch (amortisation over X).")
    samples_per_query: int = setting(8, "Trajectories per query in each micro-batch.")
    grad_accum: int = setting(1, "Micro-batches per optimizer step; the loss is averaged over them.")
    lr: float = setting(1e-4, "Peak learning rate of the policy (LoRA or full) parameters.")
    warmup_steps: int = setting(0, "Linear learning-rate warm-up from 0 over this many steps.")
    lr_decay: Literal["constant", "linear", "cosine"] = setting(
        "constant", "After warm-up: keep the learning rate, or decay it to 0 at the last step (linearly or cosine)."
    )
    weight_decay: float = setting(0.0, "AdamW weight decay.")
    max_grad_norm: float = setting(1.0, "Gradient clipping norm (0 disables clipping).")
    loss: Literal["subtb", "tb", "db"] = setting(
        "subtb", "Objective: modified sub-trajectory balance (paper Eq. 3), trajectory balance with a "
        "learned log Z per query, or modified detailed balance."
    )
    subtb_lambda: float = setting(1.0, "Weight lambda^(j-i-1) of a sub-trajectory of j-i steps (1.0 as in the paper).")
    log_z_lr: float = setting(0.1, "Learning rate of each query's log Z (learned by TB, and by SubTB when min_len > 0).")
    log_z_init: Literal["zero", "estimate"] = setting(
        "zero", "Where each query's log Z starts: 0 (right for rewards that are normalised probabilities), or "
        "its first batch's mean(log R - log P_F(trajectory)), for LM rewards whose log Z lies far below 0 and "
        "whose first samples already have typical rewards (posteriors p_LM(Z | X, Y); the tasks set it). Not for "
        "a first batch of nearly all floor rewards: the estimate then sits at the floor.")
    reward_temp_start: float = setting(1.0, "Reward temperature at step 0: the target is R^(1/temperature).")
    reward_temp_end: float = setting(1.0, "Reward temperature after the annealing horizon.")
    reward_temp_horizon: int = setting(0, "Steps over which the reward temperature moves linearly from start to end.")
    p_replay: float = setting(0.25, "Probability that a query's samples come from the replay buffer "
                                   "(on-policy while its buffer is empty).")
    p_tempered: float = setting(0.5, "Probability that a query's samples come from the tempered policy (else on-policy).")
    p_base: float = setting(
        0.0, "Probability that a query's samples come from the base model (LoRA off): exploration that keeps "
        "reachable what the policy stopped visiting early in training."
    )
    pf_temp_min: float = setting(0.5, "Lowest temperature of the tempered behaviour policy.")
    pf_temp_max: float = setting(2.0, "Highest temperature of the tempered behaviour policy (drawn uniformly per query).")
    buffer_capacity: int = setting(50, "Replay buffer: trajectories kept per query (highest reward first).")
    buffer_sampling: BufferSampling = setting(
        "uniform", "Replay draws: uniform, proportional to reward, or to reward / the policy's probability of the "
        "trajectory (deficit: what the policy under-samples most is replayed most)."
    )
    lora_rank: int = setting(16, "LoRA rank; 0 fine-tunes all parameters (for tiny models).")
    lora_alpha: float = setting(32.0, "LoRA scaling factor alpha.")
    lora_dropout: float = setting(0.0, "LoRA dropout (switched off while sampling and scoring rewards).")
    lora_target_modules: list[str] | str = setting("all-linear", "Modules that get LoRA adapters (peft syntax).")
    log_every: int = setting(1, "Write a metrics.jsonl line every this many steps.")
    save_every: int = setting(50, "Write a checkpoint every this many steps (and at the end).")
    keep_checkpoints: int = setting(2, "How many recent checkpoints to keep.")
    max_nan_steps: int = setting(5, "Stop after this many consecutive non-finite losses (each one skips its update).")
    device: str = setting("auto", "'auto' (CUDA if available), 'cpu', 'cuda', 'cuda:1', ... (under accelerate launch "
                                  "each process takes the device it is given; 'cpu' keeps them all on the CPU)")
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = setting(
        "auto", "Store the frozen base weights in bf16 or fp16 (CUDA) and compute in it; LoRA weights, log Z, the "
                "optimizer, the loss and every log-softmax over the vocabulary stay float32. auto: the launcher's "
                "(accelerate config), else bf16 where the device computes it natively (CUDA, or a CPU with "
                "AVX512-BF16 / AMX), else no; float32 with lora_rank 0. A precision the device cannot run is refused.")
    static_cache: bool = setting(
        False, "Sample with a preallocated KV cache (transformers' StaticCache): fixed-shape decoding steps for "
               "torch.compile / CUDA graphs, no cache copies as it grows; the same tokens and log-probs.")
    compile: bool | Literal["auto"] = setting(
        "auto", "Run the sampler's one-token decoding steps through torch.compile (inductor on the CPU, CUDA graphs "
                "on a GPU), over a static cache; one compilation per batch size and cache length. auto: on CUDA "
                "only (on the CPU the compile time outweighed the saving over 200 steps, docs/benchmarks.md).")
    report_to: Literal["none", "tensorboard", "wandb", "trackio", "mlflow"] = setting(
        "none", "Also send the logged metrics (the rows of metrics.jsonl) to this tracker, through accelerate "
                "(TensorBoard writes under the run directory; the others need their package and, for wandb, a login).")
    dist_timeout_s: float = setting(
        600.0, "With several processes: how long one waits for the others in a collective before it stops with an "
               "error (a crashed rank must not leave the rest waiting forever).")
    progress: bool = setting(True, "Show a progress bar.")

    def validate(self) -> None:
        positive = ["steps", "queries_per_step", "samples_per_query", "grad_accum", "buffer_capacity", "log_every",
                    "save_every", "keep_checkpoints", "max_nan_steps"]
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ["lr", "reward_temp_start", "reward_temp_end", "pf_temp_min", "pf_temp_max", "subtb_lambda"]:
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.pf_temp_min > self.pf_temp_max:
            raise ConfigError(f"pf_temp_min ({self.pf_temp_min}) exceeds pf_temp_max ({self.pf_temp_max})")
        sources = (self.p_replay, self.p_tempered, self.p_base)
        if min(sources) < 0 or sum(sources) > 1:
            raise ConfigError(f"p_replay, p_tempered and p_base must be >= 0 and sum to <= 1, got {sources}")
        check_choices(self)
        if not self.dist_timeout_s > 0:
            raise ConfigError(f"dist_timeout_s must be positive, got {self.dist_timeout_s}")
        if self.lora_rank < 0 or self.warmup_steps < 0 or self.reward_temp_horizon < 0 or self.time_limit_minutes < 0:
            raise ConfigError("lora_rank, warmup_steps, reward_temp_horizon and time_limit_minutes must be >= 0")


def check_choices(config: Any) -> None:
    """Every ``Literal[...]`` field of a dataclass holds one of its declared values (its type is the one list)."""
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        if typing.get_origin(hints[f.name]) is Literal:
            _coerce(getattr(config, f.name), hints[f.name], f.name)


def field_help(cls) -> dict[str, str]:
    return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Turn a YAML or command-line value into the field's declared type."""
    hint = annotation
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in typing.get_args(hint):
            if option is type(None):
                if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
                    return None
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError("; or ".join(errors) if errors else f"{key}: cannot use {value!r}")
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise ConfigError(f"{key} must be one of {list(choices)}, got {value!r}")
        return value
    if origin is list:
        (item,) = typing.get_args(hint)
        if isinstance(value, str):
            if not value.startswith("["):
                raise ConfigError(f"{key}: expected a list, got {value!r}")
            value = yaml.safe_load(value)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, item, key) for v in value]
    if origin is dict:
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if hint in (int, float, str):
        if hint is str and not isinstance(value, str):
            raise ConfigError(f"{key}: expected text, got {value!r}")
        try:
            converted = hint(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected {hint.__name__}, got {value!r}") from None
        if hint is int and isinstance(value, float) and value != converted:
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return converted
    return value


def apply_settings(configs: list[Any], settings: dict[str, Any]) -> None:
    """Set each key on whichever of ``configs`` declares it (in place), coercing types."""
    owners = {}
    for config in configs:
        hints = typing.get_type_hints(type(config))
        for f in dataclasses.fields(config):
            if f.name in owners:  # one key would silently set only one of them
                raise ConfigError(f"{type(owners[f.name][0]).__name__} and {type(config).__name__} both declare {f.name!r}")
            owners[f.name] = (config, hints[f.name])
    for key, value in settings.items():
        name = key.replace("-", "_")
        if name not in owners:
            close = difflib.get_close_matches(name, owners, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ConfigError(f"unknown config key {key!r}{hint}")
        config, annotation = owners[name]
        setattr(config, name, _coerce(value, annotation, name))


def parse_overrides(args: list[str]) -> dict[str, str]:
    """``['--lr', '1e-3', '--max-len=5']`` -> ``{'lr': '1e-3', 'max_len': '5'}`` (dashes in keys read as underscores)."""
    out: dict[str, str] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ConfigError(f"expected --key value, got {arg!r}")
        if "=" in arg:
            key, value = arg[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args) or args[i + 1].startswith("--"):
                raise ConfigError(f"{arg} needs a value")
            key, value = arg[2:], args[i + 1]
            i += 2
        out[key.replace("-", "_")] = value
    return out


def parse_key_values(pairs: list[str]) -> dict[str, str]:
    """``['lr=1e-3', 'max-len=5']`` -> ``{'lr': '1e-3', 'max_len': '5'}``: settings given as KEY=VALUE words."""
    if malformed := [pair for pair in pairs if "=" not in pair]:
        raise ConfigError(f"settings take KEY=VALUE, got {malformed}")
    return parse_overrides([f"--{pair}" for pair in pairs])


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of key: value")
    return data


def to_dict(*configs: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for config in configs:
        out.update(dataclasses.asdict(config))
    return out
