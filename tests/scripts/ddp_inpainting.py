"""InpaintingCallback in one Lightning validate, on one process or on 2 gloo CPU ranks; writes what it
logged (metric values, the pictures TensorBoard received) as JSON for tests/test_inpainting_ddp.py.

    python tests/scripts/ddp_inpainting.py single|ddp INPAINTER CLIP_CONFIG CLIP_WEIGHTS OUT_DIR

One process reads toy samples 0..8 in batches of 2; under ddp rank r reads samples r, r+2, ... (as a
sampler that deals samples out in turn), so the 5 edits are of the same images either way: rank 0
makes edits 0, 2, 4 and rank 1 edits 1, 3, reading across batch boundaries. Run as a subprocess
(never inside the pytest process), with the repository root on PYTHONPATH."""
import hashlib
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

NUM_SAMPLES, BATCH, NUM_IMAGES = 9, 2, 5


def main(mode, inpainter, clip_config, clip_weights, out):
    import lightning as L
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.data import DataLoader, IterableDataset

    from callbacks.inpainting import InpaintingCallback
    from tests.helpers.batches import tiny_module, toy_batches

    samples = toy_batches(num=NUM_SAMPLES, batch_size=1)

    class RankBatches(IterableDataset):
        def __iter__(self):
            rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
            mine = samples[rank::world]
            for i in range(0, len(mine), BATCH):
                part = mine[i:i + BATCH]
                yield {"image": torch.cat([s["image"] for s in part]), "category": [s["category"][0] for s in part],
                       "size": torch.cat([s["size"] for s in part])}

    callback = InpaintingCallback(inpainter=inpainter, every_n_val_epochs=1, num_images=NUM_IMAGES, steps=2,
                                  resolution=64, clip_weights=clip_weights, clip_config=clip_config, seed=3)
    logger = L.pytorch.loggers.TensorBoardLogger(out, name="tb")
    trainer = L.Trainer(accelerator="cpu", devices=2 if mode == "ddp" else 1, strategy="ddp" if mode == "ddp" else "auto",
                        logger=logger, enable_progress_bar=False, enable_model_summary=False, callbacks=[callback])
    logged = trainer.validate(tiny_module(), DataLoader(RankBatches(), batch_size=None, collate_fn=lambda b: b),
                              verbose=False)[0]
    result = {k: float(v) for k, v in logged.items()}
    if trainer.global_rank == 0:
        logger.experiment.flush()
        events = EventAccumulator(str(Path(logger.log_dir))).Reload()
        result["pictures"] = {tag: hashlib.sha256(events.Images(tag)[0].encoded_image_string).hexdigest()
                              for tag in events.Tags()["images"]}
    Path(out, f"{mode}_rank{trainer.global_rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(*sys.argv[1:])
