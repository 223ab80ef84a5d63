"""`make train`: the paper's three-stage recipe on the built-in toy scenes, on a CPU, in minutes.

toy data (generated once) -> toy_pretrain (MLE, toy-pipe) -> toy_finetune (MLE, toy-opa positives)
-> toy_dpo (DPO, toy-opa pairs, frozen toy_finetune reference) -> evaluation (evaluate.py) on toy-opa
val of both models and two baselines (uniform random boxes; image-blind: random training boxes of
the class): oracle plausible rate of 100 sampled boxes per image (the toy data kind's oracle),
TPR/FPR@100, and the TPR-FPR curves in one plot -> the DPO model exported as a model folder
(`<log_root>/toy_model`, see scripts/export.py). Every stage resumes from its last.ckpt, so a re-run only finishes
what is missing. Extra `key=value` arguments are passed to every stage (e.g. `log_root=/tmp/runs`).
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

STAGES = ("toy_pretrain", "toy_finetune", "toy_dpo")
# Per-class columns in the README's order of the toy classes; any other class follows by name.
CLASS_ORDER = ("car", "person", "bird", "lamp")


def run_stages(extra: list[str]) -> dict[str, dict]:
    from configs.schema import load_config
    from train import train

    results = {}
    for name in STAGES:
        start = time.perf_counter()
        print(f"\n=== {name} ===", flush=True)
        result = train(load_config([f"experiment={name}"] + extra))
        results[name] = {"metrics": result["metrics"], "run_dir": str(result["run_dir"]),
                         "minutes": round((time.perf_counter() - start) / 60, 2)}
    return results


def evaluate_all(stages: dict, data_dir: Path, out: Path, seed: int) -> dict[str, dict]:
    """Same sampling budget for every method: 100 boxes per toy-opa val image, one seed."""
    from metrics.evaluation import evaluate, plot_results
    from metrics.sampling import Sampling

    common = dict(split="val", sampling=Sampling(seed=seed), progress=False)
    ckpt = lambda stage: f"{stages[stage]['run_dir']}/checkpoints/last.ckpt"  # noqa: E731
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


def table(stages: dict, rows: dict) -> str:
    lines = ["| method | val NLL / token | plausible rate | TPR@100 | FPR@100 | TPR_shared@100 | FPR_shared@100 |",
             "|---|---|---|---|---|---|---|"]
    nll = {"MLE (toy_finetune)": stages["toy_finetune"]["metrics"].get("val/loss")}
    for name, doc in rows.items():
        m = doc.get("metrics", {})
        cells = [nll.get(name), doc.get("plausible_rate"), m.get("tpr@100"), m.get("fpr@100"), m.get("tpr_shared@100"), m.get("fpr_shared@100")]
        lines.append("| " + " | ".join([name] + ["-" if c is None else f"{c:.3f}" for c in cells]) + " |")
    classes = sorted(next(iter(rows.values())).get("plausible_rate_per_class", {}),
                     key=lambda c: (CLASS_ORDER.index(c) if c in CLASS_ORDER else len(CLASS_ORDER), c))
    lines += ["", "| plausible rate per class | " + " | ".join(classes) + " | all |",
              "|---|" + "---|" * (len(classes) + 1)]
    for name, doc in rows.items():
        per_class = doc.get("plausible_rate_per_class", {})
        cells = [per_class.get(c) for c in classes] + [doc.get("plausible_rate")]
        lines.append("| " + " | ".join([name] + ["-" if c is None else f"{c:.3f}" for c in cells]) + " |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    from configs.schema import load_config

    cfg = load_config(argv)
    start = time.perf_counter()
    stages = run_stages(argv)
    out = Path(cfg.log_root) / "toy_results"
    rows = evaluate_all(stages, Path(load_config(["experiment=toy_finetune"] + argv).data.data_dir), out, cfg.seed)
    text = table(stages, rows)
    minutes = (time.perf_counter() - start) / 60
    dpo = stages["toy_dpo"]["metrics"]
    summary = (f"{text}\n\nstage minutes: " + ", ".join(f"{k} {v['minutes']}" for k, v in stages.items())
               + f"; total {minutes:.1f} min\nDPO train rewards/accuracies {dpo.get('rewards/accuracies', float('nan')):.3f},"
               f" margins {dpo.get('rewards/margins', float('nan')):.3f}\nplot: {out / 'tpr_fpr.png'}")
    (out / "results.md").write_text(summary + "\n")
    (out / "results.json").write_text(json.dumps({"stages": stages, "rows": rows}, indent=1, default=str))
    print("\n" + summary)
    from scripts.export import export

    model_dir = export(Path(stages["toy_dpo"]["run_dir"]) / "checkpoints" / "last.ckpt", Path(cfg.log_root) / "toy_model",
                       eval_metrics=out / "dpo" / "metrics.json")
    print(f"\nexported the DPO model to {model_dir}: GenLocModel.from_pretrained({str(model_dir)!r}), "
          "then place(...) / place_many(...) (README, 'Use a trained model')")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
