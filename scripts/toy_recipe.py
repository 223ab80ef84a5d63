"""`make train`: the paper's three-stage recipe on the built-in toy scenes, on a CPU, in minutes.

toy data (generated once) -> toy_pretrain (MLE, toy-pipe) -> toy_finetune (MLE, toy-opa positives)
-> toy_dpo (DPO, toy-opa pairs, frozen toy_finetune reference) -> evaluation (evaluate.py) on toy-opa
val of both models and two baselines (uniform random boxes; image-blind: random training boxes of
the class): oracle plausible rate of 100 sampled boxes per image (the toy data kind's oracle),
TPR/FPR@100, and the TPR-FPR curves in one plot -> the plausibility classifier (toy_plausibility) and
how far its Acc can be trusted against the oracle (`plausibility_stage`) -> the DPO model exported as a model folder
(`<log_root>/toy_model`, see scripts/export.py). Every stage resumes from its last.ckpt, so a re-run only finishes
what is missing. Extra `key=value` arguments are passed to every stage (e.g. `log_root=/tmp/runs`).
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STAGES = ("toy_pretrain", "toy_finetune", "toy_dpo")


def run_stages(extra: list[str]) -> dict[str, dict]:
    from configs.schema import load_config
    from train import train

    results = {}
    for name in STAGES:
        start = time.perf_counter()
        print(f"\n=== {name} ===", flush=True)
        cfg = load_config([f"experiment={name}"] + extra)
        result = train(cfg)
        results[name] = {"metrics": result["metrics"], "run_dir": str(result["run_dir"]), "max_steps": cfg.trainer.max_steps,
                         "minutes": round((time.perf_counter() - start) / 60, 2)}
    return results


def evaluate_all(stages: dict, data_dir: Path, out: Path, seed: int) -> dict[str, dict]:
    """Same sampling budget for every method: 100 boxes per toy-opa val image, one seed."""
    from metrics.evaluation import evaluate, plot_results
    from metrics.sampling import Sampling

    common = dict(split="val", sampling=Sampling(seed=seed), progress=False)

    def ckpt(stage: str) -> str:
        return f"{stages[stage]['run_dir']}/checkpoints/last.ckpt"

    rows = {
        "uniform random boxes": evaluate(data_dir, out / "random", baseline="random", **common),
        "MLE (toy_finetune)": evaluate(data_dir, out / "mle", checkpoint=ckpt("toy_finetune"), name="MLE", **common),
        "DPO (toy_dpo)": evaluate(data_dir, out / "dpo", checkpoint=ckpt("toy_dpo"), name="DPO", **common),
    }
    blind = evaluate(data_dir, out / "blind", baseline="blind", **common)
    # The table shows the image-blind sampler's plausible rates only (its TPR/FPR: out/blind/metrics.json).
    rows["image-blind (train box of the class)"] = {k: blind[k] for k in ("plausible_rate", "plausible_rate_per_class")}
    plot_results([str(out / name / "metrics.json") for name in ("mle", "dpo", "random")], out / "tpr_fpr.png",
                 ["MLE", "MLE + DPO", "random"])
    return rows


# Rows of the trust table: the recipe's evaluation folder of each method (evaluate_all writes them).
PLACEMENT_METHODS = {"uniform random boxes": "random", "image-blind (train box of the class)": "blind",
                     "MLE (toy_finetune)": "mle", "DPO (toy_dpo)": "dpo"}


def plausibility_stage(extra: list[str], data_dir: Path, out: Path, seed: int) -> dict:
    """Stage 4, after everything above (it draws from no generator they use): the plausibility classifier
    (experiment=toy_plausibility), its accuracy against the oracle on held-out toy-opa test composites
    (positives, near misses and one uniform box per image), and Acc beside the oracle's plausible rate
    on the first 10 of each method's 100 boxes per val image (docs/design/evaluation.md#placement-metrics)."""
    from configs.schema import load_config
    from lightning_modules.plausibility import load_classifier
    from metrics.placement_scores import BOXES_PER_SAMPLE, classifier_agreement, placement_scores
    from metrics.predictions import read_predictions
    from train import train

    start = time.perf_counter()
    print("\n=== toy_plausibility ===", flush=True)
    cfg = load_config(["experiment=toy_plausibility"] + extra)
    result = train(cfg)
    classifier = load_classifier(Path(result["run_dir"]) / "checkpoints" / "last.ckpt")
    train_minutes = round((time.perf_counter() - start) / 60, 2)
    agreement = classifier_agreement(classifier, data_dir, "test", random_boxes=1, seed=seed)
    methods = {name: placement_scores(data_dir, "val", read_predictions(out / folder / "predictions.jsonl",
                                                                        BOXES_PER_SAMPLE), classifier=classifier)
               for name, folder in PLACEMENT_METHODS.items()}
    return {"metrics": result["metrics"], "run_dir": str(result["run_dir"]), "max_steps": cfg.trainer.max_steps,
            "train_minutes": train_minutes, "minutes": round((time.perf_counter() - start) / 60, 2),
            "agreement": agreement, "methods": methods}


