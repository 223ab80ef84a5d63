"""Batches and a tiny LightningModule for metric, callback and DPO tests (also used by the DDP
scripts under tests/scripts/, which run in subprocesses)."""
import torch

OPTIM = dict(lr=1e-3, weight_decay=0.01, betas=[0.9, 0.95], warmup_steps=1, min_lr_ratio=0.1)


def toy_batches(num=6, batch_size=3):
    """Batch dicts of ARCHITECTURE.md built from real toy scenes (no datamodule, so no data kind;
    used by tests/scripts/ddp_tpr_fpr.py)."""
    import numpy as np

    from datamodules.toy import make_sample

    def norm(boxes, w, h):
        return torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4) / torch.tensor([w, h, w, h])

    samples = [make_sample(0, i, "toy-opa", split_id=1) for i in range(num)]
    batches = []
    for i in range(0, num, batch_size):
        part = samples[i:i + batch_size]
        batches.append({
            "image": torch.stack([torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float() / 255
                                  for _, img, _ in part]),
            "category": [a["category"] for _, _, a in part],
            "size": torch.tensor([[a["width"], a["height"]] for _, _, a in part]),
            "positives": [norm(a["positives"], a["width"], a["height"]) for _, _, a in part],
            "negatives": [norm(a["negatives"], a["width"], a["height"]) for _, _, a in part],
            "key": [k for k, _, _ in part],
            "meta": [a["meta"] for _, _, a in part],
        })
    return batches


def tiny_module():
    """A tiny random LocationModel in a minimal LightningModule (SGD, MLE loss on the first positive)."""
    import lightning as L

    from genloc import LocationModel, LocationModelConfig

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.model = LocationModel(LocationModelConfig.preset("tiny", num_bins=32))

        def training_step(self, batch, batch_idx):
            tokens = self.model.tokenizer.encode(torch.stack([p[0] for p in batch["positives"]]))
            return -self.model(batch["image"], batch["category"], tokens).sum(-1).mean()

        def validation_step(self, batch, batch_idx):
            return None

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=1e-3)

    return Tiny()


def pair_batch(seed, size=4):
    """A pair batch in the ARCHITECTURE.md format, boxes chosen by hand (chosen != rejected)."""
    g = torch.Generator().manual_seed(seed)
    chosen = torch.tensor([[0.1, 0.5, 0.4, 0.8], [0.5, 0.6, 0.9, 0.9], [0.2, 0.1, 0.3, 0.2], [0.6, 0.3, 0.7, 0.5]])
    rejected = torch.tensor([[0.1, 0.3, 0.4, 0.6], [0.5, 0.2, 0.9, 0.5], [0.2, 0.6, 0.3, 0.7], [0.1, 0.3, 0.2, 0.5]])
    return {
        "image": torch.rand(size, 3, 64, 64, generator=g),
        "category": ["car", "bird", "bird", "lamp"][:size],
        "size": torch.tensor([[64, 64]] * size),
        "positives": [c[None] for c in chosen[:size]],
        "negatives": [r[None] for r in rejected[:size]],
        "key": [f"toy-{seed}-{i}" for i in range(size)],
        "meta": [{} for _ in range(size)],
        "chosen": chosen[:size],
        "rejected": rejected[:size],
    }
