"""Export a trained checkpoint as a model folder (config.json, model.safetensors, README.md) and
optionally push it to the Hugging Face Hub. ``--model`` takes what every entry point takes
(`genloc.hub.load_model`): a model folder or Hub id is written again as a local folder.

    python -m scripts.export --model runs/toy_dpo/default/checkpoints/last.ckpt --out runs/toy_model
    python -m scripts.export --model CKPT --out DIR --push-to-hub user/genloc-toy

The model card lists the training stages (followed back through each run's ``init_from`` /
``module.reference``), the metrics of the run's ``metrics.json`` and, with ``--eval``, those of an
evaluate.py ``metrics.json``. The folder is written under a temporary name and renamed, so ``DIR``
never holds half an export; an existing ``DIR`` is replaced only if it is a model folder.
Bad input: one line on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from genloc.arguments import add_model_argument, text
from genloc.hub import FILES


class ExportError(RuntimeError):
    """Bad input; the message says what is wrong and what to do."""


def stage_info(run_dir: Path) -> tuple[dict, str | None]:
    """(one stage's row for the model card, the checkpoint it started from) from ``run_dir/config.yaml``."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(run_dir / "config.yaml")
    parent = OmegaConf.select(cfg, "init_from")
    if str(OmegaConf.select(cfg, "module._target_", default="")).endswith("DPOModule"):
        objective = (f"DPO (beta {OmegaConf.select(cfg, 'module.beta')}, "
                     f"sft_weight {OmegaConf.select(cfg, 'module.sft_weight', default=0)})")
        parent = parent or OmegaConf.select(cfg, "module.reference")  # the policy starts from the reference
    else:
        objective = "MLE"
    row = {"experiment": OmegaConf.select(cfg, "experiment", default=run_dir.parent.name), "objective": objective,
           "data": OmegaConf.select(cfg, "data.data_dir", default="?"),
           "steps": OmegaConf.select(cfg, "trainer.max_steps", default="?")}
    return row, parent


def run_info(checkpoint: Path, eval_metrics: Path | None) -> dict:
    """What the model card says about the run: stages (oldest first), metrics, sources."""
    info: dict = {"checkpoint": str(checkpoint), "stages": [], "metrics": {}, "metrics_files": []}
    run_dir = checkpoint.resolve().parent.parent if checkpoint.parent.name == "checkpoints" else None
    seen = set()
    current = run_dir
    while current is not None and (current / "config.yaml").is_file() and current not in seen:
        seen.add(current)
        row, parent = stage_info(current)
        info["stages"].insert(0, row)
        current = Path(parent).resolve().parent.parent if parent else None
    if run_dir is not None and (run_dir / "metrics.json").is_file():
        info["metrics"] = json.loads((run_dir / "metrics.json").read_text())
        info["metrics_files"].append(str(checkpoint.parent.parent / "metrics.json"))
    if eval_metrics is not None:
        try:
            doc = json.loads(eval_metrics.read_text())
            metrics = doc["metrics"]
        except (OSError, json.JSONDecodeError, KeyError) as err:
            raise ExportError(f"--eval {eval_metrics}: not a metrics.json written by evaluate.py ({err})") from None
        n = max(doc.get("ns") or [100])
        picked = {f"eval/{k}": metrics[k] for k in (f"tpr@{n}", f"fpr@{n}", f"tpr_shared@{n}", f"fpr_shared@{n}")
                  if k in metrics}
        if doc.get("plausible_rate") is not None:
            picked["eval/plausible_rate"] = doc["plausible_rate"]
        info["metrics"].update(picked)
        info["metrics_files"].append(str(eval_metrics))
    return info


def export(checkpoint: str | Path, out: str | Path, push_to_hub: str | None = None,
           eval_metrics: str | Path | None = None, allow_unfinished: bool = False) -> Path:
    """Write the model folder ``out`` from ``checkpoint`` (atomically) and push it if asked; a
    checkpoint of a run that did not finish only with ``allow_unfinished``."""
    from genloc.checkpoint import ModelSourceError
    from genloc.files import OutputError, prepare_output_dir
    from genloc.hub import load_model
    from lightning_modules.run_files import unfinished_run

    checkpoint, out = Path(checkpoint), Path(out)
    why = unfinished_run(checkpoint)
    if why and not allow_unfinished:
        raise ExportError(f"--model {checkpoint}: {why}; resume that run to its end first (the same train.py "
                          "command), or pass --allow-unfinished to export it anyway")
    if out.name in ("", ".", ".."):  # the folder is written beside its target and renamed over it
        raise ExportError(f"--out {out}: name the model folder (e.g. --out {Path('runs') / 'my_model'}), "
                          "not the current or a parent folder")
    if out.exists() and (not out.is_dir() or not set(os.listdir(out)) <= set(FILES)):
        raise ExportError(f"--out {out} exists and is not a model folder; choose a new or empty folder")
    try:  # the folder is written beside its target: that location must take files, before the model loads
        prepare_output_dir(out.parent, f"--out {out}: its folder")
    except OutputError as err:
        raise ExportError(str(err)) from None
    try:
        model = load_model(checkpoint)
    except ModelSourceError as err:
        raise ExportError(str(err)) from None
    info = run_info(checkpoint, Path(eval_metrics) if eval_metrics else None)
    partial = out.with_name(f".{out.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        model.save_pretrained(partial, model_card_kwargs={"model_id": push_to_hub or str(out), "run": info})
    except OSError as err:  # a full disk or a vanished mount while writing: no half folder, the old one kept
        shutil.rmtree(partial, ignore_errors=True)
        raise ExportError(f"--out {out}: the model folder could not be written ({err.strerror or err}); "
                          f"{'the previous export there is kept' if out.exists() else 'nothing was written'}; "
                          "free space or choose another location") from None
    if out.exists():
        old = out.with_name(f".{out.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
        os.replace(partial, out)
        shutil.rmtree(old)
    else:
        os.replace(partial, out)
    if push_to_hub:
        push(out, push_to_hub)
    return out


def push(folder: Path, repo_id: str) -> str:
    """Upload the exported folder as it is (create the repo if needed)."""
    from huggingface_hub import HfApi

    from genloc.pretrained import hub_offline

    if hub_offline():
        raise ExportError(f"cannot push to {repo_id}: HF_HUB_OFFLINE=1 forbids network access; unset it "
                          f"(the folder {folder} is written)")
    api = HfApi()
    try:
        repo = api.create_repo(repo_id, exist_ok=True).repo_id
        return api.upload_folder(folder_path=str(folder), repo_id=repo, commit_message="Upload GenLoc location model")
    except Exception as err:  # auth, network, bad id: say so in one line; the folder stays written
        raise ExportError(f"push to {repo_id} failed ({type(err).__name__}: {str(err)[:300]}); the folder {folder} "
                          "is written; log in with `hf auth login` and retry") from None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_argument(p, "Lightning checkpoint written by train.py (or a model folder or Hub id, to write it again "
                          "as a local folder)", required=True)
    p.add_argument("--out", type=text, required=True, help="model folder to write")
    p.add_argument("--push-to-hub", type=text, metavar="REPO_ID", help="also upload the folder to this Hub repo (owner/name)")
    p.add_argument("--eval", type=text, metavar="METRICS_JSON", help="evaluate.py metrics.json whose TPR/FPR go into the card")
    p.add_argument("--allow-unfinished", action="store_true",
                   help="export a checkpoint of a run that did not finish (stopped, killed or still running)")
    args = p.parse_args(argv)
    from genloc.hub import is_model_source

    if not is_model_source(args.model):
        p.error(f"--model {args.model} not found (train a model first: `make train`)")
    if args.eval and not Path(args.eval).is_file():
        p.error(f"--eval {args.eval} not found")
    try:
        out = export(args.model, args.out, args.push_to_hub, args.eval, args.allow_unfinished)
    except ExportError as err:
        print(f"export: error: {err}", file=sys.stderr)
        return 2
    pushed = f"; pushed to {args.push_to_hub}" if args.push_to_hub else ""
    print(f"wrote model folder {out} ({', '.join(FILES)}){pushed}")
    print(f"load it with: GenLocModel.from_pretrained({str(out)!r})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
