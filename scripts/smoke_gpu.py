"""`make smoke-gpu`: the check to run on a new GPU node before a real run (docs/gpu.md).

Five parts, each printed as PASS or FAIL: CUDA is there; `train.py` trains the `paper` preset from
random init (`model.pretrained=false`, nothing downloaded) on freshly generated toy scenes in
bf16-mixed for ``--steps`` steps with two validations; `evaluate.py` scores that checkpoint on CUDA;
`insert.py` inserts one object with a tiny random Stable Diffusion pipeline; `train.py` with two gloo
ranks sharing the one device (``trainer.strategy=ddp_gloo``) runs 4 steps straight and, pre-empted at
step 2, resumes to the same weights (``--no-ddp`` leaves it out). Prints the training step rate. Exit 0 when every part passes, 1 when one fails, 2 at once when there is no CUDA.

    python -m scripts.smoke_gpu                        # make smoke-gpu
    python -m scripts.smoke_gpu --device cpu --tiny    # the same parts on a CPU in seconds (tiny preset)
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from genloc.arguments import text  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", type=text, default="cuda", help="cuda, cuda:N or cpu (default cuda)")
    p.add_argument("--tiny", action="store_true", help="tiny preset and a few steps (the CPU rehearsal)")
    p.add_argument("--steps", type=int, help="training steps (default 300, tiny 4)")
    p.add_argument("--batch-size", type=int, help="training batch (default 32, tiny 4)")
    p.add_argument("--workers", type=int, help="loader workers (default 4, tiny 0)")
    p.add_argument("--no-ddp", dest="ddp", action="store_false",
                   help="leave out the DDP part (2 gloo ranks on the one device, pre-empted and resumed)")
    p.add_argument("--out", type=text, help="keep the run, results and edit here (default: a temporary folder)")
    args = p.parse_args(argv)
    for name, full, tiny in (("steps", 300, 4), ("batch_size", 32, 4), ("workers", 4, 0)):
        if getattr(args, name) is None:
            setattr(args, name, tiny if args.tiny else full)
    if args.steps < 2 or args.batch_size < 1 or args.workers < 0:
        p.error("--steps must be >= 2, --batch-size >= 1, --workers >= 0")
    return args


def write_scenes(root: Path, args) -> str:
    """Toy scenes: PIPE flavour to train and validate on, OPA flavour to evaluate on."""
    from datamodules.toy.scenes import write_toy_dataset

    train = min(args.batch_size * args.steps, 2000)  # more steps than that run over several epochs
    shards = max(args.workers, 1)
    sizes = {"toy-pipe": {"train": max(train, shards * args.batch_size), "val": 32}, "toy-opa": {"test": 16}}
    write_toy_dataset(root, seed=0, sizes=sizes, num_shards=shards, progress=False)
    return f"{sizes['toy-pipe']['train']} training scenes in {shards} shards"


def train_part(args, device: torch.device, data: Path, runs: Path) -> tuple[str, Path]:
    import train as train_script
    from benchmarks.gpu_check import StepClock
    from configs.schema import load_config

    cuda = device.type == "cuda"
    overrides = [
        f"model={'tiny' if args.tiny else 'paper'}", "model.pretrained=false", f"trainer={'gpu' if cuda else 'cpu'}",
        "trainer.precision=bf16-mixed", f"trainer.max_steps={args.steps}",
        f"trainer.val_check_interval={args.steps // 2}", "trainer.limit_val_batches=2",
        "trainer.enable_progress_bar=false", f"data.data_dir={data / 'toy-pipe'}",
        f"data.batch_size={args.batch_size}", f"data.num_workers={args.workers}",
        f"data.pin_memory={str(cuda).lower()}", f"data.persistent_workers={str(args.workers > 0).lower()}",
        "callbacks.tpr_fpr.num_samples=10", "callbacks.tpr_fpr.max_eval_samples=8",
        "callbacks.sample_images.num_images=2", f"log_root={runs}", "experiment=toy_pretrain",
        "resume=false",  # every check trains from step 0; a run of an earlier check in --out is moved aside, kept
    ]
    if cuda:
        overrides.append(f"trainer.devices=[{device.index}]")
    clock = StepClock(skip=min(10, args.steps // 2))
    result = train_script.train(load_config(overrides), extra_callbacks=[clock])
    metrics = result["metrics"]
    loss = metrics.get("val/loss")
    if loss is None or not math.isfinite(loss):
        raise RuntimeError(f"no finite val/loss after {args.steps} steps: {metrics}")
    rate = clock.steps_per_second
    speed = (f"{rate:.2f} steps/s = {rate * args.batch_size:.0f} samples/s at batch {args.batch_size} "
             f"(validation included)") if rate else "-"
    return f"{args.steps} steps, val/loss {loss:.3f}, {speed}", result["run_dir"] / "checkpoints" / "last.ckpt"


DDP_STEPS, DDP_PREEMPT_AT, DDP_BATCH = 4, 2, 4
DDP_TIMEOUT_S = 300  # per launch: a hung process group fails the part instead of blocking the node


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_ranks(overrides: list[str], env_extra: dict) -> list[subprocess.Popen]:
    """The two ranks as two "nodes" of one process each on 127.0.0.1 (one local device each): both take
    the one GPU, which NCCL refuses and gloo (``trainer.strategy=ddp_gloo``) allows."""
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), **env_extra}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return [subprocess.Popen([sys.executable, "-m", "scripts.ddp_rank", *overrides], cwd=ROOT,
                             env={**env, "NODE_RANK": str(rank)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True) for rank in (0, 1)]


def wait_ranks(ranks: list[subprocess.Popen], what: str) -> dict:
    """Rank 0's JSON line; RuntimeError with a rank's last error line when one fails or hangs."""
    try:
        outputs = [rank.communicate(timeout=DDP_TIMEOUT_S) for rank in ranks]
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"{what}: no end after {DDP_TIMEOUT_S} s (a hung process group?)") from None
    finally:
        for rank in ranks:
            rank.kill()
    for number, (rank, (_, stderr)) in enumerate(zip(ranks, outputs)):
        if rank.returncode:
            lines = [line for line in stderr.splitlines() if line.strip()] or ["(no output)"]
            raise RuntimeError(f"{what}: rank {number} exited with {rank.returncode}: {lines[-1]}")
    return json.loads(outputs[0][0].strip().splitlines()[-1])



def checkpoint_differences(a: dict, b: dict) -> str | None:
    """What differs between two checkpoints' weights and optimiser state (None: bit for bit equal)."""
    differ = [k for k in a["state_dict"] if not torch.equal(a["state_dict"][k], b["state_dict"][k])]
    states = zip(a["optimizer_states"][0]["state"].values(), b["optimizer_states"][0]["state"].values())
    optimiser = sum(not torch.equal(sa[k], sb[k]) for sa, sb in states for k in sa)
    if not differ and not optimiser:
        return None
    worst = max((float((a["state_dict"][k].double() - b["state_dict"][k].double()).abs().max()) for k in differ),
                default=0.0)
    return (f"{len(differ)} weight tensors (largest difference {worst:.3g}, first {differ[:1]}), "
            f"{optimiser} optimiser tensors")


