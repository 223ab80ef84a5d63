"""Preference losses of the DPO stage, as a pure function of sequence log-probabilities.

All inputs are per-pair log-probabilities of a whole box, i.e. the SUM of the log-probs of its 4
coordinate tokens (`LocationModel.box_log_probs(...).sum(-1)`). With
`h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)`:

- `sigmoid` (DPO, Rafailov et al. 2023), with conservative label smoothing eps (cDPO: the label is
  flipped with probability eps): `-(1 - eps) log sigma(beta h) - eps log sigma(-beta h)`.
- `ipo` (Azar et al. 2023): `(h - 1 / (2 beta))^2` on the summed log-ratios, no length
  normalisation. Every box has exactly 4 tokens, so TRL's per-token-averaged IPO
  `(h / 4 - 1 / (2 beta'))^2` is ours with `beta = beta' / 4`, times 1/16.
- `hinge` (SLiC, Zhao et al. 2023): `max(0, 1 - beta h)`.

Rewards are the implicit DPO rewards `beta * (policy - ref)` of each box, detached.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from genloc.config import ArgumentError

LOSS_TYPES = ("sigmoid", "ipo", "hinge")


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses `[B]` and detached chosen/rejected rewards `[B]`; see the module docstring."""
    check_dpo_args(beta, loss_type, label_smoothing)
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    h = chosen_logratios - rejected_logratios
    if loss_type == "sigmoid":
        losses = -(1.0 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    else:
        losses = torch.relu(1.0 - beta * h)
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def check_dpo_args(beta: float, loss_type: str = "sigmoid", label_smoothing: float = 0.0) -> None:
    """Fail early (at module construction, and in the config before anything is built) on settings
    the losses cannot honour."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"dpo loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if not beta > 0:
        raise ArgumentError("beta", beta, "> 0")
    if not 0.0 <= label_smoothing < 0.5:
        raise ArgumentError("label_smoothing", label_smoothing, "[0, 0.5)")
    if label_smoothing and loss_type != "sigmoid":
        raise ValueError(f"dpo label_smoothing is only defined for loss_type=sigmoid, not {loss_type!r}")
