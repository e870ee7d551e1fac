"""What each process of ``torchrun --nproc_per_node N tests/distributed_worker.py MODE OUT`` does
(tests/test_distributed.py). Every mode builds the same tiny model and queries on every rank.

* ``step``: one GFlowNet step on fixed micro-batches (rank r's from ``fixed_batch(r)``); each rank saves its
  trainable parameters and log Z to OUT/rank{r}.pt.
* ``train STEPS``: the real trainer for STEPS steps into OUT (resuming when OUT has checkpoints); each rank saves
  its trainable parameters and log Z to OUT/rank{r}.pt.
* ``exact``: train to the known target of test_exactness (for two queries, one a rank at a time); rank 0
  writes each query's total variation to OUT/tv.json.
* ``crash``: rank 1 fails at its first step; rank 0 must stop with an error, not wait forever.
* ``one-query``: a run with fewer training queries than processes, refused.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from conftest import make_char_tokenizer, make_tiny_lm  # noqa: E402

from gfnlm.config import TrainConfig  # noqa: E402
from gfnlm.policy import Policy  # noqa: E402
from gfnlm.rewards import TextReward  # noqa: E402
from gfnlm.gflownet import GFlowNetTrainer  # noqa: E402
from gfnlm.trajectories import ActionSpace, Query, TrajectoryRecord, Trajectories  # noqa: E402

QUERIES = [Query("1"), Query("2 "), Query("3-"), Query("4+4")]
SPACE = ActionSpace(stop_token_ids=(2,), max_len=4, min_len=1, allowed_token_ids=tuple(range(3, 16)))


def reward_fn(texts, queries):
    """log R: prefer texts of 2 characters with many "7"s; a finite floor everywhere."""
    return [-abs(len(t) - 2) + t.count("7") for t in texts]


def make_trainer(output_dir=None, **settings) -> GFlowNetTrainer:
    tokenizer = make_char_tokenizer()
    defaults = dict(steps=1, queries_per_step=2, samples_per_query=3, lr=1e-2, lora_rank=4, log_z_lr=0.2,
                    log_z_init="estimate", progress=False, save_every=2, device="cpu", dist_timeout_s=20.0)
    config = TrainConfig(**(defaults | settings))
    policy = Policy.from_config(make_tiny_lm(seed=1), tokenizer, SPACE, config)
    return GFlowNetTrainer(policy, TextReward(reward_fn, tokenizer), QUERIES, config, output_dir=output_dir)


def fixed_trajectories(trainer: GFlowNetTrainer, rank: int) -> tuple[Trajectories, torch.Tensor]:
    """Rank ``rank``'s micro-batch: fixed trajectories (queries 0-1 on rank 0, 1-3 on rank 1), ragged lengths."""
    prompts = trainer.policy.tokenizer([q.prompt for q in QUERIES])["input_ids"]
    rows = [(0, [5, 7]), (1, [9, 9, 4]), (0, [7])] if rank == 0 else [(1, [7, 7, 7, 7]), (3, [4]), (2, [8, 3])]
    records = [TrajectoryRecord(QUERIES[q], prompts[q], z, [True] * len(z)) for q, z in rows]
    traj = Trajectories.from_records(records, trainer.pad_id, trainer.device)
    return traj, torch.ones(len(records), dtype=torch.bool)


def trained_state(trainer: GFlowNetTrainer) -> dict:
    params = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    return {"params": params, "log_z": trainer.log_z.as_tensor().clone(), "ready": trainer.log_z_ready.clone()}


def main() -> None:
    mode, out = sys.argv[1], Path(sys.argv[2])
    if mode == "step":
        trainer = make_trainer()
        rank = trainer.ranks.rank
        trainer.draw_trajectories = lambda: fixed_trajectories(trainer, rank)
        trainer.train()
        torch.save(trained_state(trainer), out / f"rank{rank}.pt")
    elif mode == "train":
        trainer = make_trainer(out, steps=int(sys.argv[3]), samples_per_query=4, p_replay=0.3)
        trainer.train(resume=trainer.latest_checkpoint() is not None)
        torch.save(trained_state(trainer), out / f"rank{trainer.ranks.rank}.pt")
    elif mode == "exact":
        from test_exactness import SEQUENCES, TableReward

        from gfnlm.scoring import score_policy, terminal_log_prob

        space = ActionSpace(stop_token_ids=(2,), max_len=3, allowed_token_ids=(3, 4, 5))
        reward = TableReward(seed=1)  # the same target for both queries
        queries = [Query("7"), Query("8")]
        config = TrainConfig(steps=300, queries_per_step=1, samples_per_query=32, lr=3e-3, lora_rank=0, log_z_lr=0.1,
                             p_replay=0.2, p_tempered=0.4, pf_temp_min=1.0, pf_temp_max=2.0, max_grad_norm=10.0,
                             device="cpu", progress=False, seed=0)
        policy = Policy.from_config(make_tiny_lm(seed=3), make_char_tokenizer(), space, config)
        trainer = GFlowNetTrainer(policy, reward, queries, config)
        trainer.train()
        if trainer.ranks.writes:
            tvs = []
            for query in queries:
                prompt = policy.tokenizer(query.prompt)["input_ids"]
                records = [TrajectoryRecord(query, prompt, list(z), [True] * len(z)) for z in SEQUENCES]
                traj = Trajectories.from_records(records, trainer.pad_id)
                with torch.no_grad():
                    probs = terminal_log_prob(*score_policy(trainer.model, traj, space), traj.lengths).exp()
                tvs.append(0.5 * (probs - reward.target()).abs().sum().item())
            (out / "tv.json").write_text(json.dumps({"tv": tvs}))
    elif mode == "crash":
        trainer = make_trainer(steps=3)
        if trainer.ranks.rank == 1:
            raise RuntimeError("rank 1 fails on purpose")
        trainer.train()
    elif mode == "one-query":
        tokenizer = make_char_tokenizer()
        config = TrainConfig(device="cpu")
        GFlowNetTrainer(Policy.from_config(make_tiny_lm(), tokenizer, SPACE, config), TextReward(reward_fn, tokenizer),
                        QUERIES[:1], config)
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main()
