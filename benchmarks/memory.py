"""Peak resident memory (RSS) of toy training and of `paper`-preset sampling, each measured in its
own subprocess.

- toy training: ``train.py`` (tiny preset, toy OPA scenes written to a temp folder, default
  workers/batch) for ``--train-steps`` steps, no validation; ``os.wait4`` rusage (the largest
  process of the child's tree, data workers included);
- paper sampling: a `paper`-preset model (ViT-B/16, CLIP ViT-B/32 text, GPT-2 small; random
  weights) drawing ``--boxes`` boxes for each of ``--images`` images in one call, once with the
  cascade decoder (prefix keys/values kept once per image) and once with the copied-cache decoder
  (``sample(cascade=False)``: the prefix cache repeated per box). Each child builds the model,
  notes its RSS (libraries + weights), resets the kernel's high-water mark (``/proc/self/clear_refs``)
  and reports the peak RSS of sampling above that: the memory sampling itself needs.

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
import json, sys, torch
torch.set_num_threads(1)
from genloc import LocationModel, LocationModelConfig

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # KiB -> MiB

images, boxes, cascade = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "cascade"
cfg = LocationModelConfig.preset("paper", pretrained=False)
model = LocationModel(cfg).eval()
pixels = torch.rand(images, 3, 224, 224)
base = status("VmRSS")
try:
    open("/proc/self/clear_refs", "w").write("5")  # VmHWM := current RSS
    reset = True
except OSError:
    reset = False  # the peak then also covers building the model
out = model.sample(pixels, ["dog"] * images, n=boxes, cascade=cascade)
assert out.boxes.shape == (images, boxes, 4)
print("RESULT " + json.dumps({"base_mib": base, "peak_mib": status("VmHWM"), "peak_reset": reset}))
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


def sampling_rss(images: int, boxes: int, decoder: str, env: dict) -> dict:
    """``{base_mib, peak_mib, peak_reset}`` of one paper-preset sampling child."""
    proc = subprocess.run([sys.executable, "-c", SAMPLE_PAPER, str(images), str(boxes), decoder], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"paper sampling ({decoder}) failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="20 training steps, 1 image x 100 boxes")
    parser.add_argument("--train-steps", type=int, default=None, help="default 100, quick 20")
    parser.add_argument("--images", type=int, default=None, help="paper sampling images (default 4, quick 1)")
    parser.add_argument("--boxes", type=int, default=100)
    parser.add_argument("--skip-train", action="store_true", help="measure the sampling rows only")
    args = parser.parse_args(argv)
    steps = args.train_steps or (20 if args.quick else 100)
    images = args.images or (1 if args.quick else 4)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(ROOT),
           "OMP_NUM_THREADS": "1"}
    result = {"sample_images": images, "sample_boxes": args.boxes}
    if not args.skip_train:
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run([sys.executable, "-m", "datamodules.toy", "--out", tmp, "--pipe-train", "0",
                            "--opa-train", "512", "--val", "16", "--test", "0", "--num-shards", "4"], cwd=ROOT,
                           env=env, check=True, stdout=subprocess.DEVNULL)
            train = peak_rss_mib([sys.executable, "train.py", "experiment=toy_finetune", "init_from=null",
                                  f"data.data_dir={tmp}/toy-opa", f"log_root={tmp}/runs", f"trainer.max_steps={steps}",
                                  "trainer.limit_val_batches=0", "trainer.enable_progress_bar=false"], env)
        print(f"peak RSS, toy training ({steps} steps, tiny preset, default batch/workers): {train:8.0f} MiB")
        result.update(train_mib=train, train_steps=steps)
    cascade = sampling_rss(images, args.boxes, "cascade", env)
    copied = sampling_rss(images, args.boxes, "copied", env)
    above = {name: r["peak_mib"] - r["base_mib"] for name, r in (("cascade", cascade), ("copied", copied))}
    ratio = above["copied"] / max(above["cascade"], 1.0)
    print(f"paper-preset sampling, {images} image(s) x {args.boxes} boxes, CPU; model built: "
          f"{cascade['base_mib']:.0f} MiB RSS (libraries + weights)"
          + ("" if cascade["peak_reset"] and copied["peak_reset"] else " [high-water mark not resettable: peaks "
             "include building the model]"))
    print(f"{'decoder':<14}{'peak RSS MiB':>14}{'above model MiB':>17}")
    print(f"{'copied cache':<14}{copied['peak_mib']:>14.0f}{above['copied']:>17.0f}")
    print(f"{'cascade':<14}{cascade['peak_mib']:>14.0f}{above['cascade']:>17.0f}")
    print(f"sampling memory above the model, copied cache / cascade: {ratio:.1f}x")
    result.update(sample_mib=cascade["peak_mib"], sample_copied_mib=copied["peak_mib"],
                  sample_above_mib=above["cascade"], sample_copied_above_mib=above["copied"], sample_ratio=ratio)
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
