"""Run-folder bookkeeping that never misleads: one process per run folder, resume from the newest
`last*.ckpt`, a `config.yaml` that describes what the run does, results never replaced by emptiness,
a run that starts over never mixed with the earlier one's files.

The rules follow the tools we wrap: Lightning's `ckpt_path="last"` takes the newest `last*.ckpt`
by modification time; LightningCLI refuses to overwrite another run's config; files are written
to a unique temporary name and renamed into place.
"""
from __future__ import annotations

import fcntl
import json
import os
import shlex
import signal
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from genloc.checkpoint import CheckpointError, current_module
from genloc.files import write_atomic

# Keys a resumed run may change: how and how long it runs, not what it learns.
RESUME_MAY_CHANGE = (
    "run_name", "resume", "init_from", "allow_unfinished", "log_root",
    "trainer.max_steps", "trainer.max_time", "trainer.accelerator", "trainer.devices", "trainer.num_nodes",
    "trainer.strategy", "trainer.enable_progress_bar", "trainer.enable_model_summary", "trainer.log_every_n_steps",
    "trainer.limit_val_batches", "trainer.profiler", "trainer.detect_anomaly",
    "data.data_dir", "data.verify", "data.num_workers", "data.eval_batch_size", "data.persistent_workers",
    "data.pin_memory", "data.padded_boxes",
    "data.prefetch_factor", "callbacks", "model.compile_decoder", "model.pretrained", "model.vit_weights",
    "model.clip_weights", "model.gpt2_weights", "module.reference", "module.one_pass", "module.compile_step", "optim.fused", "tf32",
    "logger",
)


def is_global_rank_zero() -> bool:
    """Whether this process will be global rank 0, known before the Trainer exists: torchrun's
    RANK, SLURM's SLURM_PROCID, else Lightning's launcher (NODE_RANK of the node, LOCAL_RANK of the
    process within it; unset on the process that launches the others)."""
    for var in ("RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var]) == 0
    node = os.environ.get("NODE_RANK", os.environ.get("GROUP_RANK", "0"))
    return int(node or 0) == 0 and int(os.environ.get("LOCAL_RANK", "0") or 0) == 0


class RunLock:
    """An exclusive `flock` on `<run_dir>/.lock` for the life of a run (released by the OS if the
    process dies), so two runs can never write one folder. Only global rank zero takes it."""

    NAME = ".lock"

    def __init__(self, run_dir: Path, enabled: bool = True):
        self.path = Path(run_dir) / self.NAME
        self.enabled = enabled
        self._fd: int | None = None

    def __enter__(self) -> "RunLock":
        if not self.enabled:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.read(fd, 64).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise CheckpointError(f"run folder {self.path.parent} is in use by another run (pid {owner}); "
                                  "wait for it to finish or choose another run_name") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing releases the flock
            self._fd = None


def newest_last_checkpoint(checkpoint_dir: Path) -> Path | None:
    """The newest `last*.ckpt` (Lightning's rule for `ckpt_path="last"`), or None."""
    candidates = [p for p in Path(checkpoint_dir).glob("last*.ckpt") if p.is_file()]
    return max(candidates, key=lambda p: p.stat().st_mtime_ns) if candidates else None


def remove_stale_partials(checkpoint_dir: Path) -> list[Path]:
    """Temporary files of saves that died (SIGKILL, power loss); only called under the run lock."""
    stale = [p for p in Path(checkpoint_dir).glob(".*.partial") if p.is_file()]
    for p in stale:
        p.unlink()
    return stale


def move_earlier_run_aside(run_dir: Path) -> Path | None:
    """Before a run starts over in `run_dir`, move the earlier run's files (all but the lock) to the
    first free sibling `<run_dir>.old-<n>`: kept, and shown by TensorBoard as a run of its own
    instead of a second curve under this run's name. Checkpoints go first, so an interrupted move
    never leaves a checkpoint beside a missing config. Returns the new folder (None: nothing to move).
    Only called under the run lock."""
    run_dir = Path(run_dir)
    entries = sorted((p for p in run_dir.iterdir() if p.name != RunLock.NAME), key=lambda p: p.name != "checkpoints")
    if not any(p.is_file() or any(q.is_file() for q in p.rglob("*")) for p in entries):
        return None
    n = 1
    while True:
        old = run_dir.with_name(f"{run_dir.name}.old-{n}")
        try:
            old.mkdir()
            break
        except FileExistsError:
            n += 1
    for p in entries:
        os.replace(p, old / p.name)
    return old


def _flatten(node, prefix: str = "") -> dict:
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: node}


