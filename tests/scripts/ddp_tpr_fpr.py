"""Two gloo CPU processes with uneven sample counts score one dataset; rank 0 checks the synced
result equals the single-process result and writes "OK" to the file given as argv[2].

    python tests/scripts/ddp_tpr_fpr.py metric OUT     # TPRFPR, torch.multiprocessing spawn
    python tests/scripts/ddp_tpr_fpr.py callback OUT   # TprFprCallback in a Lightning ddp validate (TPR-FPR
                                                       # and the ranking metrics)

Run as a subprocess by tests/test_tpr_fpr_ddp.py (never inside the pytest process), with the repository
root on PYTHONPATH (tests/conftest.py)."""
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from metrics.tpr_fpr import TPRFPR

NS = (1, 2, 5, 10)
SPLIT = 3          # rank 0 scores samples [0, 3), rank 1 the other 8, in batches of 2


def dataset():
    g = torch.Generator().manual_seed(1)

    def boxes(k):
        xy = torch.randint(0, 4, (k, 2), generator=g).float()
        return torch.cat([xy, xy + torch.randint(1, 3, (k, 2), generator=g).float()], 1)

    return ([boxes(10) for _ in range(11)], [boxes(int(torch.randint(0, 4, (1,), generator=g))) for _ in range(11)],
            [boxes(int(torch.randint(0, 5, (1,), generator=g))) for _ in range(11)])


def score(preds, pos, neg, batch=2):
    m = TPRFPR(ns=NS)
    for i in range(0, len(preds), batch):
        m.update(preds[i:i + batch], pos[i:i + batch], neg[i:i + batch])
    return m


def worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    preds, pos, neg = dataset()
    part = slice(0, SPLIT) if rank == 0 else slice(SPLIT, None)
    ddp = score(preds[part], pos[part], neg[part]).compute()
    if rank == 0:
        single = TPRFPR(ns=NS, sync_on_compute=False)     # single-process reference
        single.update(preds, pos, neg)
        ref = single.compute()
        bad = [k for k in ref if not torch.equal(ref[k], ddp[k])]
        assert ref["num_samples"] == 11 and ref["hit_positives@10"] > 0 and ref["hit_negatives@10"] > 0
        Path(out).write_text("OK" if not bad else f"MISMATCH {bad}: ddp={ddp} ref={ref}")
    dist.barrier()
    dist.destroy_process_group()


def callback_run(out):
    """Rank 0 validates toy batch 0, rank 1 batches 1 and 2 (3 vs 6 samples); the logged numbers
    must equal scoring all batches in one process with the same per-rank generators."""
    import lightning as L
    from torch.utils.data import DataLoader, IterableDataset

    from callbacks.tpr_fpr import TprFprCallback
    from tests.helpers.batches import tiny_module, toy_batches

    batches = toy_batches(num=9, batch_size=3)

    class RankBatches(IterableDataset):
        def __iter__(self):
            rank = dist.get_rank() if dist.is_initialized() else 0
            return iter(batches[:1] if rank == 0 else batches[1:])

    module = tiny_module()
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[TprFprCallback(num_samples=100, seed=7)])
    logged = trainer.validate(module, DataLoader(RankBatches(), batch_size=None, collate_fn=lambda b: b),
                              verbose=False)[0]
    if trainer.global_rank != 0:
        return
    ref = TPRFPR(ns=tuple(range(10, 101, 10)), sync_on_compute=False)
    for rank, part in ((0, batches[:1]), (1, batches[1:])):
        g = torch.Generator().manual_seed(7 + rank)
        for b in part:
            ref.update(module.model.sample(b["image"], b["category"], n=100, generator=g).boxes_norm,
                       b["positives"], b["negatives"])
    ref = ref.compute()
    bad = {k: (logged.get(f"val/{k}"), float(v)) for k, v in ref.items()
           if k.split("@")[0] in ("tpr", "fpr", "tpr_shared", "fpr_shared", "precision")
           and abs(logged.get(f"val/{k}", -1.0) - float(v)) > 1e-6}
    ok = not bad and logged["val/tpr_fpr_num_samples"] == 9 and float(ref["hit_negatives@100"]) + float(ref["hit_positives@100"]) > 0
    # ranking: every rank's scores gathered -> the single-process ranking of all batches
    from metrics.ranking import ranking_metrics
    from metrics.scoring import labelled_scores

    groups = [g for b in batches for g in zip(b["category"], *labelled_scores(module.model, b))]
    ranking = ranking_metrics(groups)
    for name in ("pair_acc", "rank_auc"):
        if abs(logged[f"val/{name}"] - ranking[name]) > 1e-6:
            bad[name] = (logged[f"val/{name}"], ranking[name])
    ok = ok and not bad and ranking["num_pairs"] > 0
    Path(out).write_text("OK" if ok else f"MISMATCH {bad} logged={logged}")


if __name__ == "__main__":
    import socket

    mode, out_file = sys.argv[1], sys.argv[2]
    if mode == "metric":
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.spawn(worker, args=(2, port, out_file), nprocs=2, join=True)
    else:
        callback_run(out_file)
