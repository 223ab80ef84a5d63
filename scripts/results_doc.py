"""The published toy results, generated from a `make train` run so they cannot go stale.

`summarise` reduces the recipe's ``runs/toy_results/results.json`` to the numbers the documents
quote (no local paths); `results_markdown` and `headline` render them; `write_docs` writes
``docs/results.json`` (that summary), ``docs/results.md`` and the README block between the
``toy-results`` markers, each atomically. The recipe calls `write_docs` after every full run; to
regenerate the documents from an existing run without retraining:

    python -m scripts.results_doc [runs/toy_results/results.json]
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
START, END = "<!-- toy-results:start -->", "<!-- toy-results:end -->"
# Per-class columns in the toy classes' usual order; any other class follows by name.
CLASS_ORDER = ("car", "person", "bird", "lamp")
COLUMNS = ("val_nll", "plausible_rate", "tpr@100", "fpr@100", "tpr_shared@100", "fpr_shared@100")
MLE, DPO = "MLE (toy_finetune)", "DPO (toy_dpo)"


class ResultsError(ValueError):
    """A results file without what the documents quote; the message names the key."""


def _get(doc: dict, *keys, where: str):
    for key in keys:
        if not isinstance(doc, dict) or key not in doc:
            raise ResultsError(f"{where}: no {'/'.join(keys)!r} (re-run `make train` to write a complete results.json)")
        doc = doc[key]
    return doc


def summarise(results: dict) -> dict:
    """The numbers and settings the documents show, from the recipe's ``{"stages", "rows", "settings"}``."""
    stages, rows = _get(results, "stages", where="results"), _get(results, "rows", where="results")
    nll = {MLE: _get(stages, "toy_finetune", "metrics", "val/loss", where="results.stages")}
    methods = {}
    for name, doc in rows.items():
        metrics = doc.get("metrics", {})
        methods[name] = {"val_nll": nll.get(name), "plausible_rate": _get(doc, "plausible_rate", where=f"rows[{name!r}]"),
                         **{c: metrics.get(c) for c in COLUMNS[2:]},
                         "per_class": _get(doc, "plausible_rate_per_class", where=f"rows[{name!r}]")}
    for name in (MLE, DPO):
        for column in ("tpr@100", "fpr@100"):
            if _get(methods, name, column, where="results.rows") is None:
                raise ResultsError(f"results.rows[{name!r}]: no metrics/{column} (re-run `make train` to write a "
                                   "complete results.json)")
    dpo = _get(stages, "toy_dpo", "metrics", where="results.stages")
    trust = results.get("plausibility")  # stage 4; results of older runs have none
    return {"methods": methods, **({"plausibility": _trust_summary(trust)} if trust is not None else {}),
            "stages": {name: {"max_steps": s.get("max_steps"), "minutes": s.get("minutes")} for name, s in stages.items()},
            "split": _get(rows, MLE, "split", where="results.rows"),
            "sampling": _get(rows, MLE, "sampling", where="results.rows"),
            "counts": _get(rows, MLE, "counts", where="results.rows"),
            "dpo_train": {"rewards/accuracies": dpo.get("rewards/accuracies"), "rewards/margins": dpo.get("rewards/margins")},
            "settings": results.get("settings", {})}


def _trust_summary(stage: dict) -> dict:
    """The classifier stage's numbers: its agreement with the oracle and Acc beside the oracle per method."""
    where = "results.plausibility"
    agreement = _get(stage, "agreement", where=where)
    methods = {name: {k: _get(doc, k, where=f"{where}.methods[{name!r}]") for k in
                      ("acc", "oracle_plausible_rate", "classifier_oracle_agreement", "acc_per_class",
                       "oracle_plausible_rate_per_class", "composites", "boxes_per_sample")}
               for name, doc in _get(stage, "methods", where=where).items()}
    return {"agreement": agreement, "methods": methods, "max_steps": stage.get("max_steps"),
            "train_minutes": stage.get("train_minutes"), "minutes": stage.get("minutes"),
            "val_accuracy": stage.get("metrics", {}).get("val/accuracy"),
            "val_roc_auc": stage.get("metrics", {}).get("val/roc_auc")}


