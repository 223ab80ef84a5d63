"""``data.padded_boxes``: the loader collates each batch's box lists into `PaddedBoxes` (one padded
tensor each) in its workers; the batches, the resumed epoch and the module's loss are those of the
list collation."""
import torch

from genloc import LocationModelConfig
from datamodules.pipeline import EpochLoader, PaddedBoxes, ShardStream
from lightning_modules.mle import MLEModule, _select, flatten_boxes
from tests.helpers.batches import OPTIM


def _stream(data, padded: bool, workers: int = 0, image_size: int = 8) -> ShardStream:
    return ShardStream(data / "toy-opa", "train", image_size=image_size, batch_size=3, train=True, num_workers=workers,
                       shuffle_buffer=5, seed=3, padded_boxes=padded)


def _batches(stream, skip: int = 0, workers: int = 0) -> list[dict]:
    return list(EpochLoader(stream, epoch_fn=lambda: 1, skip_fn=lambda: skip, num_workers=workers))


def test_padded_boxes_read_as_the_lists_they_replace():
    lists = [torch.rand(2, 4), torch.zeros(0, 4), torch.rand(3, 4)]
    padded = PaddedBoxes.collate(lists)
    assert padded.padded.shape == (3, 3, 4) and padded.counts == (2, 0, 3)
    assert len(padded) == 3 and all(torch.equal(a, b) for a, b in zip(padded, lists))
    assert [len(b) for b in padded[1:]] == [0, 3]
    boxes, owner = padded.flatten()
    expected_boxes, expected_owner = flatten_boxes(lists)
    assert torch.equal(boxes, expected_boxes) and torch.equal(owner, expected_owner)
    picked = padded.select([0, 2])
    assert picked.counts == (2, 3) and torch.equal(picked[1], lists[2])
    assert PaddedBoxes.collate([torch.zeros(0, 4)] * 2).padded.shape == (2, 0, 4)


def test_workers_collate_the_same_batches_and_resume_the_same(tiny_toy_data):
    """Same keys and boxes as the list collation, also after a mid-epoch skip (resume), with 2 workers."""
    for skip, workers in ((0, 0), (4, 2)):
        full = _batches(_stream(tiny_toy_data, False, workers), 0, workers)
        padded = _batches(_stream(tiny_toy_data, True, workers), skip, workers)
        assert [b["key"] for b in padded] == [b["key"] for b in full[skip:]]
        assert any(max(b["positives"].counts) > 1 for b in padded)  # OPA flavour: several boxes per image
        for got, want in zip(padded, full[skip:]):
            assert isinstance(got["positives"], PaddedBoxes) and isinstance(got["negatives"], PaddedBoxes)
            for name in ("positives", "negatives"):
                assert len(got[name]) == len(want[name])
                assert all(torch.equal(a, b) for a, b in zip(got[name], want[name]))
            assert torch.equal(got["image"], want["image"])


def test_the_module_loss_is_the_same_on_both_collations(tiny_toy_data):
    torch.manual_seed(0)
    config = LocationModelConfig.preset("tiny")
    module = MLEModule(config.to_dict(), OPTIM).double()  # the model in float64
    lists, padded = (_batches(_stream(tiny_toy_data, padded, image_size=config.image_size))[:2]
                     for padded in (False, True))
    for want, got in zip(lists, padded):
        losses = []
        for batch in (want, got):
            batch = module.on_before_batch_transfer(dict(batch, image=batch["image"].double()), 0)
            module.train()
            torch.manual_seed(1)  # the same dropout draws
            losses.append(module.box_nll(batch)[1])
        assert torch.equal(losses[0], losses[1]) and torch.isfinite(losses[0])
    # validation keeps the samples with positives: the padded batch's sub-batch is the lists'
    keep = [0, 2]
    assert [b.tolist() for b in _select(padded[0], keep)["positives"]] == [b.tolist() for b in
                                                                          _select(lists[0], keep)["positives"]]


def test_a_fit_with_padded_boxes_trains_and_validates(tiny_toy_data, tmp_path):
    """Lightning moves `PaddedBoxes` as one object (its ``to``); training and validation read it."""
    import train as train_script
    from configs.schema import load_config
    from tests.helpers.runs import tiny_run_overrides

    overrides = ["experiment=toy_finetune", *tiny_run_overrides(tiny_toy_data / "toy-opa", tmp_path, steps=2),
                 "data.padded_boxes=true", "init_from=null", "callbacks.tpr_fpr.every_n_val_epochs=0"]
    result = train_script.train(load_config(overrides))
    assert result["trainer"].global_step == 2
    assert torch.isfinite(torch.tensor(result["metrics"]["val/loss"]))
