"""Sampling filters and the token draw as small pure functions (litgpt style), so the KV-cached
sampler, the tests' naive reference decoder and any other decoder apply the very same code."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .config import ArgumentError


def check_filter_args(temperature: float = 1.0, top_k: Optional[int] = None, top_p: Optional[float] = None) -> None:
    """The one check of the sampling settings (sampler, callbacks, config, demo): `ArgumentError`
    (a ValueError) naming the first one `filter_logits` cannot honour."""
    try:
        ok = math.isfinite(temperature) and temperature > 0
    except TypeError:
        ok = False
    if not ok:
        raise ArgumentError("temperature", temperature, "a finite number > 0")
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1):
        raise ArgumentError("top_k", top_k, "null or a whole number >= 1")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ArgumentError("top_p", top_p, "null or (0, 1]")


def filter_logits(logits: Tensor, temperature: float = 1.0, top_k: Optional[int] = None,
                  top_p: Optional[float] = None) -> Tensor:
    """Logits ``[..., V]`` divided by ``temperature``, then cut to the ``top_k`` largest and to the
    nucleus of mass ``top_p``; cut tokens become -inf (tokens already at -inf stay there).

    top-k keeps every token tied with the k-th largest value (a cut inside a tie would favour
    tokens by index). top-p keeps the most likely tokens up to and including the one whose
    cumulative probability (after temperature and top-k) first reaches ``top_p``, so the most
    likely token always survives; ``top_p`` of None or 1 keeps everything.
    """
    check_filter_args(temperature, top_k, top_p)
    logits = logits / temperature
    if top_k is not None:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p  # mass before the token already reaches top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def draw_tokens(logits: Tensor, generator: Optional[torch.Generator] = None) -> tuple[Tensor, Tensor]:
    """One token per row of ``logits [N, V]`` drawn from their softmax; returns the ids ``[N]`` and
    their log-probabilities ``[N]`` under that softmax."""
    logp = logits.log_softmax(-1)
    token = torch.multinomial(logp.exp(), 1, generator=generator).squeeze(-1)
    return token, logp.gather(-1, token[:, None]).squeeze(-1)