def _order(methods: dict, key: str) -> list[str]:
    return sorted(methods, key=lambda name: -methods[name][key])


def trust_table(trust: dict) -> str:
    """How far Acc can be trusted (Markdown): the classifier against the oracle on held-out composites,
    per class; Acc beside the oracle's plausible rate of the same boxes per method; the two rankings."""
    a, methods = trust["agreement"], trust["methods"]
    classes = sorted(a["per_class"], key=lambda c: (CLASS_ORDER.index(c) if c in CLASS_ORDER else len(CLASS_ORDER), c))
    lines = [f"Classifier against the oracle on {a['composites']} held-out toy-opa {a['split']} composites "
             f"({a['plausible_share']:.1%} plausible): accuracy **{a['accuracy']:.3f}**.", "",
             "| classifier vs oracle | " + " | ".join(classes) + " |", "|---|" + "---|" * len(classes)]
    for key, label in (("accuracy", "accuracy"), ("fooled", "fooled: implausible judged plausible"),
                       ("missed", "missed: plausible judged implausible")):
        lines.append(f"| {label} | " + " | ".join(_cell(a["per_class"][c][key]) for c in classes) + " |")
    lines += ["", "| method | Acc (classifier) | oracle plausible rate | verdicts agreeing | "
              + " | ".join(f"Acc / oracle {c}" for c in classes) + " |", "|---|---|---|---|" + "---|" * len(classes)]
    for name, m in methods.items():
        per = [f"{_cell(m['acc_per_class'].get(c))} / {_cell(m['oracle_plausible_rate_per_class'].get(c))}"
               for c in classes]
        lines.append(f"| {name} | {_cell(m['acc'])} | {_cell(m['oracle_plausible_rate'])} | "
                     f"{_cell(m['classifier_oracle_agreement'])} | " + " | ".join(per) + " |")
    by_acc, by_oracle = _order(methods, "acc"), _order(methods, "oracle_plausible_rate")
    n = next(iter(methods.values()))["boxes_per_sample"] if methods else 0
    lines += ["", f"Acc and the oracle on the same composites (the first {n} boxes of each val image). "
              f"Ranked by Acc: {' > '.join(by_acc)}; by the oracle: {' > '.join(by_oracle)}: "
              + ("**the same order**." if by_acc == by_oracle else "**a different order**.")]
    return "\n".join(lines)


