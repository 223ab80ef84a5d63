"""`make bench`: every benchmark in quick mode (the GPU check in its CPU smoke-test mode), each in
its own subprocess, then ONE table of ratios (measured, target, met) in Markdown. About 5-8
minutes on 2 shared CPU cores.

    .venv/bin/python -m benchmarks.run_all [--skip-compile] [--labels CSV]

Ratios are measured side by side inside each benchmark (variants alternate), so machine load
mostly cancels; absolute times and boxes/s are for the machine it ran on. A benchmark that fails
or times out becomes a row saying so. Exit status 0 even when a target is missed (the table says
which). Each benchmark hands over its numbers as data: a last stdout line ``RESULT {json}`` (the
GPU check: its gpu_check.json).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(script: str, args: list[str], timeout: int, env: dict) -> tuple[str, float]:
    """stdout of ``python -m benchmarks.<script> <args>``; raises RuntimeError with the stderr tail on failure."""
    start = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-m", f"benchmarks.{script}", *args], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"timed out after {timeout} s") from None
    if proc.returncode:
        raise RuntimeError(f"exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}")
    return proc.stdout, time.perf_counter() - start


def result_json(stdout: str) -> dict:
    return json.loads(next(line for line in stdout.splitlines() if line.startswith("RESULT "))[7:])


def row(name: str, measured: str, target: str = "report", met: bool | None = None) -> tuple[str, str, str, str]:
    return name, measured, target, "-" if met is None else ("yes" if met else "no")


def sampling_rows(out: str) -> list:
    rows = []
    for r in result_json(out)["rows"]:
        paper = r["preset"] == "paper"
        vs_copied, vs_naive = round(r["cascade"] / r["copied"], 2), round(r["cascade"] / r["naive"], 1)
        rows.append(row(f"sampling {r['preset']} ({r['images']} img x {r['boxes']} boxes): cascade / copied-cache "
                        "decode, boxes/s", f"{vs_copied:.2f}x", ">= 1.0x" if paper else "report",
                        vs_copied >= 1.0 if paper else None))
        rows.append(row(f"sampling {r['preset']}: cascade / naive decode", f"{vs_naive:.1f}x",
                        ">= 5x" if paper else "report", vs_naive >= 5 if paper else None))
        rows.append(row(f"sampling {r['preset']}: boxes/s cascade (copied cache, naive)",
                        f"{r['cascade']:.0f} ({r['copied']:.0f}, {r['naive']:.1f})"))
    return rows


def train_rows(out: str) -> list:
    r = result_json(out)
    ratio = lambda a, b: r[f"step_{a}"] / r[f"step_{b}"]  # noqa: E731
    rows = [
        row(f"MLE step, Lightning Trainer / plain loop (tiny, batch {r['batch_size']})",
            f"{ratio('lightning', 'plain'):.3f}", "<= 1.05", ratio("lightning", "plain") <= 1.05),
        *(row(f"MLE step, real data loading ({name[10:-1]} workers) / in-memory (main-process CPU ratio)",
              f"{ratio(name, 'lightning'):.3f} ({r[f'cpu_{name}'] / r['cpu_lightning']:.3f})",
              "<= 1.10", ratio(name, "lightning") <= 1.10)
          for name in (key[5:] for key in r if key.startswith("step_real_data_"))),
        row(f"MLE step, repeated / shared prefix ({r['boxes_per_image']:.1f} boxes/image)",
            f"{ratio('repeated_prefix', 'shared_prefix'):.2f}x", "> 1x", ratio("repeated_prefix", "shared_prefix") > 1),
        row("MLE step, bf16 autocast / fp32 (CPU)", f"{ratio('bf16', 'shared_prefix'):.2f}"),
        row("MLE step, accumulate 2 x B / one 2B batch", f"{ratio('accumulate_2', 'full_batch'):.2f}"),
        row("DPO step, reference re-encodes images / shared frozen features",
            f"{ratio('dpo_reencode', 'dpo_shared'):.2f}x", "> 1x", ratio("dpo_reencode", "dpo_shared") > 1),
        row("MLE step ms: plain loop (Lightning)", f"{1e3 * r['step_plain']:.0f} ({1e3 * r['step_lightning']:.0f})"),
    ]
    if "step_compiled" in r:
        rows.append(row("MLE step, compile_decoder / eager (CPU, inductor)",
                        f"{ratio('compiled', 'eager'):.2f} (cold compile {r['compile_seconds']:.0f} s)"))
    return rows


def data_rows(out: str) -> list:
    r = result_json(out)
    ratios = [(loader["workers"], loader["rate"], round(loader["rate"] / r["raw"], 2)) for loader in r["loaders"]]
    checked = r["checksums"]
    return [row(f"data: datamodule ({workers} workers, {rate:.1f} samples/s) / raw decode+resize", f"{ratio:.2f}",
                ">= 0.8", ratio >= 0.8) for workers, rate, ratio in ratios] + [
        row(f"data: shard checksums, hashed ({checked['with']:.1f} samples/s) / unhashed ({checked['without']:.1f}), "
            f"0 workers, CPU time (sha256 = {100 * checked['hash_fraction']:.1f}% of raw decode)",
            f"{checked['with'] / checked['without']:.3f}", ">= 0.9", checked["with"] / checked["without"] >= 0.9)]


def dpo_rows(out: str) -> list:
    r = next(r for r in result_json(out)["rows"] if r["preset"] == "tiny")
    ratio, naive = round(r["dpo"] / r["mle"], 2), r["dpo/naive"] / r["mle"]
    return [row(f"DPO step / MLE step (tiny, batch {r['batch']})", f"{ratio:.2f}", "<= 1.6", ratio <= 1.6),
            row("DPO step naive (repeated prefix, re-encoding) / MLE step", f"{naive:.2f}")]


def eval_rows(out: str) -> list:
    r = result_json(out)
    return [row(f"evaluate.py, full OPA train labels ({r['samples']} samples, {r['boxes']} boxes, 100 preds)",
                f"{r['seconds']:.1f} s", "< 60 s", r["seconds"] < 60)]


def memory_rows(out: str) -> list:
    r = result_json(out)
    shape = f"{r['sample_images']} img x {r['sample_boxes']} boxes"
    return [row(f"peak RSS, toy training ({r['train_steps']} steps)", f"{r['train_mib']:.0f} MiB"),
            row(f"paper sampling ({shape}): RSS above the model, copied cache / cascade",
                f"{r['sample_ratio']:.1f}x", ">= 10x", r["sample_ratio"] >= 10),
            row(f"peak RSS, paper sampling ({shape}): cascade (copied cache)",
                f"{r['sample_mib']:.0f} MiB ({r['sample_copied_mib']:.0f} MiB)")]


def gpu_check_rows(out_dir: str) -> list:
    seconds = json.loads((Path(out_dir) / "gpu_check.json").read_text())["seconds"]
    return [row("gpu_check --quick (CPU smoke test of make bench-gpu, tiny preset)", f"ran, {seconds:.0f} s", "runs",
                True)]


def convert_rows(out: str) -> list:
    r = result_json(out)
    return [row(f"converters, --workers 2 / 1 on real photos: OPA ({r['opa_samples']} samples), PIPE ({r['pipe_rows']} rows)",
                f"{r['opa_ratio']:.2f}x, {r['pipe_ratio']:.2f}x ({r['cpus']} cores)", ">= 1.6x",
                min(r["opa_ratio"], r["pipe_ratio"]) >= 1.6),
            row("converter routes, rows/s with 1 worker: " + ", ".join(r["routes"]),
                ", ".join(f"{v['rows_per_s']:.0f}" for v in r["routes"].values())),
            row(f"PIPE conversion, peak RSS above the imports: {r['memory_rows']} rows ({r['parquet_mib']:.0f} MiB "
                f"parquet) ({r['small_rows']} rows)", f"{r['peak_mib'] - r['imports_mib']:.0f} MiB "
                f"({r['small_increase_mib']:.0f} MiB)")]


def insertion_ranks_rows(out: str) -> list:
    r = result_json(out)
    return [row(f"compare_insertion, 2 ranks / 1 process, wall s ({r['images']} photos, tiny SD, torchrun gloo, "
                f"{r['cpus']} cores)", f"{r['two'] / r['one']:.2f} ({r['two']:.0f} s / {r['one']:.0f} s)")]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-compile", action="store_true", help="leave out the torch.compile row (~2 min on CPU)")
    parser.add_argument("--labels", help="OPA/FOPA label file for the evaluation row (default: eval_speed.py's, shipped "
                        "in benchmarks/data/)")
    args = parser.parse_args(argv)
    gpu_check_out = tempfile.TemporaryDirectory()
    plan = [
        ("sampling", ["--quick"], 300, sampling_rows),
        ("train_step", ["--quick"] + ([] if args.skip_compile else ["--compile"]), 420, train_rows),
        ("data_throughput", ["--num-samples", "400", "--num-workers", "2", "--image-size", "224"], 240, data_rows),
        ("dpo_step", ["--threads", "1", "--iters", "6"], 180, dpo_rows),
        ("eval_speed", (["--labels", args.labels] if args.labels else []) + ["--threads", "1"], 180, eval_rows),
        ("memory", ["--quick"], 300, memory_rows),
        ("convert_speed", ["--quick"], 300, convert_rows),
        ("insertion_ranks", ["--quick"], 600, insertion_ranks_rows),
        ("gpu_check", ["--quick", "--out", gpu_check_out.name], 180, lambda _: gpu_check_rows(gpu_check_out.name)),
    ]
    rows, notes, start = [], [], time.perf_counter()
    inductor_cache = tempfile.TemporaryDirectory()  # cold torch.compile: what a first run pays
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(ROOT),
           "TORCHINDUCTOR_CACHE_DIR": inductor_cache.name}
    for script, script_args, timeout, parse in plan:
        print(f"running python -m benchmarks.{script} {' '.join(script_args)} ...", file=sys.stderr, flush=True)
        try:
            out, seconds = run(script, script_args, timeout, env)
            rows += parse(out)
            notes.append(f"{script}: {seconds:.0f} s")
        except Exception as err:  # one broken benchmark must not hide the others' rows
            rows.append(row(f"{script} FAILED", str(err)[:120], "runs", False))
    total = time.perf_counter() - start
    inductor_cache.cleanup()
    gpu_check_out.cleanup()
    width = max(len(r[0]) for r in rows)
    print(f"| {'benchmark':<{width}} | measured | target | met |")
    print(f"|{'-' * (width + 2)}|---|---|---|")
    for name, measured, target, met in rows:
        print(f"| {name:<{width}} | {measured} | {target} | {met} |")
    print(f"\ntotal {total:.0f} s ({'; '.join(notes)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
