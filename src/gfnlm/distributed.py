"""Training on several processes and machines, through Hugging Face accelerate (over torch.distributed).

``gfnlm train`` alone is one process; ``accelerate launch [--cpu] --num_processes N -m gfnlm train ...``
(or a multi-GPU / multi-node / FSDP config, ``examples/accelerate/``) runs N data-parallel copies of
the same loop. Each process draws its own queries and samples (its random stream is derived from
the seed and its rank: rank 0's is the single process's), computes its rewards and loss locally,
and the policy's gradients are averaged by DDP, so one step of N processes is one step of a single
process that accumulates the N micro-batches. Everything the processes must agree on goes through
accelerate's collectives: the policy's gradients (DDP through ``Accelerator.prepare``), each query's
log Z (its gradient averaged as DDP averages, over all ranks with zeros where a rank did not see
the query, and left empty where none did; its first estimate taken from the lowest rank that made one), whether a step is skipped (a non-finite loss anywhere skips it everywhere),
whether to stop (the time limit, read on rank 0), and the logged metrics (reduced over ranks).
"""

from __future__ import annotations

import contextlib
import math
import os
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from gfnlm.config import TrainConfig
from gfnlm.scoring import score_policy
from gfnlm.trajectories import ActionSpace, Trajectories

RANK_SEED_STRIDE = 1_000_003
"""Rank r draws from a generator seeded with seed + r * RANK_SEED_STRIDE (a prime: no two ranks of
nearby seeds share a stream)."""


def make_accelerator(config: TrainConfig, device: torch.device, precision: str, project_dir: Path | None = None):
    """The run's ``Accelerator``: one process, or one of the processes ``accelerate launch`` started.

    Device placement stays ours (the policy's device); collectives time out after ``dist_timeout_s``, so
    that when a rank dies the others stop with an error instead of waiting forever. The policy stores its
    frozen weights in its precision itself; accelerate's mixed precision is used only for float16, whose
    gradients need its loss scaler. ``report_to`` picks accelerate's tracker, writing under ``project_dir``.
    """
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    from accelerate.state import AcceleratorState

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:  # one process: each trainer's own settings (device, precision),
        AcceleratorState._reset_state(reset_partial_state=True)  # not those of an earlier trainer in this process
    timeout = InitProcessGroupKwargs(timeout=timedelta(seconds=config.dist_timeout_s))
    tracker = None if config.report_to == "none" else config.report_to
    return Accelerator(cpu=device.type == "cpu", mixed_precision="fp16" if precision == "fp16" else "no",
                       device_placement=False, kwargs_handlers=[timeout], log_with=tracker,
                       project_dir=str(project_dir) if project_dir is not None else None)


class PolicyScorer(torch.nn.Module):
    """The policy's teacher-forced log P_F [B, T] and log P_⊤ [B, T+1] as one module forward.

    The scorer runs the decoder body and the output head separately (each distinct prompt once, the
    head only at the states reached). Wrapping this module, not the language model, is what lets
    DDP (or FSDP) see exactly one forward per backward.
    """

    def __init__(self, model, space: ActionSpace):
        super().__init__()
        self.model, self.space = model, space

    def forward(self, input_ids: Tensor, attention_mask: Tensor, is_action: Tensor, prompt_len: int) -> tuple[Tensor, Tensor]:
        traj = Trajectories(input_ids, attention_mask, is_action, prompt_len, queries=[])
        return score_policy(self.model, traj, self.space)


class Ranks:
    """The run's processes as the trainer sees them: who writes, and the collectives it needs."""

    def __init__(self, accelerator):
        self.accelerator = accelerator
        self.rank, self.world = accelerator.process_index, accelerator.num_processes

    @property
    def writes(self) -> bool:
        """Only rank 0 writes metrics, checkpoints and the progress bar."""
        return self.rank == 0

    def no_sync(self, module, skip: bool) -> contextlib.AbstractContextManager:
        """DDP's gradient all-reduce held back for a micro-batch that is not the step's last."""
        return self.accelerator.no_sync(module) if skip and self.world > 1 else contextlib.nullcontext()

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` holds on any rank (the same answer everywhere)."""
        if self.world == 1:
            return flag
        value = torch.tensor([float(flag)], device=self.accelerator.device)
        return bool(self.accelerator.reduce(value, "max").item() > 0)

    def from_rank0(self, flag: bool) -> bool:
        """Rank 0's ``flag`` on every rank (e.g. its clock's verdict on the time limit)."""
        if self.world == 1:
            return flag
        from accelerate.utils import broadcast_object_list

        return bool(broadcast_object_list([flag], from_process=0)[0])

    def sum_sparse_grads(self, params: list[torch.nn.Parameter]) -> None:
        """Each parameter's gradient summed over the ranks and divided by their number, as DDP averages,
        and None where no rank has one, so that Adam keeps skipping parameters no rank used (log Z of
        queries absent from the step)."""
        if self.world == 1 or not params:
            return
        grads = torch.stack([p.grad.reshape(()) if p.grad is not None else p.new_zeros(()) for p in params])
        present = torch.tensor([p.grad is not None for p in params], dtype=grads.dtype, device=grads.device)
        summed = self.accelerator.reduce(torch.cat([grads, present]).to(self.accelerator.device), "sum").to(grads.device)
        for p, grad, count in zip(params, summed[: len(params)], summed[len(params) :]):
            p.grad = (grad / self.world).reshape(p.shape) if count > 0 else None

    def first_estimates(self, estimates: Tensor) -> Tensor:
        """[Q] per-query values, NaN where this rank has none -> the lowest rank's value for each query
        (NaN where no rank has one): what one process would have set first, micro-batch by micro-batch."""
        if self.world == 1:
            return estimates
        every = self.accelerator.gather(estimates[None].to(self.accelerator.device)).to(estimates.device)  # [W, Q]
        first = torch.full_like(estimates, math.nan)
        for row in every.flip(0):  # the lowest rank last, so it wins
            first = torch.where(torch.isnan(row), first, row)
        return first

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order (on every rank)."""
        if self.world == 1:
            return [obj]
        from accelerate.utils import gather_object

        return gather_object([obj])

    def wait(self) -> None:
        if self.world > 1:
            self.accelerator.wait_for_everyone()


def reduce_metrics(per_rank: list[dict], samples: list[int], seconds: list[float]) -> dict:
    """One step's metrics over all ranks: maxima of ``*_max``, sums of ``buffer_size``, means of the rest
    (a value every rank shares, such as the step, as it is); the job's samples/s is all ranks' samples
    over the slowest rank's time."""
    out: dict[str, Any] = {}
    for key, value in per_rank[0].items():
        values = [row[key] for row in per_rank]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or all(v == value for v in values):
            out[key] = value if key != "skipped" else any(values)
        elif key.endswith("_max"):
            out[key] = max(values)
        elif key == "buffer_size":
            out[key] = sum(values)
        else:
            out[key] = sum(values) / len(values)
    out["samples_per_s"] = sum(samples) / max(seconds)
    out["step_time_s"] = max(seconds)
    return out