def config_changes_on_resume(saved: DictConfig, cfg: DictConfig) -> list[str]:
    """Keys whose value differs from the run's saved config.yaml and that a resume would not honour
    (the optimiser, schedule, model and data order come from the checkpoint and the saved config).
    A ``_target_`` saved under the package's old name (``models.``) is the same target."""
    old = {k: current_module(v) if k.endswith("_target_") else v
           for k, v in _flatten(OmegaConf.to_container(saved, resolve=True)).items()}
    new = _flatten(OmegaConf.to_container(cfg, resolve=True))
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return [f"{k}: run {old.get(k)!r} vs now {new.get(k)!r}" for k in changed
            if not any(k == p or k.startswith(p + ".") for p in RESUME_MAY_CHANGE)]


def write_metrics(path: Path, metrics: dict, global_step: int) -> bool:
    """Write metrics.json unless this fit produced none (a finished run started again): a
    previous result is never replaced by an empty one. Returns whether it was written."""
    if not metrics:
        return False
    write_atomic(path, json.dumps({**metrics, "trainer/global_step": global_step}, indent=1))
    return True


STATUS = "status.json"


def write_status(run_dir: Path, finished: bool, global_step: int, stopped_by: str | None = None) -> None:
    """Record in ``<run_dir>/status.json`` whether the run finished: false from the moment it starts
    (a run killed outright stays unfinished), true once fit ended on its own (max_steps, max_time, a
    callback); ``stopped_by`` names the signal that stopped it early."""
    write_atomic(Path(run_dir) / STATUS, json.dumps({"finished": finished, "global_step": global_step,
                                                     "stopped_by": stopped_by}, indent=1))


def unfinished_run(checkpoint: Path) -> str | None:
    """Why the run that wrote ``checkpoint`` (``<run_dir>/checkpoints/*.ckpt``) is not finished, or
    None: finished, still unknown (no status.json: a run of an older version) or not a run's file."""
    checkpoint = Path(checkpoint)
    status = checkpoint.parent.parent / STATUS
    if checkpoint.parent.name != "checkpoints" or not status.is_file():
        return None
    try:
        state = json.loads(status.read_text())
    except (OSError, json.JSONDecodeError):
        return f"its run's {status} is unreadable"
    if state.get("finished", True):
        return None
    how = f"stopped by {state['stopped_by']}" if state.get("stopped_by") else "still running, or killed"
    return (f"its run {checkpoint.parent.parent} did not finish ({how} at step {state.get('global_step', '?')}; "
            f"{status})")


# The metrics train.py prints when a run ends (all of them are in metrics.json).
SUMMARY_KEYS = ("train/loss", "val/loss", "val/token_acc", "val/plausible_rate", "val/tpr@100", "val/fpr@100",
                "rewards/accuracies", "rewards/margins",
                "val/accuracy", "val/roc_auc")


def report(result: dict, argv: list[str], cfg: DictConfig) -> int:
    """Print how the run ended; the exit status: 0 when it finished or was pre-empted by SIGUSR1 (the
    requeued job continues it), 128 + the signal number when SIGTERM (143) or SIGINT (130) stopped it."""
    ckpt = result["run_dir"] / "checkpoints" / "last.ckpt"
    stopped_by = result["stopped_by"]
    if stopped_by == "SIGUSR1":
        print(f"pre-empted at step {result['preempted_at']}: {ckpt} saved; "
              "run the same command (or let SLURM requeue it) to resume")
    elif stopped_by is not None:
        print(f"stopped by {stopped_by} at step {result['preempted_at']} (not finished): {ckpt} saved; resume with: "
              f"python train.py {shlex.join(argv)}", file=sys.stderr)
        return 128 + signal.Signals[stopped_by].value
    metrics = result["metrics"]
    logger = (f"TensorBoard: tensorboard --logdir {result['run_dir']}" if cfg.logger._target_.endswith("TensorBoardLogger")
              else f"logger: {cfg.logger._target_}")
    print(f"run dir: {result['run_dir']} (all metrics: metrics.json, {logger})")
    for key in SUMMARY_KEYS:
        if key in metrics:
            print(f"  {key:<20} {metrics[key]:.4f}")
    return 0
