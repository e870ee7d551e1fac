"""The policy: a language model (with its adapter) as the engine samples, scores and trains it.

A ``Policy`` holds everything that decides how the model runs: its tokenizer, the action space,
the tool that inserts context, the device, the precision its frozen weights are stored in and the
decoding settings (static KV cache, compiled decoding step). The trainers, the baselines, the
rewards that run the base model, evaluation and ``gfnlm bench`` all take one, so no call site
passes these settings by hand.

Precision: the frozen base weights are *stored* in bfloat16 (or float16 on a GPU) where the device
computes it natively, the way large models are run for inference; there is no per-operation
autocast. The LoRA weights, log Z, the optimizer, the loss and every log-softmax over the
vocabulary stay float32. docs/design.md ("Precision") says how far bf16 log-probs and log-rewards
move from float32 on the embedded model.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import warnings
from typing import TYPE_CHECKING, Iterator, Literal, Sequence

import torch
from torch import Tensor

from gfnlm.attention import use_grouped_attention
from gfnlm.config import ConfigError
from gfnlm.sampling import ToolHook, decode_step, sample
from gfnlm.scoring import score_policy
from gfnlm.trajectories import ActionSpace, Query, Trajectories

if TYPE_CHECKING:
    from gfnlm.config import TrainConfig
    from gfnlm.context import SharedContext

logger = logging.getLogger("gfnlm")

Precision = Literal["no", "bf16", "fp16"]
DTYPES: dict[str, torch.dtype] = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
COMPILE_CACHE_SHAPES = 64
"""Compiled decoding steps kept per process: one per batch size and cache length bucket seen."""

_said_auto: set[str] = set()  # devices for which "auto" precision has been explained in the log


def resolve_device(name: str | torch.device) -> torch.device:
    """``name`` as a device; "auto" is CUDA where there is one. Under a launcher (``LOCAL_RANK`` set) a
    CUDA device without an index is this process's own GPU, not GPU 0 for every process."""
    if isinstance(name, torch.device):
        return name
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


