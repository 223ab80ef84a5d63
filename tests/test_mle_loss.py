"""The MLE training loss: Gaussian targets over neighbouring bins (`smoothed_token_nll`)."""
import math

import pytest
import torch

from lightning_modules.mle import MLEModule, smoothed_token_nll
from genloc import LocationModelConfig

OPTIM = {"lr": 1e-3, "weight_decay": 0.0, "betas": [0.9, 0.95], "warmup_steps": 0, "min_lr_ratio": 1.0}


def _log_dist(probs_per_step):
    """[1, 4, V] log-distribution from 4 rows of probabilities (0 -> -inf, i.e. masked)."""
    return torch.tensor(probs_per_step, dtype=torch.float64).log()[None]


def test_zero_sigma_is_the_plain_nll():
    log_dist = torch.randn(3, 4, 10).log_softmax(-1)
    tokens = torch.randint(0, 10, (3, 4))
    expected = -log_dist.gather(-1, tokens[..., None]).squeeze(-1)
    assert torch.equal(smoothed_token_nll(log_dist, tokens, 0.0), expected)


def test_hand_computed_gaussian_targets_skip_masked_tokens():
    # step 0: p = (0.5, 0.25, 0.25, 0) over bins 0..3, bin 3 masked; true bin 0, sigma 1:
    # weights exp(-k^2/2) on the allowed bins k = 0, 1, 2 -> (1, e^-0.5, e^-2) / Z.
    probs = [[0.5, 0.25, 0.25, 0.0]] + [[0.25] * 4] * 3
    log_dist = _log_dist(probs)
    tokens = torch.tensor([[0, 1, 2, 3]])
    loss = smoothed_token_nll(log_dist, tokens, 1.0)[0]
    w = [1.0, math.exp(-0.5), math.exp(-2.0)]
    z = sum(w)
    expected0 = -(w[0] * math.log(0.5) + (w[1] + w[2]) * math.log(0.25)) / z
    assert loss[0].item() == pytest.approx(expected0, rel=1e-12)
    assert loss[1:].tolist() == pytest.approx([math.log(4)] * 3, rel=1e-12)  # uniform rows: log V
    assert torch.isfinite(loss).all()


def test_near_misses_cost_less_than_far_misses():
    """The point of the Gaussian targets: one-hot NLL ranks every wrong bin alike, these do not."""
    tokens = torch.tensor([[10, 10, 10, 10]])
    near = torch.zeros(1, 4, 32).index_fill_(-1, torch.tensor([11]), 10.0).log_softmax(-1)  # mass on bin 11
    far = torch.zeros(1, 4, 32).index_fill_(-1, torch.tensor([25]), 10.0).log_softmax(-1)   # mass on bin 25
    plain_near, plain_far = (smoothed_token_nll(d, tokens, 0.0).sum() for d in (near, far))
    assert plain_near.item() == pytest.approx(plain_far.item())
    assert smoothed_token_nll(near, tokens, 1.0).sum() < smoothed_token_nll(far, tokens, 1.0).sum() - 4.0


def test_training_loss_uses_gaussian_targets_and_validation_the_plain_nll():
    torch.manual_seed(0)
    config = LocationModelConfig.preset("tiny").to_dict()
    module = MLEModule(model_config=config, optim=OPTIM, label_sigma_bins=1.0)
    batch = {"key": ["a", "b"], "image": torch.rand(2, 3, 64, 64), "category": ["car", "bird"],
             "positives": [torch.tensor([[0.1, 0.5, 0.4, 0.7]]),
                           torch.tensor([[0.2, 0.1, 0.3, 0.2], [0.6, 0.1, 0.7, 0.15]])]}
    module.train()
    nll, loss, _, n_boxes = module.box_nll(batch)
    assert n_boxes == 3 and loss.item() != pytest.approx(nll.item(), rel=1e-3)
    module.eval()
    nll_eval, loss_eval, _, _ = module.box_nll(batch)
    assert loss_eval.item() == nll_eval.item()
    with pytest.raises(ValueError, match="label_sigma_bins"):
        MLEModule(model_config=config, optim=OPTIM, label_sigma_bins=-1.0)