def run_settings() -> dict:
    """What the numbers may depend on besides the code's defaults: commit, torch, threads, CPU."""
    import os
    import platform
    import subprocess

    import torch

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, cwd=ROOT)
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), platform.processor())
    return {"commit": (commit.stdout.strip() or "unknown") + (" (uncommitted changes)" if dirty.stdout.strip() else ""),
            "torch": torch.__version__, "torch threads": torch.get_num_threads(),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "unset"), "cpu": cpu or "unknown"}


def plausibility_only(argv: list[str]) -> int:
    """`python -m scripts.toy_recipe plausibility [key=value ...]`: stage 4 alone on the finished recipe run
    under ``log_root`` (its results.json and evaluation folders), added to that results.json."""
    from configs.schema import load_config
    from genloc.files import write_atomic
    from scripts import results_doc

    cfg = load_config(argv)
    out = Path(cfg.log_root) / "toy_results"
    if not (out / "results.json").is_file():
        print(f"{out / 'results.json'} not found: run the recipe (make train) with this log_root first", file=sys.stderr)
        return 2
    results = json.loads((out / "results.json").read_text())
    data_dir = Path(load_config(["experiment=toy_finetune"] + argv).data.data_dir)
    results["plausibility"] = plausibility_stage(argv, data_dir, out, cfg.seed)
    write_atomic(out / "results.json", json.dumps(results, indent=1, default=str))
    print("\n" + results_doc.trust_table(results_doc.summarise(results)["plausibility"]))
    print(f"\nstage minutes: toy_plausibility {results['plausibility']['minutes']} (training "
          f"{results['plausibility']['train_minutes']}); to publish: python -m scripts.results_doc {out / 'results.json'}")
    return 0


def main(argv: list[str]) -> int:
    if argv[:1] == ["plausibility"]:
        return plausibility_only(argv[1:])
    from configs.schema import load_config
    from genloc.files import write_atomic
    from scripts import results_doc

    cfg = load_config(argv)
    settings = run_settings()  # before training: the commit whose code runs
    start = time.perf_counter()
    stages = run_stages(argv)
    out = Path(cfg.log_root) / "toy_results"
    rows = evaluate_all(stages, Path(load_config(["experiment=toy_finetune"] + argv).data.data_dir), out, cfg.seed)
    results = {"stages": stages, "rows": rows, "settings": settings}
    text = results_doc.table(results_doc.summarise(results))
    data_dir = Path(load_config(["experiment=toy_finetune"] + argv).data.data_dir)
    results["plausibility"] = plausibility_stage(argv, data_dir, out, cfg.seed)
    minutes = (time.perf_counter() - start) / 60
    dpo = stages["toy_dpo"]["metrics"]
    summary = (f"{text}\n\nstage minutes: " + ", ".join(f"{k} {v['minutes']}" for k, v in stages.items())
               + f"; total {minutes:.1f} min\nDPO train rewards/accuracies {dpo.get('rewards/accuracies', float('nan')):.3f},"
               f" margins {dpo.get('rewards/margins', float('nan')):.3f}\nplot: {out / 'tpr_fpr.png'}")
    summary += "\n\n" + results_doc.trust_table(results_doc.summarise(results)["plausibility"])
    write_atomic(out / "results.md", summary + "\n")
    write_atomic(out / "results.json", json.dumps(results, indent=1, default=str))
    print("\n" + summary)
    if argv:
        print(f"\ndocs/results.md and the README's results not updated (run with overrides {argv}); to publish "
              f"this run: python -m scripts.results_doc {out / 'results.json'}")
    else:
        print("\nwrote " + ", ".join(str(p) for p in results_doc.write_docs(results, plot=out / "tpr_fpr.png")))
    from scripts.export import export

    model_dir = export(Path(stages["toy_dpo"]["run_dir"]) / "checkpoints" / "last.ckpt", Path(cfg.log_root) / "toy_model",
                       eval_metrics=out / "dpo" / "metrics.json")
    print(f"\nexported the DPO model to {model_dir}: GenLocModel.from_pretrained({str(model_dir)!r}), "
          "then place(...) / place_many(...) (README, 'Use a trained model')")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