def cpu_supports_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX); without it torch emulates it slowly."""
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(check() for check in checks if check is not None)


def native_bf16(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_supports_bf16()


def resolve_precision(requested: str, device: torch.device) -> Precision:
    """The precision a policy runs in: ``no``, ``bf16`` or ``fp16``; ``auto`` is the launcher's
    (``accelerate launch`` sets ACCELERATE_MIXED_PRECISION), else bf16 where ``device`` computes it
    natively, else no (said once in the log). A precision the device cannot run is refused, rather
    than a slow emulation or a float32 run that claims otherwise."""
    precision = requested.lower()
    if precision == "auto":
        precision = os.environ.get("ACCELERATE_MIXED_PRECISION", "").lower()
        if not precision:
            if native_bf16(device):
                return "bf16"
            if device.type not in _said_auto:
                _said_auto.add(device.type)
                logger.info("mixed precision auto: float32 on %s, which has no native bfloat16", device.type)
            return "no"
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("--mixed_precision fp16 needs a CUDA device; on the CPU use no (or bf16 where supported)")
    if precision == "bf16" and device.type == "cpu" and not cpu_supports_bf16():
        raise ConfigError("--mixed_precision bf16: this CPU has no native bfloat16 (AVX512-BF16 or AMX), so torch "
                          "would emulate it slowly; use --mixed_precision no (or auto)")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("--mixed_precision bf16: this GPU does not support bfloat16; use fp16 or no")
    if precision not in DTYPES:
        raise ConfigError(f"mixed precision must be auto, no, bf16 or fp16, got {requested!r}")
    return precision  # type: ignore[return-value]


def resolve_compile(requested: bool | str, device: torch.device) -> bool:
    """Whether decoding steps run compiled. ``auto``: on CUDA only, where CUDA graphs remove the kernel
    launches that bound the step. On this project's CPU the compiled step saved less than its compile
    time over a 200-step run (docs/benchmarks.md, "Compiled decoding")."""
    if requested == "auto":
        return device.type == "cuda"
    if isinstance(requested, str):
        raise ConfigError(f"compile must be true, false or auto, got {requested!r}")
    return bool(requested)


def is_adapter_weight(name: str) -> bool:
    """Whether a parameter belongs to a LoRA adapter (peft names them ``lora_A`` / ``lora_B`` / ...)."""
    return ".lora_" in name


def store_weights(model, dtype: torch.dtype) -> None:
    """Store the model's parameters in ``dtype``, in place, except its adapter weights and its output head
    (and so a tied input embedding), which stay float32.

    The head stays float32 because a bfloat16 product rounds every logit to 8 significant bits: 0.125 apart
    for logits of 16 to 32, so the policy's log-probs could only move in steps of that size and a trained
    distribution could match its target no closer (the demo's exact KL stopped at 0.0016, above 1e-3). The
    head runs on bfloat16 hidden states cast up (``_head_in_float32``). Only parameters: buffers keep their
    dtype (rotary inverse frequencies rounded to bfloat16 would shift every position's phase). Tied weights
    are one parameter, cast once."""
    head = model.get_output_embeddings()
    float32_ids = {id(p) for p in head.parameters()} if head is not None else set()
    for name, param in model.named_parameters():
        wanted = torch.float32 if is_adapter_weight(name) or id(param) in float32_ids else dtype
        if param.is_floating_point() and param.dtype != wanted:
            param.data = param.data.to(wanted)
    _head_in_float32(model, dtype)


class Policy:
    """A language model as a policy over an action space: what to sample, score and train.

    ``model`` moves to ``device`` (default: where it is) and its weights are stored in ``precision``
    (``auto``: bf16 where the device computes it natively; see the module docstring). ``tool``
    inserts context tokens after actions (the calculator). ``static_cache`` preallocates the
    sampler's KV cache; ``compile`` runs its one-token decoding steps through ``torch.compile``
    (inductor on the CPU, CUDA graphs on a GPU) and implies the static cache; ``auto`` compiles
    on CUDA only. Trainers add a LoRA adapter to ``model`` (``add_adapter``).
    """

    def __init__(self, model, tokenizer, space: ActionSpace, tool: ToolHook | None = None, *,
                 precision: str = "auto", static_cache: bool = False, compile: bool | str = "auto",
                 device: str | torch.device | None = None):
        self.device = resolve_device(device) if device is not None else next(model.parameters()).device
        if self.device.type == "cpu":
            self.device = torch.device("cpu")  # not "cpu:0", which safetensors refuses
        self.precision: Precision = resolve_precision(precision, self.device)
        self.tokenizer, self.space, self.tool = tokenizer, space, tool
        self.model = model.to(self.device)
        store_weights(self.model, self.dtype)
        if self.device.type == "cpu" and self.precision == "bf16":
            use_grouped_attention(self.model)  # torch's fused CPU attention is slow in bf16 for short queries
        self.compile = resolve_compile(compile, self.device)
        self.static_cache = bool(static_cache) or self.compile  # compiled steps need fixed shapes
        self.compiled_step = _compiled_decode_step(self.device) if self.compile else None

    @classmethod
    def from_config(cls, model, tokenizer, space: ActionSpace, config: TrainConfig, tool: ToolHook | None = None) -> Policy:
        """The policy a training run's settings describe (device, precision, static cache, compile). With
        ``lora_rank`` 0 every weight trains, in float32, so ``auto`` precision is float32 there."""
        precision = "no" if config.lora_rank == 0 and config.mixed_precision == "auto" else config.mixed_precision
        return cls(model, tokenizer, space, tool, precision=precision, static_cache=config.static_cache,
                   compile=config.compile, device=config.device)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the frozen weights are stored and computed in."""
        return DTYPES[self.precision]

    def with_space(self, space: ActionSpace, tool: ToolHook | None = None) -> Policy:
        """The same model and settings over another action space (and tool): e.g. an answer written
        after a rationale, greedy and without the calculator."""
        other = copy.copy(self)
        other.space, other.tool = space, tool
        return other

    def add_adapter(self, config: TrainConfig) -> None:
        """Wrap the model with a fresh LoRA adapter (peft) of ``config``'s rank, in float32; no-op for rank 0
        (every weight trains, which needs float32 storage) or a model that already has one."""
        if config.lora_rank == 0:
            if self.precision != "no":
                raise ConfigError(f"lora_rank 0 trains every weight, which must be stored in float32, but this "
                                  f"policy stores them in {self.precision}: use mixed_precision no (or auto)")
            return
        if hasattr(self.model, "peft_config"):
            return  # already adapted (e.g. loaded from an adapter folder)
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                          target_modules=config.lora_target_modules, task_type="CAUSAL_LM")
        with warnings.catch_warnings():  # peft reads a property transformers 5 deprecates; nothing to act on
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            self.model = get_peft_model(self.model, lora)  # adapters upcast to float32 (autocast_adapter_dtype)
        store_weights(self.model, self.dtype)

    @contextlib.contextmanager
    def adapters_in_compute_dtype(self) -> Iterator[None]:
        """The adapter's weights in the compute dtype for the block (sampling: no gradients), the float32 ones put
        back after. A float32 adapter on bfloat16 weights costs a float32 product, a mixed-dtype add and a cast per
        layer: on this project's CPU a decoding step's LoRA linear took 1.7x the time of the plain one.

        The parameters are swapped for copies, never recast in place: a parameter whose dtype changes gets a new
        gradient accumulator, and DDP's hooks on the old one would stop averaging its gradients over the ranks."""
        if self.dtype == torch.float32:
            yield
            return
        trained = [(module, name, param) for module_name, module in self.model.named_modules()
                   for name, param in module.named_parameters(recurse=False)
                   if is_adapter_weight(f"{module_name}.{name}") and param.dtype != self.dtype]
        for module, name, param in trained:
            setattr(module, name, torch.nn.Parameter(param.detach().to(self.dtype), requires_grad=False))
        try:
            yield
        finally:
            for module, name, param in trained:
                setattr(module, name, param)

    def sample(self, queries: Sequence[Query], temperature: float | Sequence[float] | Tensor = 1.0,
               generator: torch.Generator | None = None, *, context: SharedContext | None = None,
               top_k: int | None = None, top_p: float | None = None) -> Trajectories:
        """One trajectory per query (``gfnlm.sampling.sample``): tempered, greedy (temperature 0), top-k or
        nucleus; ``context`` is a cached text before every prompt (the base model's: k-shot examples)."""
        return sample(self, queries, temperature, generator, context, top_k, top_p)

    def score(self, traj: Trajectories) -> tuple[Tensor, Tensor]:
        """The policy's log P_F [B, T] and log P_⊤ [B, T+1] of ``traj``, with gradients (``score_policy``)."""
        return score_policy(self.model, traj, self.space)


def _head_in_float32(model, dtype: torch.dtype) -> None:
    """Hooks that run the float32 output head on the decoder's hidden states, and hand the decoder its input
    embeddings in ``dtype`` (a head tied to them keeps them float32 too); installed once per model, the dtype
    updated on later calls.

    The head's input is also made contiguous: transformers computes the logits of the last positions only
    (``logits_to_keep``) on a slice of the hidden states, and for a 3-D input that is not contiguous torch's
    linear falls back to a batched matmul over a copy of the head's weights per row ([32, 576, 49152] for
    SmolLM2 at batch 32: 1.6 s in bfloat16 on this project's CPU instead of 9 ms)."""
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None:
        return
    embedding._gfnlm_dtype = dtype
    if getattr(head, "_gfnlm_float32", False):
        return
    head.register_forward_pre_hook(lambda module, args: (args[0].to(module.weight.dtype).contiguous(), *args[1:]))
    embedding.register_forward_hook(lambda module, args, out: out.to(module._gfnlm_dtype))
    head._gfnlm_float32 = True


def _compiled_decode_step(device: torch.device):
    """``decode_step`` through ``torch.compile``: inductor on the CPU, CUDA graphs on a GPU. One graph per
    batch size and static-cache length (``dynamic=False``), each compiled once per process."""
    import torch._dynamo.config as dynamo

    dynamo.cache_size_limit = max(dynamo.cache_size_limit, COMPILE_CACHE_SHAPES)
    mode = "reduce-overhead" if device.type == "cuda" else None
    return torch.compile(decode_step, dynamic=False, mode=mode)
