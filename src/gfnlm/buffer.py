"""Replay buffer: per query, the highest-reward distinct trajectories seen so far.

Replayed trajectories are off-policy samples, which the balance losses accept as they are; their
rewards are recomputed with the current reward temperature when they are trained on, so the
buffer keeps the untempered terminal log-reward only to rank and to weight them.

Replay draws are uniform, proportional to the reward, or by *deficit*: proportional to
R(x) / q(τ), the reward over the policy's probability of the trajectory. The caller passes
q(τ) of the query's stored trajectories under the current policy with each draw; the buffer keeps
none, since a value kept from an earlier step goes stale exactly when it matters, after the
policy has lost an outcome it once liked, and then nothing would replay it. A perfect sampler has q(τ) = R(x) / Z, so deficits are
equal and replay is uniform; an outcome the policy has all but lost (a valid integer it stopped
writing, say) has a deficit orders of magnitude above the rest and is replayed until it gets its
share back. On-policy samples rarely reach such outcomes again, which is why replay must.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Sequence, get_args

import torch

from gfnlm.config import BufferSampling
from gfnlm.trajectories import Query, TrajectoryRecord


@dataclass
class _Entry:
    log_reward: float
    prompt_ids: list[int]
    generated_ids: list[int]
    is_action: list[bool]


SAMPLING: tuple[str, ...] = get_args(BufferSampling)


class ReplayBuffer:
    """Keeps up to ``capacity`` trajectories per query, ranked by terminal log-reward.

    ``sampling="uniform"`` draws stored trajectories uniformly; ``"reward"`` draws them with
    probability proportional to their reward (softmax of the log-rewards); ``"deficit"`` with
    probability proportional to R / q (softmax of log R - log q; see the module docstring).
    """

    def __init__(self, capacity: int, sampling: BufferSampling = "uniform"):
        if capacity < 1:
            raise ValueError(f"buffer capacity must be at least 1, got {capacity}")
        if sampling not in SAMPLING:
            raise ValueError(f"buffer sampling must be one of {SAMPLING}, got {sampling!r}")
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

    def records(self, query: Query) -> list[TrajectoryRecord]:
        """Every stored trajectory of ``query``, best first."""
        entries = self._entries.get(query.key, [])
        return [TrajectoryRecord(query, e.prompt_ids, e.generated_ids, e.is_action) for e in entries]

    def sample(self, query: Query, n: int, generator: torch.Generator | None = None,
               log_probs: Sequence[float] | None = None) -> list[TrajectoryRecord]:
        """``n`` stored trajectories of ``query``, drawn with replacement.

        ``log_probs``: the policy's current log q(τ ⊤) of each trajectory of ``records(query)``,
        in that order; deficit sampling needs them, the others ignore them.
        """
        entries = self._entries.get(query.key)
        if not entries:
            raise KeyError(f"the replay buffer holds nothing for query {query.prompt!r}")
        log_rewards = torch.tensor([e.log_reward for e in entries], dtype=torch.float64)
        if self.sampling == "deficit":
            if log_probs is None or len(log_probs) != len(entries):
                raise ValueError(f"deficit sampling needs the policy's log q of all {len(entries)} stored trajectories, "
                                 f"got {None if log_probs is None else len(log_probs)}")
            log_weights = log_rewards - torch.tensor(log_probs, dtype=torch.float64)
        else:
            log_weights = log_rewards if self.sampling == "reward" else torch.zeros_like(log_rewards)
        picks = torch.multinomial(log_weights.softmax(0), n, replacement=True, generator=generator).tolist()
        stored = self.records(query)
        return [stored[i] for i in picks]

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
            key: [_Entry(float(row[0]), list(row[1]), list(row[2]), [bool(a) for a in row[3]]) for row in rows]
            for key, rows in state["entries"].items()
        }
