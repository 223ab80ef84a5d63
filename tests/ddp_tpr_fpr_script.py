"""Two gloo CPU processes with uneven sample counts score one dataset; rank 0 checks the synced
TPRFPR result equals the single-process result and writes "OK" to the file given as argv[1].
Run as a subprocess by tests/test_tpr_fpr_ddp.py (never inside the pytest process)."""
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from metrics.tpr_fpr import TPRFPR  # noqa: E402

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


if __name__ == "__main__":
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(2, port, sys.argv[1]), nprocs=2, join=True)
