"""TPR-FPR evaluation (docs/design/evaluation.md#tpr-fpr) of a checkpoint, of any method's predictions file, or of a baseline.

    python evaluate.py --model runs/x/checkpoints/last.ckpt --data data/toy/toy-opa --split test
    python evaluate.py --model runs/toy_model --data data/toy/toy-opa --split val --given-size
    python evaluate.py --predictions preds.jsonl --annotations fopa_test_data_pair.csv
    python evaluate.py --predictions preds.jsonl --data data/toy/toy-opa --split val --rerank runs/toy_model --keep 10
    python evaluate.py --baseline random_gt_size --annotations data/opa --split test
    python evaluate.py --baseline blind --data data/toy/toy-opa --split val
    python evaluate.py --plot ours/metrics.json random/metrics.json --out fig.png

The command line of `metrics.evaluation.evaluate` (annotations: `metrics.annotations`, predictions
files and baselines: `metrics.predictions`, model sampling: `metrics.sampling`). Evaluation modes write ``predictions.jsonl`` (not in
predictions mode), ``metrics.json`` and ``tpr_fpr.png`` into ``--out``. Predictions and annotations are pixel ``x1,y1,x2,y2`` boxes; keys
must match the annotation keys (shard ``__key__``, or ``opa-{bg}-{category}`` /
``opa-{bg}-fg{fg_id}`` for raw OPA / FOPA label files, see ``datamodules.opa_labels``; keys are
tar-safe, ``opa-1-traffic%20light``, and a prediction key written with the raw name is accepted).
Checkpoint mode scores the boxes it just wrote exactly as predictions mode would re-score them.
When the annotations are a shard folder whose kind has a plausibility oracle (``{split}.json``
"source", see ``datamodules.kinds``; the toy scenes have one), metrics.json also holds the oracle's
plausible rate of the scored boxes, overall and per class.
``--model`` takes a Lightning checkpoint, a model folder or a Hub id (``scripts/export.py``); ``--checkpoint``
is its former name.
Ranking (docs/design/evaluation.md#ranking): with a model (``--model``, ``--rerank``) or the
blind baseline, metrics.json's ``ranking`` block holds how well the model's log-probability (the
blind baseline: its class's box density) orders each sample's labelled positives above its
negatives: pairwise accuracy and ROC-AUC, pooled and per class. ``--rerank MODEL --keep K`` (with
``--predictions`` and a shard folder) orders each sample's predicted boxes by MODEL's score and keeps
the first K before TPR-FPR (default --ns: 10, 20, ... K).
``--given-size`` (ours, docs/design/evaluation.md#given-size; the FOPA / TopNet / GracoNet setting): the labelled boxes of a
sample are split into groups of one foreground size (OPA: one group per foreground and scale;
pooled samples may hold several), and for each group N boxes of exactly that size (to within half
a bin; sizes are clamped to 1..num_bins-1 bins) are drawn, so the model only chooses where. Each
group is scored as its own sample (key ``{key}@{w}x{h}``); every labelled box still counts once.
Placement metrics (docs/design/evaluation.md#placement-metrics): ``--classifier CKPT`` (a plausibility
classifier, ``experiment=toy_plausibility``), ``--inception-weights FILE``, ``--lpips-weights FILE``
paste each sample's first ``--composites-per-sample`` boxes as copy-paste composites (a local shard
folder) and add Acc, FID and LPIPS diversity to metrics.json (``placement``).

Inputs are checked like training inputs, by the one box rule of `genloc.boxes`: a shard sample with
a broken labelled box is skipped and counted (as the training pipeline skips it), a broken box of a
label file is dropped and counted (as the converters drop it); a key found twice in a split is an
error naming both shards. Predicted boxes that break the rule (swapped corners, x/y/w/h order,
normalised coordinates, another image size) are scored as given -- they hit nothing -- with a
warning saying what they look like; when no predicted box is valid nothing is scored (exit 2).
Only the first max(--ns) boxes of each prediction line are kept. When some sample has fewer boxes
than max(--ns), the curve stops at the fewest any sample has (with a warning), so a point "@n"
always means n boxes per sample. Every error is one line and exit code 2.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from genloc.arguments import add_model_argument, text
from genloc.config import ArgumentError
from genloc.files import OutputError
from metrics.options import BASELINES, MAX_SAMPLING_BATCH, Sampling, default_device


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="evaluate.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    mode = p.add_mutually_exclusive_group(required=True)
    add_model_argument(mode, "location model to sample boxes from: a Lightning checkpoint, a model folder "
                             "(scripts/export.py) or a Hub id")
    mode.add_argument("--predictions", type=text, help="JSONL predictions {key, boxes (pixels)} of any method")
    mode.add_argument("--baseline", choices=BASELINES, help="built-in seeded baseline (blind: random training "
                      "positives of the same class, from --train-split of the shard folder)")
    mode.add_argument("--plot", nargs="+", metavar="METRICS_JSON", help="draw several result files on one plot")
    p.add_argument("--data", type=text, help="shard folder or URL (https://, s3://, gs://, ..., pipe:...{}; checkpoint mode; "
                                  "also accepted as --annotations)")
    p.add_argument("--annotations", type=text, help="shard folder, raw OPA csv, or FOPA *_data_pair.csv / *_pair_new.json")
    p.add_argument("--split", type=text, default="test", help="shard split (default: test)")
    p.add_argument("--train-split", type=text, default="train", help="shard split the blind baseline draws from (default: train)")
    p.add_argument("--out", type=text, default="results/eval", help="output folder (a .png path for --plot)")
    p.add_argument("--name", type=text, help="method name in metrics.json and legends")
    p.add_argument("--labels", nargs="+", help="legend names for --plot (default: each file's method)")
    p.add_argument("--num-samples", type=int, default=Sampling.num_samples, help="boxes drawn per sample, N (default %(default)s)")
    p.add_argument("--ns", type=int, nargs="+", help="curve points (default 10 20 ... N)")
    p.add_argument("--iou-threshold", type=float, default=0.5, help="tau; IoU >= tau is a hit (default 0.5)")
    p.add_argument("--seed", type=int, default=Sampling.seed)
    p.add_argument("--temperature", type=float, default=Sampling.temperature)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--batch-size", type=int, default=None,
                   help=f"images per sampling call (default: {MAX_SAMPLING_BATCH}, fewer when --sampling-memory "
                        "allows fewer); the boxes drawn for a seed depend on it, so it is recorded")
    p.add_argument("--sampling-memory", type=float, default=Sampling.sampling_memory, metavar="GIB",
                   help="memory budget of one sampling call in GiB, sizes the batch when --batch-size is not "
                        "given (default %(default)g)")
    p.add_argument("--num-workers", type=int, default=Sampling.num_workers)
    p.add_argument("--device", help="where sampling runs (default: cuda when present, else cpu)")
    p.add_argument("--bf16", action="store_true", help="decode in bf16 autocast (a GPU speed option; docs/gpu.md)")
    p.add_argument("--allow-missing", action="store_true", help="score annotated samples without predictions as empty")
    p.add_argument("--allow-incomplete", action="store_true",
                   help="score a split whose shards hold fewer samples than {split}.json records (damaged shards), "
                        "recording the shortfall in metrics.json (default: stop)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--rerank", metavar="MODEL", help="(with --predictions) order each sample's boxes by this location "
                   "model's log-probability (checkpoint, model folder or Hub id) and keep the first --keep")
    p.add_argument("--keep", type=int, help="boxes kept per sample after --rerank")
    p.add_argument("--given-size", action="store_true",
                   help="(with --model) draw boxes of each labelled foreground size: the model only picks where")
    placement = p.add_argument_group("placement metrics (docs/design/evaluation.md#placement-metrics; shard folder only)")
    placement.add_argument("--classifier", type=text, help="plausibility classifier checkpoint (experiment=toy_plausibility): Acc")
    placement.add_argument("--inception-weights", type=text, help="local torchvision Inception-v3 weights file: FID")
    placement.add_argument("--lpips-weights", type=text, help="local torchvision AlexNet weights file: LPIPS diversity")
    placement.add_argument("--composites-per-sample", type=int, default=10, help="boxes per sample pasted (default %(default)s)")
    args = p.parse_args(argv)
    from genloc.sampling import check_filter_args  # torch: after parsing, so --help answers at once
    from metrics.evaluation import default_ns

    args.device = args.device or default_device()
    try:
        check_filter_args(args.temperature, args.top_k, args.top_p)
    except ArgumentError as e:
        p.error(f"--{e.name.replace('_', '-')} must be {e.allowed}, got {e.value}")
    checks = (("--num-samples", args.num_samples, args.num_samples >= 1, ">= 1"),
              ("--iou-threshold", args.iou_threshold, 0 < args.iou_threshold <= 1, "in (0, 1]"),
              ("--batch-size", args.batch_size, args.batch_size is None or args.batch_size >= 1, ">= 1"),
              ("--sampling-memory", args.sampling_memory, args.sampling_memory > 0, "> 0 GiB"),
              ("--num-workers", args.num_workers, args.num_workers >= 0, ">= 0"))
    for flag, value, ok, allowed in checks:
        if not ok:
            p.error(f"{flag} must be {allowed}, got {value}")
    if args.ns and (min(args.ns) < 1 or sorted(set(args.ns)) != args.ns):
        p.error(f"--ns must be increasing whole numbers >= 1, got {args.ns}")
    if (args.rerank is None) != (args.keep is None) or (args.rerank and not args.predictions):
        p.error("--rerank MODEL and --keep K go together, with --predictions")
    if args.keep is not None and args.keep < 1:
        p.error(f"--keep must be >= 1, got {args.keep}")
    args.ns = args.ns or default_ns(args.keep or args.num_samples)
    if max(args.ns) > (args.keep or args.num_samples):
        p.error(f"--ns goes up to {max(args.ns)} but " + (f"--keep is {args.keep}" if args.keep else
                                                         f"--num-samples is {args.num_samples}"))
    if (args.classifier or args.inception_weights or args.lpips_weights) and not (
            args.composites_per_sample >= 1 and Path(args.data or args.annotations or "").is_dir()):
        p.error("--classifier/--inception-weights/--lpips-weights need a local shard folder (--data) and "
                "--composites-per-sample >= 1")
    if args.given_size and not args.model:
        p.error("--given-size needs --model (it constrains the model's sampler)")
    if args.model and not (args.data or args.annotations):
        p.error("--model needs --data (shard folder)")
    if (args.predictions or args.baseline) and not (args.annotations or args.data):
        p.error("--predictions/--baseline need --annotations (shard folder or OPA/FOPA label file)")
    from datamodules.shard_reader import is_url

    if args.baseline == "blind" and not (is_url(args.annotations or args.data)
                                         or Path(args.annotations or args.data).is_dir()):
        p.error("--baseline blind draws training boxes from --train-split of a shard folder: give --data/--annotations "
                "as a shard folder")
    return args



def main(argv=None) -> dict | None:
    args = parse_args(argv)
    from metrics.evaluation import evaluate, plot_results
    if args.plot:
        plot_results(args.plot, Path(args.out), args.labels)
        return None
    sampling = Sampling(num_samples=args.num_samples, temperature=args.temperature, top_k=args.top_k,
                        top_p=args.top_p, seed=args.seed, batch_size=args.batch_size,
                        sampling_memory=args.sampling_memory, num_workers=args.num_workers, device=args.device,
                        bf16=args.bf16)
    networks = None
    if args.classifier or args.inception_weights or args.lpips_weights:  # built first: a missing file stops at once
        from genloc.checkpoint import ModelSourceError
        from lightning_modules.plausibility import load_classifier
        from metrics.annotations import EvaluationError
        from metrics.placement import MetricWeightsError
        from metrics.placement_scores import placement_networks

        try:
            classifier = load_classifier(args.classifier, args.device) if args.classifier else None
            networks = placement_networks(classifier, args.inception_weights, args.lpips_weights, args.device)
        except (MetricWeightsError, ModelSourceError) as e:
            raise EvaluationError(str(e)) from None
    doc = evaluate(args.annotations or args.data, args.out, split=args.split, checkpoint=args.model,
                    data=args.data, predictions=args.predictions, baseline=args.baseline, name=args.name, ns=args.ns,
                    iou_threshold=args.iou_threshold, sampling=sampling, train_split=args.train_split,
                    given_size=args.given_size, allow_missing=args.allow_missing,
                    allow_incomplete=args.allow_incomplete, progress=not args.no_progress, rerank=args.rerank,
                    keep=args.keep)
    if networks is not None:
        from metrics.placement_scores import add_placement_scores

        doc = add_placement_scores(doc, args.out, args.data or args.annotations, args.split,
                                   args.predictions or Path(args.out) / "predictions.jsonl", networks,
                                   args.composites_per_sample, args.device)
    return doc


if __name__ == "__main__":
    try:
        main()
    except Exception as e:  # EvaluationError, imported only now: --help loads no torch
        from metrics.annotations import EvaluationError

        if not isinstance(e, (EvaluationError, OutputError)):  # OutputError: --out unusable, or a full disk
            raise
        print(f"evaluate.py: error: {e}", file=sys.stderr)
        sys.exit(2)
