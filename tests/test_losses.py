"""The losses against float64 brute-force loops written straight from paper Eq. 3."""

import math

import pytest
import torch

from gfnlm.losses import detailed_balance_loss, modified_subtb_loss, trajectory_balance_loss


def random_inputs(seed: int, batch: int = 5, horizon: int = 7):
    g = torch.Generator().manual_seed(seed)
    log_pf = -torch.rand(batch, horizon, generator=g, dtype=torch.float64) * 3
    log_pterm = -torch.rand(batch, horizon + 1, generator=g, dtype=torch.float64) * 3
    log_r = torch.randn(batch, horizon + 1, generator=g, dtype=torch.float64) * 4
    lengths = torch.tensor([0, 1, 3, horizon, 5][:batch])
    # poison everything past each trajectory's length
    for b, n in enumerate(lengths.tolist()):
        log_pf[b, n:] = float("nan")
        log_pterm[b, n + 1 :] = float("inf")
        log_r[b, n + 1 :] = float("-inf")
    return log_pf, log_pterm, log_r, lengths


def brute_force_subtb(log_pf, log_pterm, log_r, lengths, lam):
    total, weights = 0.0, 0.0
    for b, n in enumerate(lengths.tolist()):
        for i in range(n + 1):
            for j in range(i + 1, n + 1):
                res = log_r[b, i] + sum(log_pf[b, k] for k in range(i, j)) + log_pterm[b, j]
                res = res - log_r[b, j] - log_pterm[b, i]
                w = lam ** (j - i - 1)
                total += w * res**2
                weights += w
    return total / weights


@pytest.mark.parametrize("lam", [1.0, 0.9])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_subtb_matches_brute_force_with_nan_padding(lam, seed):
    log_pf, log_pterm, log_r, lengths = random_inputs(seed)
    for t in (log_pf, log_pterm, log_r):
        t.requires_grad_(True)
    loss = modified_subtb_loss(log_pf, log_pterm, log_r, lengths, subtb_lambda=lam)
    expected = brute_force_subtb(log_pf.detach(), log_pterm.detach(), log_r.detach(), lengths, lam)
    assert math.isfinite(loss.item())
    assert loss.item() == pytest.approx(float(expected), abs=1e-6, rel=1e-9)

    loss.backward()
    for t in (log_pf, log_pterm, log_r):
        assert torch.isfinite(t.grad).all()
    # padding gets exactly zero gradient; valid entries get some
    for b, n in enumerate(lengths.tolist()):
        assert (log_pf.grad[b, n:] == 0).all() and (log_r.grad[b, n + 1 :] == 0).all()
    assert log_pf.grad[3, :].abs().sum() > 0


def test_subtb_gradient_matches_brute_force():
    log_pf, log_pterm, log_r, lengths = random_inputs(3)
    clean = [torch.nan_to_num(t, nan=0.0, posinf=0.0, neginf=0.0).requires_grad_(True) for t in (log_pf, log_pterm, log_r)]
    poisoned = [t.clone().requires_grad_(True) for t in (log_pf, log_pterm, log_r)]
    brute_force_subtb(*clean, lengths, 0.9).backward()
    modified_subtb_loss(*poisoned, lengths, subtb_lambda=0.9).backward()
    for c, p in zip(clean, poisoned):
        torch.testing.assert_close(p.grad, c.grad, atol=1e-9, rtol=1e-7)


def test_subtb_is_zero_exactly_when_balanced():
    # q(z) and q(⊤|s) built so that q(z_1:i ⊤) = R(z_1:i ⊤) / Z for every prefix
    torch.manual_seed(0)
    horizon = 4
    log_pterm = torch.log(torch.rand(2, horizon + 1))
    log_pf = torch.log(torch.rand(2, horizon))
    prefix = torch.cat([torch.zeros(2, 1), log_pf.cumsum(1)], 1)
    log_r = prefix + log_pterm + 2.5  # log Z = 2.5
    lengths = torch.tensor([4, 2])
    assert modified_subtb_loss(log_pf, log_pterm, log_r, lengths).item() == pytest.approx(0.0, abs=1e-10)
    log_r[0, 2] += 1.0
    assert modified_subtb_loss(log_pf, log_pterm, log_r, lengths).item() > 0.01


def test_trajectory_balance_matches_loop():
    log_pf, log_pterm, log_r, lengths = random_inputs(4)
    log_z = torch.randn(5, dtype=torch.float64)
    loss = trajectory_balance_loss(log_pf, log_pterm, log_r, lengths, log_z)
    expected = 0.0
    for b, n in enumerate(lengths.tolist()):
        expected += (log_z[b] + log_pf[b, :n].sum() + log_pterm[b, n] - log_r[b, n]) ** 2
    assert loss.item() == pytest.approx(float(expected) / 5, abs=1e-9)


def test_detailed_balance_matches_loop():
    log_pf, log_pterm, log_r, lengths = random_inputs(5)
    loss = detailed_balance_loss(log_pf, log_pterm, log_r, lengths)
    total, count = 0.0, 0
    for b, n in enumerate(lengths.tolist()):
        for i in range(n):
            total += (log_r[b, i] + log_pf[b, i] + log_pterm[b, i + 1] - log_r[b, i + 1] - log_pterm[b, i]) ** 2
            count += 1
    assert loss.item() == pytest.approx(float(total) / count, abs=1e-9)


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match="log_pterm"):
        modified_subtb_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 4), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="lengths"):
        modified_subtb_loss(torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(2, 4), torch.tensor([1, 9]))


def test_subtb_with_min_len_uses_log_z_for_the_first_state():
    """No stop before min_len: s_0's flow is log Z, states 1..min_len-1 are not endpoints."""
    log_pf, log_pterm, log_r, _ = (torch.nan_to_num(t, nan=0.0, posinf=0.0, neginf=0.0) for t in random_inputs(6))
    lengths = torch.tensor([2, 3, 7, 5, 4])
    min_len = 2
    log_pterm[:, 1:min_len] = float("-inf")  # the policy cannot stop there
    log_z = torch.randn(5, dtype=torch.float64, requires_grad=True)
    loss = modified_subtb_loss(log_pf, log_pterm, log_r, lengths, 0.9, log_z=log_z, min_len=min_len)
    total, weights = 0.0, 0.0
    for b, n in enumerate(lengths.tolist()):
        def u(i):
            if i == 0:
                return log_z[b]
            return log_r[b, i] - log_pterm[b, i] - log_pf[b, :i].sum()
        for i in [0, *range(min_len, n + 1)]:
            for j in range(max(i + 1, min_len), n + 1):
                w = 0.9 ** (j - i - 1)
                total = total + w * (u(i) - u(j)) ** 2
                weights += w
    assert loss.item() == pytest.approx((total / weights).item(), abs=1e-9)
    loss.backward()
    assert torch.isfinite(log_z.grad).all() and log_z.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="log_z"):
        modified_subtb_loss(log_pf, log_pterm, log_r, lengths, min_len=min_len)
