"""End to end: a tiny LM trained by the real trainer matches a known target distribution exactly.

The target lives on all sequences of at most 3 tokens from {0, 1, 2} (40 sequences); the
policy's distribution over terminal sequences is enumerated exactly, not sampled.
"""

import itertools

import pytest
import torch
from conftest import needs_cuda, make_tiny_lm

from gfnlm.config import TrainConfig
from gfnlm.policy import Policy, native_bf16
from gfnlm.scoring import score_policy, terminal_log_prob
from gfnlm.gflownet import GFlowNetTrainer
from gfnlm.trajectories import ActionSpace, Query, TrajectoryRecord, Trajectories

STOP, ALLOWED, MAX_LEN = 2, (3, 4, 5), 3
SEQUENCES = [s for n in range(MAX_LEN + 1) for s in itertools.product(ALLOWED, repeat=n)]
QUERY = Query("7")


class TableReward:
    """log R of every sequence from a fixed random table; every prefix is itself a sequence."""

    def __init__(self, seed: int, min_len: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.log_r = dict(zip(SEQUENCES, (1.5 * torch.randn(len(SEQUENCES), generator=g)).tolist()))
        self.min_len = min_len
        self.calls = 0

    def __call__(self, traj: Trajectories) -> torch.Tensor:
        self.calls += 1
        out = torch.zeros(len(traj), traj.horizon + 1)
        for b, record in enumerate(traj.records()):
            for i in range(record.length + 1):
                out[b, i] = self.log_r[tuple(record.generated_ids[:i])]
        return out

    def target(self) -> torch.Tensor:
        reachable = torch.tensor([len(s) >= self.min_len for s in SEQUENCES])
        log_r = torch.tensor([self.log_r[s] for s in SEQUENCES])
        return torch.where(reachable, log_r, float("-inf")).softmax(0)


def exact_policy_distribution(model, space) -> torch.Tensor:
    records = [TrajectoryRecord(QUERY, [1, 10], list(s), [True] * len(s)) for s in SEQUENCES]
    traj = Trajectories.from_records(records, pad_token_id=0, device=model.device)
    with torch.no_grad():
        return terminal_log_prob(*score_policy(model, traj, space), traj.lengths).exp()


@pytest.mark.parametrize("loss, min_len, device, lora_rank", [
    ("subtb", 0, "cpu", 0), ("tb", 0, "cpu", 0), ("subtb", 1, "cpu", 0), ("subtb", 0, "cpu", 16),
    pytest.param("subtb", 0, "cuda", 0, marks=needs_cuda)])
def test_trained_policy_matches_target(tokenizer, loss, min_len, device, lora_rank):
    """min_len=1: the empty sequence is impossible, and the target is renormalised without it. With LoRA the
    default precision applies: bfloat16 base weights where the CPU computes it natively, as in real runs."""
    space = ActionSpace(stop_token_ids=(STOP,), max_len=MAX_LEN, min_len=min_len, allowed_token_ids=ALLOWED)
    reward = TableReward(seed=1, min_len=min_len)
    config = TrainConfig(
        steps=300, queries_per_step=1, samples_per_query=32, lr=3e-3, lora_rank=lora_rank, lora_alpha=2 * lora_rank,
        lr_decay="constant" if lora_rank == 0 else "cosine", loss=loss, log_z_lr=0.1,
        p_replay=0.2, p_tempered=0.4, pf_temp_min=1.0, pf_temp_max=2.0, max_grad_norm=10.0, device=device,
        progress=False, seed=0,
    )
    trainer = GFlowNetTrainer(Policy.from_config(make_tiny_lm(seed=3), tokenizer, space, config), reward, [QUERY], config)
    expected_precision = "bf16" if lora_rank and native_bf16(torch.device(device)) else "no"
    assert trainer.policy.precision == expected_precision
    target = reward.target().to(device)
    before = exact_policy_distribution(trainer.model, space)
    assert before.sum().item() == pytest.approx(1.0, abs=1e-5)  # the enumeration covers every outcome
    tv_before = 0.5 * (before - target).abs().sum().item()

    trainer.train()
    after = exact_policy_distribution(trainer.model, space)
    tv_after = 0.5 * (after - target).abs().sum().item()
    assert after.sum().item() == pytest.approx(1.0, abs=1e-5)
    assert tv_before > 0.3, tv_before  # the test starts far from the target
    assert tv_after <= 0.05, (tv_before, tv_after)
