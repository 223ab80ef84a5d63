"""What the converter CLIs share: --workers / --no-progress, argument checks and one-line errors."""
from __future__ import annotations

import argparse
import sys


def add_common_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--workers", type=int, default=1,
                    help="processes converting in parallel, one output shard each at a time; the output is "
                         "the same for any number (default 1)")
    ap.add_argument("--no-progress", action="store_true")


def run(ap: argparse.ArgumentParser, args: argparse.Namespace, convert):
    """Check the shared numbers, run ``convert()`` and print its report; bad input ends the program
    with one line and exit code 2 (the previous output is left untouched)."""
    for name in ("workers", "num_shards", "max_per_shard", "batch_rows"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    val_fraction = getattr(args, "val_fraction", None)
    if val_fraction is not None and not 0.0 <= val_fraction < 1.0:
        ap.error(f"--val-fraction must be in [0, 1), got {val_fraction}")
    from datamodules.convert import ConversionError
    from datamodules.opa_labels import LabelFileError
    from datamodules.shard_format import ShardFormatError

    try:
        report = convert()
    except (ConversionError, LabelFileError, ShardFormatError, FileNotFoundError) as e:
        print(f"{ap.prog}: error: {e}; the previous output in {args.out} is unchanged", file=sys.stderr)
        sys.exit(2)
    print(report.summary())
    return report
