"""Replay buffer: per query, the highest-reward distinct trajectories seen so far.

Replayed trajectories are off-policy samples, which the balance losses accept as they are; their
rewards are recomputed with the current reward temperature when they are trained on, so the
buffer keeps the untempered terminal log-reward only to rank and to weight them.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Literal, Sequence

import torch

from gfnlm.trajectories import Query, TrajectoryRecord


@dataclass
class _Entry:
    log_reward: float
    prompt_ids: list[int]
    generated_ids: list[int]
    is_action: list[bool]


class ReplayBuffer:
    """Keeps up to ``capacity`` trajectories per query, ranked by terminal log-reward.

    ``sampling="uniform"`` draws stored trajectories uniformly; ``"reward"`` draws them with
    probability proportional to their reward (softmax of the log-rewards).
    """

    def __init__(self, capacity: int, sampling: Literal["uniform", "reward"] = "uniform"):
        if capacity < 1:
            raise ValueError(f"buffer capacity must be at least 1, got {capacity}")
        if sampling not in ("uniform", "reward"):
            raise ValueError(f"buffer sampling must be 'uniform' or 'reward', got {sampling!r}")
        self.capacity, self.sampling = capacity, sampling
        self._entries: dict[str, list[_Entry]] = {}  # sorted by decreasing log_reward

    def __len__(self) -> int:
        return sum(map(len, self._entries.values()))

    def size(self, query: Query) -> int:
        return len(self._entries.get(query.key, []))

    def add(self, records: Sequence[TrajectoryRecord], log_rewards: Sequence[float]) -> int:
        """Insert trajectories unless already stored or worse than a full buffer's worst; returns how many."""
        added = 0
        for record, log_reward in zip(records, log_rewards, strict=True):
            entries = self._entries.setdefault(record.query.key, [])
            if any(e.generated_ids == record.generated_ids for e in entries):
                continue
            if len(entries) >= self.capacity and log_reward <= entries[-1].log_reward:
                continue
            entry = _Entry(float(log_reward), list(record.prompt_ids), list(record.generated_ids), list(record.is_action))
            keys = [-e.log_reward for e in entries]
            entries.insert(bisect.bisect_right(keys, -entry.log_reward), entry)
            del entries[self.capacity :]
            added += 1
        return added

    def sample(self, query: Query, n: int, generator: torch.Generator | None = None) -> list[TrajectoryRecord]:
        """``n`` stored trajectories of ``query``, drawn with replacement."""
        entries = self._entries.get(query.key)
        if not entries:
            raise KeyError(f"the replay buffer holds nothing for query {query.prompt!r}")
        if self.sampling == "reward":
            weights = torch.tensor([e.log_reward for e in entries], dtype=torch.float64).softmax(0)
        else:
            weights = torch.ones(len(entries), dtype=torch.float64)
        picks = torch.multinomial(weights, n, replacement=True, generator=generator).tolist()
        return [
            TrajectoryRecord(query, entries[i].prompt_ids, entries[i].generated_ids, entries[i].is_action) for i in picks
        ]

    def best(self, query: Query, k: int = 1) -> list[tuple[float, TrajectoryRecord]]:
        """The ``k`` highest-reward trajectories of ``query`` with their log-rewards."""
        return [
            (e.log_reward, TrajectoryRecord(query, e.prompt_ids, e.generated_ids, e.is_action))
            for e in self._entries.get(query.key, [])[:k]
        ]

    def state_dict(self) -> dict:
        """Plain Python containers only, so checkpoints load with ``torch.load(weights_only=True)``."""
        return {
            "capacity": self.capacity,
            "sampling": self.sampling,
            "entries": {
                key: [[e.log_reward, e.prompt_ids, e.generated_ids, e.is_action] for e in entries]
                for key, entries in self._entries.items()
            },
        }

    def load_state_dict(self, state: dict) -> None:
        self.capacity, self.sampling = int(state["capacity"]), state["sampling"]
        self._entries = {
            key: [_Entry(float(r), list(p), list(g), [bool(a) for a in act]) for r, p, g, act in rows]
            for key, rows in state["entries"].items()
        }