def ddp_part(args, device: torch.device, root: Path) -> str:
    """train.py with 2 gloo ranks on the one device for `DDP_STEPS` steps, straight through (run A) and
    pre-empted at step `DDP_PREEMPT_AT` then resumed by the same command (run B): B must end with A's
    weights and optimiser state, bit for bit."""
    from datamodules.toy import write_toy_split

    data = root / "data" / "toy-pipe"
    write_toy_split(data, "toy-pipe", "train", 2 * DDP_BATCH * DDP_STEPS + 8, seed=0, num_shards=2, progress=False)
    write_toy_split(data, "toy-pipe", "val", 8, seed=1, num_shards=2, progress=False)
    cuda = device.type == "cuda"
    common = [
        "experiment=toy_pretrain", f"model={'tiny' if args.tiny else 'paper'}", "model.pretrained=false",
        f"trainer={'gpu' if cuda else 'cpu'}", "trainer.strategy=ddp_gloo", "trainer.num_nodes=2",
        f"trainer.devices={[device.index] if cuda else 1}", "trainer.precision=bf16-mixed",
        f"trainer.max_steps={DDP_STEPS}", f"trainer.val_check_interval={DDP_PREEMPT_AT}", "trainer.limit_val_batches=1",
        "trainer.enable_progress_bar=false", f"data.data_dir={data}", f"data.batch_size={DDP_BATCH}",
        "data.num_workers=0", "data.shuffle_buffer=8", "callbacks.tpr_fpr.every_n_val_epochs=0",
        "callbacks.sample_images.every_n_val_epochs=0", f"log_root={root / 'runs'}",
    ]
    straight = launch_ranks([*common, "run_name=A"], {})  # A and B's first half share the device
    first = launch_ranks([*common, "run_name=B"], {"GENLOC_SMOKE_PREEMPT_AT": str(DDP_PREEMPT_AT)})
    done, stopped = wait_ranks(straight, "run A"), wait_ranks(first, "run B")
    if done["global_step"] != DDP_STEPS or stopped["preempted_at"] != DDP_PREEMPT_AT:
        raise RuntimeError(f"run A ended at step {done['global_step']} (wanted {DDP_STEPS}), run B was pre-empted "
                           f"at {stopped['preempted_at']} (wanted {DDP_PREEMPT_AT})")
    resumed = wait_ranks(launch_ranks([*common, "run_name=B"], {}), "run B resumed")
    if not resumed["resumed_from"] or resumed["global_step"] != DDP_STEPS:
        raise RuntimeError(f"run B's second launch did not resume to step {DDP_STEPS}: {resumed}")
    if done["world_size"] != 2:
        raise RuntimeError(f"run A ran on {done['world_size']} rank(s), not 2")
    a, b = (torch.load(root / "runs" / "toy_pretrain" / run / "checkpoints" / "last.ckpt", map_location="cpu",
                       weights_only=False) for run in ("A", "B"))
    differences = checkpoint_differences(a, b)
    if differences:
        raise RuntimeError(f"resumed run B differs from run A: {differences}")
    return (f"2 gloo ranks on {device}, {DDP_STEPS} steps; pre-empted at step {DDP_PREEMPT_AT} and resumed: "
            f"weights and optimiser state equal to the uninterrupted run")


