"""The sampler's memory estimate (`LocationModel.sampling_bytes_per_image`) bounds what the cascade
decoder allocates, and evaluate.py sizes its sampling batch from a memory budget with it."""
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import evaluate
from metrics.predictions import read_predictions
from metrics.sampling import MAX_SAMPLING_BATCH
from genloc.checkpoint import save_model_checkpoint
from genloc import LocationModel, LocationModelConfig


class PeakLiveBytes(TorchDispatchMode):
    """Peak bytes of the tensors operators create while the mode is on and that are still alive
    (a storage shared by views counts once); tensors that existed before (weights) are not counted."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.owners: dict[int, int] = {}

    def _release(self, ptr: int, nbytes: int) -> None:
        self.owners[ptr] -= 1
        if not self.owners[ptr]:
            del self.owners[ptr]
            self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                storage = t.untyped_storage()
                ptr, nbytes = storage.data_ptr(), storage.nbytes()
                if ptr not in self.owners:
                    self.owners[ptr] = 0
                    self.live += nbytes
                    self.peak = max(self.peak, self.live)
                self.owners[ptr] += 1
                weakref.finalize(t, self._release, ptr, nbytes)
        return out


@pytest.fixture(scope="module")
def toy_shards(tmp_path_factory):
    from datamodules.toy import write_toy_split

    out = tmp_path_factory.mktemp("toy") / "toy-opa"
    write_toy_split(out, "toy-opa", "test", num_samples=6, seed=0, num_shards=2, progress=False)
    return out


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return LocationModel(LocationModelConfig.preset("tiny")).eval()


@pytest.mark.parametrize("images, n", [(1, 100), (4, 100), (3, 400)])
def test_estimate_bounds_the_cascade_decoder_but_not_the_copied_cache(model, images, n):
    pixels = torch.rand(images, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    categories = ["dog"] * images
    model.encode_texts(categories)  # text features cached before measuring, as after the first batch
    estimate = images * model.sampling_bytes_per_image(n)
    peaks = {}
    for cascade in (True, False):
        with PeakLiveBytes() as mode:
            model.sample(pixels, categories, n=n, cascade=cascade)
        peaks[cascade] = mode.peak
    assert peaks[True] <= estimate < peaks[False]


def test_estimate_grows_with_boxes_and_sizes_the_batch(model):
    per_image = model.sampling_bytes_per_image(100)
    assert model.sampling_bytes_per_image(400) > per_image > model.sampling_bytes_per_image(10)
    assert model.sampling_batch_size(100, 3.5 * per_image) == 3
    assert model.sampling_batch_size(100, 0.5 * per_image) == 1


def test_evaluate_sizes_its_sampling_batch_from_the_memory_budget(toy_shards, tmp_path):
    torch.manual_seed(0)
    model = LocationModel(LocationModelConfig.preset("tiny", num_bins=32))
    ckpt = tmp_path / "tiny.ckpt"
    save_model_checkpoint(model, ckpt)
    gib = 2.5 * model.sampling_bytes_per_image(100) / 2 ** 30  # room for 2 images
    common = ["--model", str(ckpt), "--data", str(toy_shards), "--split", "test", "--seed", "3",
              "--device", "cpu", "--no-progress"]
    budget = evaluate.main(common + ["--sampling-memory", str(gib), "--out", str(tmp_path / "budget")])
    fixed = evaluate.main(common + ["--batch-size", "2", "--out", str(tmp_path / "fixed")])
    assert budget["sampling"]["batch_size"] == 2
    assert budget["metrics"] == fixed["metrics"]
    assert (read_predictions(tmp_path / "budget" / "predictions.jsonl").keys()
            == read_predictions(tmp_path / "fixed" / "predictions.jsonl").keys())


def test_a_large_budget_keeps_the_fixed_batch_so_results_do_not_depend_on_the_machine(toy_shards, tmp_path):
    torch.manual_seed(0)
    ckpt = tmp_path / "tiny.ckpt"
    save_model_checkpoint(LocationModel(LocationModelConfig.preset("tiny", num_bins=32)), ckpt)
    common = ["--model", str(ckpt), "--data", str(toy_shards), "--split", "test", "--seed", "3",
              "--device", "cpu", "--no-progress"]
    big = evaluate.main(common + ["--sampling-memory", "64", "--out", str(tmp_path / "big")])
    fixed = evaluate.main(common + ["--batch-size", str(MAX_SAMPLING_BATCH), "--out", str(tmp_path / "fixed")])
    assert big["sampling"]["batch_size"] == fixed["sampling"]["batch_size"] == MAX_SAMPLING_BATCH
    assert (tmp_path / "big" / "predictions.jsonl").read_text() == (tmp_path / "fixed" / "predictions.jsonl").read_text()


@pytest.mark.parametrize("flag", [["--sampling-memory", "0"], ["--batch-size", "0"]])
def test_bad_sampling_budget_is_a_usage_error(flag, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        evaluate.parse_args(["--model", "x.ckpt", "--data", str(tmp_path), *flag])
    assert exit_info.value.code == 2
    assert f"{flag[0]} must be" in capsys.readouterr().err
