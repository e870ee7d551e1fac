import pytest
import torch

from gfnlm.buffer import ReplayBuffer
from gfnlm.trajectories import Query, TrajectoryRecord

Q1, Q2 = Query("a"), Query("b", target="y")


def rec(query, gen):
    return TrajectoryRecord(query, [1], list(gen), [True] * len(gen))


def test_keeps_the_best_distinct_per_query():
    buf = ReplayBuffer(capacity=2)
    assert buf.add([rec(Q1, [3]), rec(Q1, [4]), rec(Q1, [3]), rec(Q2, [5])], [-1.0, -3.0, -0.5, -9.0]) == 3
    assert buf.size(Q1) == 2 and buf.size(Q2) == 1  # the duplicate [3] was skipped
    assert buf.add([rec(Q1, [6])], [-4.0]) == 0  # worse than the full buffer's worst
    assert buf.add([rec(Q1, [7])], [-2.0]) == 1  # evicts [4]
    assert [(r, x.generated_ids) for r, x in buf.best(Q1, 5)] == [(-1.0, [3]), (-2.0, [7])]


def test_reward_proportional_sampling():
    buf = ReplayBuffer(capacity=4, sampling="reward")
    buf.add([rec(Q1, [3]), rec(Q1, [4])], [0.0, -2.0])  # weights e^0 : e^-2
    draws = buf.sample(Q1, 4000, torch.Generator().manual_seed(0))
    share = sum(d.generated_ids == [3] for d in draws) / 4000
    assert abs(share - 1 / (1 + torch.e**-2)) < 0.03
    uniform = ReplayBuffer(capacity=4)
    uniform.add([rec(Q1, [3]), rec(Q1, [4])], [0.0, -2.0])
    share = sum(d.generated_ids == [3] for d in uniform.sample(Q1, 4000, torch.Generator().manual_seed(0))) / 4000
    assert abs(share - 0.5) < 0.03
    with pytest.raises(KeyError, match="nothing"):
        buf.sample(Q2, 1)


def test_deficit_sampling_replays_what_the_policy_undersamples():
    buf = ReplayBuffer(capacity=4, sampling="deficit")
    buf.add([rec(Q1, [3]), rec(Q1, [4]), rec(Q1, [5])], [-1.0, -1.0, -1.0])
    generator = torch.Generator().manual_seed(0)
    draws = buf.sample(Q1, 6000, generator, log_probs=[-1.0, -3.0, -1.0])  # R/q: e^0 : e^2 : e^0
    share = {g: sum(tuple(d.generated_ids) == g for d in draws) / 6000 for g in [(3,), (4,), (5,)]}
    expected = torch.tensor([0.0, 2.0, 0.0]).softmax(0).tolist()
    assert share == pytest.approx(dict(zip([(3,), (4,), (5,)], expected)), abs=0.03)
    draws = buf.sample(Q1, 6000, generator, log_probs=[-1.0, -1.0, -1.0])  # the policy caught up: uniform again
    assert sum(d.generated_ids == [4] for d in draws) / 6000 == pytest.approx(1 / 3, abs=0.03)
    with pytest.raises(ValueError, match="log q of all 3 stored trajectories, got 2"):
        buf.sample(Q1, 1, generator, log_probs=[-1.0, -1.0])
    with pytest.raises(ValueError, match="got None"):
        buf.sample(Q1, 1, generator)


def test_state_dict_round_trip(tmp_path):
    buf = ReplayBuffer(capacity=3, sampling="deficit")
    buf.add([rec(Q1, [3, 4]), rec(Q2, [5])], [-1.0, -2.0])
    torch.save(buf.state_dict(), tmp_path / "b.pt")
    other = ReplayBuffer(capacity=1)
    other.load_state_dict(torch.load(tmp_path / "b.pt", weights_only=True))
    assert other.capacity == 3 and other.sampling == "deficit"
    assert [x.generated_ids for _, x in other.best(Q1)] == [[3, 4]] and other.size(Q2) == 1
    assert other.state_dict() == buf.state_dict()
