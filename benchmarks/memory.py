"""Peak resident memory (RSS) of toy training and of `paper`-preset sampling, each measured in its
own subprocess (``os.wait4`` rusage: the largest process of the child's tree, data workers included).

- toy training: ``train.py`` (tiny preset, toy OPA scenes written to a temp folder, default
  workers/batch) for ``--train-steps`` steps, no validation;
- paper sampling: a `paper`-preset model (ViT-B/16, CLIP ViT-B/32 text, GPT-2 small; random
  weights) drawing ``--boxes`` boxes for each of ``--images`` images in one KV-cached batch.

    python -m benchmarks.memory [--quick]

The last line is ``RESULT {json}`` (MiB) for benchmarks/run_all.py.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SAMPLE_PAPER = """
import sys, torch
torch.set_num_threads(1)
from models import LocationModel, LocationModelConfig
images, boxes = int(sys.argv[1]), int(sys.argv[2])
cfg = LocationModelConfig.preset("paper", vit_weights=None, clip_weights=None, gpt2_weights=None)
model = LocationModel(cfg).eval()
out = model.sample(torch.rand(images, 3, 224, 224), ["dog"] * images, n=boxes)
assert out.boxes.shape == (images, boxes, 4)
"""


def peak_rss_mib(cmd: list[str], env: dict) -> float:
    """Run ``cmd`` and return the peak RSS (MiB) reported by ``wait4`` for it; raises on failure."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    stderr = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd[:3])}... failed ({proc.returncode}):\n{stderr.decode()[-2000:]}")
    return usage.ru_maxrss / 1024  # KiB on Linux


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="20 training steps, 1 image x 100 boxes")
    parser.add_argument("--train-steps", type=int, default=None, help="default 100, quick 20")
    parser.add_argument("--images", type=int, default=None, help="paper sampling images (default 4, quick 1)")
    parser.add_argument("--boxes", type=int, default=100)
    args = parser.parse_args(argv)
    steps = args.train_steps or (20 if args.quick else 100)
    images = args.images or (1 if args.quick else 4)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(ROOT),
           "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "datamodules.toy", "--out", tmp, "--pipe-train", "0", "--opa-train", "512",
                        "--val", "16", "--test", "0", "--num-shards", "4"], cwd=ROOT, env=env, check=True,
                       stdout=subprocess.DEVNULL)
        train = peak_rss_mib([sys.executable, "train.py", "experiment=toy_finetune", "init_from=null",
                              f"data.data_dir={tmp}/toy-opa", f"log_root={tmp}/runs", f"trainer.max_steps={steps}",
                              "trainer.limit_val_batches=0", "trainer.enable_progress_bar=false"], env)
    sample = peak_rss_mib([sys.executable, "-c", SAMPLE_PAPER, str(images), str(args.boxes)], env)
    print(f"peak RSS, toy training ({steps} steps, tiny preset, default batch/workers): {train:8.0f} MiB")
    print(f"peak RSS, paper-preset sampling ({images} image(s) x {args.boxes} boxes, CPU): {sample:8.0f} MiB")
    print("RESULT " + json.dumps({"train_mib": train, "train_steps": steps, "sample_mib": sample,
                                  "sample_images": images, "sample_boxes": args.boxes}))


if __name__ == "__main__":
    main()
