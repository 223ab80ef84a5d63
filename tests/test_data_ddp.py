"""DDP (gloo, 2 CPU ranks) fit in a subprocess: rank/world size come from the trainer, ranks read
disjoint samples and do the same number of steps. Marked slow."""
import json
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent('''
    import json, sys
    import lightning as L, torch
    from datamodules import ShardDataModule

    class M(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.seen = []
        def training_step(self, batch, i):
            self.seen.append([self.current_epoch, list(batch["key"])])
            return (self.w * batch["image"].mean()).sum()
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    out = sys.argv[1]
    if __name__ == "__main__":
        dm = ShardDataModule(out + "/toy", image_size=16, batch_size=4, num_workers=1, shuffle_buffer=4,
                           val_split=None, test_split=None)
        m = M()
        t = L.Trainer(max_epochs=2, accelerator="cpu", devices=2, strategy="ddp", logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
        t.fit(m, datamodule=dm)
        json.dump({"rank": dm.rank, "world": dm.world_size, "seen": m.seen},
                  open(f"{out}/rank{t.global_rank}.json", "w"))
''')


@pytest.mark.slow
def test_ddp_two_ranks_disjoint_equal_steps(tmp_path):
    from datamodules.toy import write_toy_split
    write_toy_split(tmp_path / "toy", "toy-pipe", "train", 42, seed=0, num_shards=4, progress=False)  # uneven
    (tmp_path / "run.py").write_text(SCRIPT)
    r = subprocess.run([sys.executable, str(tmp_path / "run.py"), str(tmp_path)], cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in (0, 1)]
    assert [(x["rank"], x["world"]) for x in ranks] == [(0, 2), (1, 2)]
    for epoch in (0, 1):
        keys = [[k for e, b in x["seen"] if e == epoch for k in b] for x in ranks]
        assert len(keys[0]) == len(keys[1]) == (42 // 8) * 4
        assert not set(keys[0]) & set(keys[1])