def evaluate_part(args, device: torch.device, data: Path, checkpoint: Path, out: Path) -> str:
    import evaluate

    doc = evaluate.main(["--model", str(checkpoint), "--data", str(data / "toy-opa"), "--split", "test",
                         "--num-samples", "20", "--device", str(device), "--no-progress", "--out", str(out)])
    metrics = doc["metrics"]
    return f"{metrics['num_samples']} scenes, tpr@20 {metrics['tpr@20']:.3f}, fpr@20 {metrics['fpr@20']:.3f}"


def insert_part(device: torch.device, checkpoint: Path, work: Path) -> str:
    from PIL import Image, ImageDraw

    import insert
    from genloc.testing import save_tiny_sd_inpainter

    photo = Image.new("RGB", (256, 192), (150, 170, 200))
    ImageDraw.Draw(photo).rectangle((0, 120, 255, 191), fill=(90, 120, 70))  # sky over ground
    photo.save(work / "scene.png")
    pipeline = save_tiny_sd_inpainter(work / "tiny_sd_inpaint")
    code = insert.main(["--image", str(work / "scene.png"), "--category", "dog", "--model", str(checkpoint),
                        "--inpainter", str(pipeline), "--n", "1", "--steps", "2", "--resolution", "64",
                        "--device", str(device), "--out", str(work / "insert")])
    edits = sorted((work / "insert").glob("*_edit_*.png"))
    if code or not edits:
        raise RuntimeError(f"insert.py returned {code} and wrote {len(edits)} edits")
    return f"wrote {edits[0].name}"


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            print("smoke-gpu: no CUDA device is visible (torch.cuda.is_available() is False): run it on a GPU node, "
                  "or `python -m scripts.smoke_gpu --device cpu --tiny` for the CPU rehearsal", file=sys.stderr)
            return 2
        from benchmarks.gpu_check import select_device

        device = select_device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.out or tmp)
        work.mkdir(parents=True, exist_ok=True)
        results: list[tuple[str, bool, str]] = []

        def part(name: str, fn, *fn_args):
            start = time.perf_counter()
            try:
                value = fn(*fn_args)
            except Exception as err:  # a smoke test reports every part, whatever fails
                traceback.print_exc()
                results.append((name, False, f"{type(err).__name__}: {err}".splitlines()[0]))
                return None
            detail = value[0] if isinstance(value, tuple) else value
            results.append((name, True, f"{detail} ({time.perf_counter() - start:.0f} s)"))
            return value

        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
        results.append(("device", True, f"{device} ({name}), torch {torch.__version__}"))
        part("toy scenes", write_scenes, work / "data", args)
        trained = part("train", train_part, args, device, work / "data", work / "runs")
        if trained:
            checkpoint = trained[1]
            part("evaluate", evaluate_part, args, device, work / "data", checkpoint, work / "eval")
            part("insert", insert_part, device, checkpoint, work)
        else:
            results += [("evaluate", False, "skipped: training failed"), ("insert", False, "skipped: training failed")]
        if args.ddp:
            part("ddp", ddp_part, args, device, work / "ddp")
    print()
    for name, ok, detail in results:
        print(f"{'PASS' if ok else 'FAIL'}  {name:<10} {detail}")
    failed = [name for name, ok, _ in results if not ok]
    print(f"smoke-gpu: {'all parts passed' if not failed else 'FAILED: ' + ', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