def _cell(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def table(summary: dict) -> str:
    """The method table and the per-class plausible-rate table (Markdown)."""
    methods = summary["methods"]
    lines = ["| method | val NLL / token | plausible rate | TPR@100 | FPR@100 | TPR_shared@100 | FPR_shared@100 |",
             "|---|---|---|---|---|---|---|"]
    lines += ["| " + " | ".join([name] + [_cell(m[c]) for c in COLUMNS]) + " |" for name, m in methods.items()]
    classes = sorted({c for m in methods.values() for c in m["per_class"]},
                     key=lambda c: (CLASS_ORDER.index(c) if c in CLASS_ORDER else len(CLASS_ORDER), c))
    lines += ["", "| plausible rate per class | " + " | ".join(classes) + " | all |",
              "|---|" + "---|" * (len(classes) + 1)]
    for name, m in methods.items():
        cells = [m["per_class"].get(c) for c in classes] + [m["plausible_rate"]]
        lines.append("| " + " | ".join([name] + [_cell(c) for c in cells]) + " |")
    return "\n".join(lines)


def headline(summary: dict) -> str:
    """The key numbers in two lines (the README quotes this)."""
    mle, dpo = summary["methods"][MLE], summary["methods"][DPO]
    return (f"Toy scenes (`make train`): plausible rate MLE {mle['plausible_rate']:.3f}, MLE + DPO {dpo['plausible_rate']:.3f}; "
            f"TPR@100 / FPR@100 MLE {mle['tpr@100']:.3f} / {mle['fpr@100']:.3f}, MLE + DPO {dpo['tpr@100']:.3f} / "
            f"{dpo['fpr@100']:.3f};\nMLE val NLL {mle['val_nll']:.3f} per token.")


def readme_block(summary: dict) -> str:
    """What README.md shows between the toy-results markers: the headline and where the rest is."""
    return headline(summary) + " All numbers: [docs/results.md](docs/results.md)."


def results_markdown(summary: dict) -> str:
    """docs/results.md: headline, tables, plot and the run's settings."""
    s, counts, settings = summary["sampling"], summary["counts"], summary["settings"]
    steps = ", ".join(name + ("" if st["max_steps"] is None else f" {st['max_steps']} steps") + f" ({st['minutes']} min)"
                      for name, st in summary["stages"].items())
    dpo = summary["dpo_train"]
    lines = ["<!-- Generated by `make train` (scripts/results_doc.py) from runs/toy_results/results.json; "
             "do not edit by hand. -->", "", "# Results on the toy scenes", "", headline(summary), "", table(summary), "",
             "![TPR-FPR of the toy models](toy_tpr_fpr.png)", ""]
    trust = summary.get("plausibility")
    if trust is not None:
        lines += ["## How far Acc can be trusted", "",
                  "The field's plausibility accuracy (Acc, docs/design/evaluation.md#placement-metrics) from a "
                  f"classifier trained on toy composites (toy_plausibility, {trust['max_steps']} steps, "
                  f"{trust['train_minutes']} min), checked against the scene oracle.", "", trust_table(trust), ""]
    lines += ["## Settings of this run", "",
             f"- stages: {steps}",
             f"- evaluation: {s['num_samples']} boxes per image of toy-opa {summary['split']} "
             f"({counts['num_samples']} images, {counts['num_positives']} positive and {counts['num_negatives']} "
             f"negative boxes), seed {s['seed']}, temperature {s['temperature']}, top-k {s['top_k']}, "
             f"top-p {s['top_p']}, sampling batch {s['batch_size']}",
             f"- DPO training rewards/accuracies {_cell(dpo['rewards/accuracies'])}, "
             f"margins {_cell(dpo['rewards/margins'])}"]
    lines += [f"- {key}: {value}" for key, value in settings.items()]
    return "\n".join(lines) + "\n"


def replace_block(readme: str, block: str, where: str = "README.md") -> str:
    """``readme`` with the text between the toy-results markers replaced by ``block``."""
    if readme.count(START) != 1 or readme.count(END) != 1 or readme.index(START) > readme.index(END):
        raise ResultsError(f"{where}: needs one {START} line before one {END} line around the results headline")
    head, rest = readme.split(START)
    return f"{head}{START}\n{block}\n{END}{rest.split(END, 1)[1]}"


def quoted_block(readme: str) -> str:
    """The text between the toy-results markers."""
    replace_block(readme, "")
    return readme.split(START)[1].split(END)[0].strip("\n")


def write_docs(results: dict, root: Path = ROOT, plot: Path | None = None) -> list[Path]:
    """docs/results.json, docs/results.md, README.md's block and (given ``plot``) docs/toy_tpr_fpr.png
    from one run's results; each written atomically."""
    from genloc.files import write_atomic

    summary = summarise(results)
    readme = root / "README.md"
    new_readme = replace_block(readme.read_text(), readme_block(summary), str(readme))
    outs = [root / "docs" / "results.json", root / "docs" / "results.md", readme]
    write_atomic(outs[0], json.dumps(summary, indent=1) + "\n")
    write_atomic(outs[1], results_markdown(summary))
    write_atomic(outs[2], new_readme)
    if plot is not None:
        outs.append(root / "docs" / "toy_tpr_fpr.png")
        write_atomic(outs[-1], Path(plot).read_bytes())
    return outs


def main(argv: list[str]) -> int:
    path = Path(argv[0] if argv else "runs/toy_results/results.json")
    try:
        results = json.loads(path.read_text())
        plot = path.parent / "tpr_fpr.png"
        outs = write_docs(results, plot=plot if plot.is_file() else None)
    except FileNotFoundError:
        print(f"{path}: not found; run `make train` first (it writes it)", file=sys.stderr)
        return 2
    except (json.JSONDecodeError, ResultsError) as e:
        print(f"{path}: {e}", file=sys.stderr)
        return 2
    print("wrote " + ", ".join(str(p) for p in outs))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
