"""Fast paths and GPU-style options, exercised on CPU with the tiny preset: the shared-prefix
teacher-forcing path equals the repeated-prefix reference (values and gradients)."""
import pytest
import torch

from models import LocationModel, LocationModelConfig


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return LocationModel(LocationModelConfig.preset("tiny"))


def _boxes(owner: torch.Tensor, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    lo = torch.rand(len(owner), 2, generator=gen) * 0.6
    return torch.cat([lo, lo + 0.1 + torch.rand(len(owner), 2, generator=gen) * 0.3], dim=1)


def _scores_and_grads(model, images, categories, owner, tokens, shared: bool):
    """Per-token log-probs, masked distribution and gradients (prefix + parameters) of a weighted loss."""
    model.zero_grad(set_to_none=True)
    prefix = model.build_prefix(model.encode_images(images), model.encode_texts(categories))
    prefix.retain_grad()
    if shared:
        logp, dist = model.box_log_probs_shared(prefix, owner, tokens, with_distribution=True)
    else:
        logp, dist = model.box_log_probs(prefix[owner], tokens, with_distribution=True)
    weights = torch.arange(1.0, logp.numel() + 1).view_as(logp)  # every token gets its own weight
    (-(logp * weights).mean()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logp.detach(), dist.detach(), prefix.grad.clone(), grads


def test_shared_prefix_equals_repeated_prefix(model):
    """Several boxes per image (unsorted owners, an image with one box, one with four)."""
    model.eval()  # dropout off: the paths differ only in where the prefix is computed
    images = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    categories = ["dog", "cat", "car", "cup"]
    owner = torch.tensor([2, 0, 0, 3, 1, 3, 3, 0, 2, 3])
    tokens = model.tokenizer.encode(_boxes(owner))
    ref = _scores_and_grads(model, images, categories, owner, tokens, shared=False)
    new = _scores_and_grads(model, images, categories, owner, tokens, shared=True)
    torch.testing.assert_close(new[0], ref[0], atol=1e-5, rtol=1e-5)
    finite = torch.isfinite(ref[1])
    assert torch.equal(finite, torch.isfinite(new[1]))  # same validity masks
    torch.testing.assert_close(new[1][finite], ref[1][finite], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(new[2], ref[2], atol=1e-7, rtol=1e-4)  # gradient through the KV cache
    assert ref[3].keys() == new[3].keys() and len(ref[3]) > 0
    for name in ref[3]:
        torch.testing.assert_close(new[3][name], ref[3][name], atol=1e-6, rtol=1e-4, msg=name)


def test_shared_prefix_rejects_bad_owner_and_invalid_boxes(model):
    prefix = torch.zeros(2, model.prefix_len, model.cfg.gpt2_n_embd)
    tokens = model.tokenizer.encode(_boxes(torch.zeros(3)))
    with pytest.raises(ValueError, match="owner indices"):
        model.box_log_probs_shared(prefix, torch.tensor([0, 1, 2]), tokens)
    with pytest.raises(ValueError, match="owner"):
        model.box_log_probs_shared(prefix, torch.tensor([0, 1]), tokens)
    with pytest.raises(ValueError, match="not a valid box"):
        model.box_log_probs_shared(prefix, torch.tensor([0, 1, 1]), torch.tensor([[5, 5, 5, 9]] * 3))
