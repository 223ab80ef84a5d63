"""``module.compile_step``: the MLE step's whole forward (`MLEModule.grid_losses`) on the positives laid
out in power-of-two buckets per image (`BoxBatch.grid`). Compiling takes minutes on a CPU, so these
tests run the function uncompiled (torch.compile replaced by a recorder) and check the bucketing:
the same NLL, loss, accuracy and gradients as the unpadded step, in float64."""
import pytest
import torch

from genloc import LocationModelConfig
from genloc.likelihood import BoxBatch
from lightning_modules.mle import MLEModule
from tests.helpers.batches import OPTIM

OWNERS = {"one box per image": [0, 1, 2], "1-3 boxes, one image without": [0, 0, 2, 2, 2, 0]}


def _batch(owner: list[int], seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    size = LocationModelConfig.preset("tiny").image_size
    positives = []
    for image in range(3):
        count = owner.count(image)
        lo = torch.rand(count, 2, generator=g) * 0.5
        positives.append(torch.cat([lo, lo + 0.1 + torch.rand(count, 2, generator=g) * 0.4], dim=1))
    return {"image": torch.rand(3, 3, size, size, generator=g, dtype=torch.float64), "category": ["dog", "cat", "cup"],
            "positives": positives, "key": ["a", "b", "c"]}


def _module(compile_step: bool, sigma: float) -> MLEModule:
    torch.manual_seed(0)
    config = LocationModelConfig.preset("tiny", gpt2_dropout=0.0).to_dict()  # the paths draw dropout differently
    return MLEModule(config, OPTIM, label_sigma_bins=sigma, compile_step=compile_step).double().train()


def test_the_grid_buckets_boxes_per_image():
    boxes = BoxBatch.build(torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8], [0, 1, 9, 9]]), torch.tensor([2, 0, 2]), 3, 16)
    tokens, real = boxes.grid()
    assert tokens.shape == (3, 2, 4) and real.tolist() == [[True, False], [False, False], [True, True]]
    assert tokens[2].tolist() == [[1, 2, 3, 4], [0, 1, 9, 9]] and tokens[0, 0].tolist() == [5, 6, 7, 8]
    assert tokens[1].tolist() == [[0, 0, 1, 1]] * 2  # fillers are valid boxes: finite log-probs, masked out


@pytest.mark.parametrize("sigma", [0.0, 1.5])
@pytest.mark.parametrize("layout", list(OWNERS))
def test_the_bucketed_step_equals_the_unpadded_one_in_float64(layout, sigma, monkeypatch):
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda fn, **options: compiled.append(fn) or fn)
    batch = _batch(OWNERS[layout], seed=len(OWNERS[layout]))
    results = []
    for compile_step in (False, True):
        module = _module(compile_step, sigma)
        host = module.on_before_batch_transfer(dict(batch), 0)
        nll, loss, accuracy, count = module.box_nll(host)
        grads = torch.autograd.grad(loss, [module.model.image_proj.weight,
                                           module.model.decoder.transformer.h[0].attn.c_attn.weight])
        results.append((nll, loss, accuracy, count, grads))
    assert len(compiled) == 1 and compiled[0].__name__ == "grid_losses"  # only the compile_step module compiles
    (nll, loss, accuracy, count, grads), (got_nll, got_loss, got_accuracy, got_count, got_grads) = results
    assert got_count == count == len(OWNERS[layout])
    for got, want in ((got_nll, nll), (got_loss, loss), (got_accuracy, accuracy), *zip(got_grads, grads)):
        torch.testing.assert_close(got.double(), want.double(), rtol=0, atol=1e-12)
    assert sigma == 0 or not torch.equal(loss, nll)
