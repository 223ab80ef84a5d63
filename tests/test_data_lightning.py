"""The datamodule inside a real Lightning fit: epoch pushed to (persistent) workers, fixed batch count."""
import lightning as L
import pytest
import torch

from datamodules import ShardDataModule
from datamodules.toy import write_toy_split


class Recorder(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.keys = {}

    def training_step(self, batch, i):
        self.keys.setdefault(self.current_epoch, []).append(tuple(batch["key"]))
        return (self.w * batch["image"].mean()).sum()

    def validation_step(self, batch, i):
        self.keys.setdefault("val", set()).update(batch["key"])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


@pytest.mark.parametrize("persistent", [False, True])
def test_fit_pushes_epoch_to_workers(tmp_path_factory, persistent):
    d = tmp_path_factory.mktemp("toy")
    write_toy_split(d, "toy-pipe", "train", 48, seed=0, num_shards=4, progress=False)
    write_toy_split(d, "toy-pipe", "val", 10, seed=0, num_shards=2, progress=False)
    dm = ShardDataModule(str(d), image_size=16, batch_size=8, num_workers=2, shuffle_buffer=8,
                       persistent_workers=persistent, test_split=None)
    model = Recorder()
    trainer = L.Trainer(max_epochs=3, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(model, datamodule=dm)
    epochs = [model.keys[e] for e in range(3)]
    assert [len(e) for e in epochs] == [48 // 8] * 3
    assert len({tuple(e) for e in epochs}) == 3               # the order changes every epoch
    assert all(len({k for b in e for k in b}) == 48 for e in epochs)
    assert len(model.keys["val"]) == 10
    # the same seed, epoch and num_workers reproduce the order outside Lightning
    dm2 = ShardDataModule(str(d), image_size=16, batch_size=8, num_workers=2, shuffle_buffer=8, test_split=None)
    dm2.setup("fit")
    dm2.set_epoch(2)
    assert [tuple(b["key"]) for b in dm2.train_dataloader()] == epochs[2]
