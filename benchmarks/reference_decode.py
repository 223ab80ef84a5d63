"""The slow reference decoder `LocationModel.sample` is checked against (tests) and timed against
(benchmarks/sampling.py): a measuring stick, kept out of genloc/."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from genloc import LocationModel, draw_tokens, filter_logits


@torch.no_grad()
def naive_reference_decode(model: LocationModel, prefix: Tensor, n: int, temperature: float = 1.0,
                           top_k: Optional[int] = None, top_p: Optional[float] = None,
                           region: Optional[Tensor] = None, generator: Optional[torch.Generator] = None,
                           size: Optional[Tensor] = None, aspect_ratio: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """No KV cache, no prefix sharing: every step re-runs GPT-2 over the whole sequence (prefix + BOS
    + tokens so far) for each of the ``B * n`` samples, then masks, filters and draws through the
    model's public pieces. Same draws from ``generator`` as `LocationModel.sample`, so for a given
    seed both must return the same tokens ``[B, n, 4]`` and log-probs ``[B, n]``.
    Call with the model in eval mode.
    """
    batch = prefix.shape[0]
    bounds = model.region_bounds(region, batch, prefix.device)
    extents = model.extent_mask(size, aspect_ratio, batch, prefix.device)
    model.check_extents_fit(bounds, extents)
    bounds = bounds.repeat_interleave(n, dim=0)
    extents = None if extents is None else extents.repeat_interleave(n)
    prefix = prefix.repeat_interleave(n, dim=0)
    tokens = torch.empty(batch * n, 0, dtype=torch.long, device=prefix.device)
    total = torch.zeros(batch * n, device=prefix.device)
    for step in range(4):
        inputs = torch.cat([prefix, model.input_embeds(tokens)], dim=1)
        logits = model.decoder(inputs_embeds=inputs, use_cache=False).logits[:, -1]
        logits = model.step_logits(step, logits.float(), tokens)
        logits = logits.masked_fill(~model.allowed_tokens(step, tokens, bounds, extents), float("-inf"))
        token, logp = draw_tokens(filter_logits(logits, temperature, top_k, top_p), generator)
        tokens = torch.cat([tokens, token[:, None]], dim=1)
        total += logp
    return tokens.view(batch, n, 4), total.view(batch, n)
