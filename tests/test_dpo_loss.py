"""dpo_loss against numbers computed by hand (math module), per loss type."""
import math

import pytest
import torch

from lightning_modules.dpo_loss import dpo_loss

# two pairs: h = (pc - rc) - (pr - rr) = (-2 - -3) - (-5 - -4) = 2 and (-1 - -1) - (-2 - -1.5) = 0.5
PC, PR = torch.tensor([-2.0, -1.0]), torch.tensor([-5.0, -2.0])
RC, RR = torch.tensor([-3.0, -1.0]), torch.tensor([-4.0, -1.5])
H = [2.0, 0.5]


def _log_sigmoid(x):
    return -math.log1p(math.exp(-x))


def test_sigmoid_matches_hand_values():
    beta = 0.5
    losses, chosen, rejected = dpo_loss(PC, PR, RC, RR, beta)
    expected = [-_log_sigmoid(beta * h) for h in H]  # 1.0 -> 0.31326, 0.25 -> 0.57593
    assert losses.tolist() == pytest.approx(expected, abs=1e-6)
    assert losses.tolist() == pytest.approx([0.313262, 0.575930], abs=1e-5)
    assert chosen.tolist() == pytest.approx([0.5 * 1.0, 0.5 * 0.0])
    assert rejected.tolist() == pytest.approx([0.5 * -1.0, 0.5 * -0.5])


def test_sigmoid_label_smoothing_matches_hand_values():
    beta, eps = 0.5, 0.2
    losses, _, _ = dpo_loss(PC, PR, RC, RR, beta, "sigmoid", label_smoothing=eps)
    expected = [-(1 - eps) * _log_sigmoid(beta * h) - eps * _log_sigmoid(-beta * h) for h in H]
    assert losses.tolist() == pytest.approx(expected, abs=1e-6)
    # smoothing penalises confident margins: the loss grows with eps for h > 0
    assert losses[0] > dpo_loss(PC, PR, RC, RR, beta)[0][0]


def test_ipo_matches_hand_values():
    beta = 0.25  # target margin 1 / (2 beta) = 2
    losses, _, _ = dpo_loss(PC, PR, RC, RR, beta, "ipo")
    assert losses.tolist() == pytest.approx([(2.0 - 2.0) ** 2, (0.5 - 2.0) ** 2])


def test_hinge_matches_hand_values():
    beta = 0.8
    losses, _, _ = dpo_loss(PC, PR, RC, RR, beta, "hinge")
    assert losses.tolist() == pytest.approx([max(0.0, 1 - 0.8 * 2.0), max(0.0, 1 - 0.8 * 0.5)])  # [0, 0.6]


@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_policy_equal_reference_gives_log2_and_zero_rewards(beta):
    logps = torch.tensor([-7.0, -3.5, -12.0])
    other = torch.tensor([-6.0, -9.0, -1.0])
    losses, chosen, rejected = dpo_loss(logps, other, logps.clone(), other.clone(), beta)
    assert losses.tolist() == pytest.approx([math.log(2)] * 3)
    assert chosen.abs().max() == 0 and rejected.abs().max() == 0


def test_rewards_are_detached_and_loss_has_gradient_direction():
    pc = torch.tensor([-2.0], requires_grad=True)
    pr = torch.tensor([-2.0], requires_grad=True)
    losses, chosen, rejected = dpo_loss(pc, pr, torch.tensor([-2.0]), torch.tensor([-2.0]), 0.1)
    assert not chosen.requires_grad and not rejected.requires_grad
    losses.sum().backward()
    # descending the loss raises the chosen log-prob and lowers the rejected one, by beta/2 each
    assert pc.grad.item() == pytest.approx(-0.05) and pr.grad.item() == pytest.approx(0.05)


@pytest.mark.parametrize("kwargs", [dict(loss_type="kto"), dict(beta=0.0), dict(label_smoothing=0.5),
                                    dict(loss_type="ipo", label_smoothing=0.1)])
def test_invalid_settings_raise(kwargs):
    args = dict(beta=0.1) | kwargs
    with pytest.raises(ValueError):
        dpo_loss(PC, PR, RC, RR, **args)
