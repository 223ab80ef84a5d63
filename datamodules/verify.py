"""Check a shard folder against what its converter recorded: every shard of every split (or the
splits named) is read to the end, its samples counted and, where ``{split}.json`` records one, its
checksum compared (docs/design/shards.md).

    python -m datamodules.verify data/opa [--split train val]

One line per split; exit code 0 when every shard is intact, 1 when one is not (or its storage
stopped answering: STALLED), 2 for bad arguments.
"""
from __future__ import annotations

import argparse
import sys
import tarfile
from pathlib import Path

from datamodules.shard_format import ShardFormatError
from genloc.arguments import text
from datamodules.shard_reader import StorageStalled, is_url, iter_annotations, mismatch_message


def verify_split(data_dir, split: str) -> tuple[int, list[str]]:
    """(samples read, problems) of one split; no problem: every shard is intact."""
    mismatches: list[dict] = []
    count = 0
    try:
        for _ in iter_annotations(data_dir, split, mismatches):
            count += 1
    except ShardFormatError as err:
        return count, [str(err)]
    except (tarfile.TarError, OSError, EOFError, ValueError) as err:
        return count, [f"split '{split}' of {data_dir}: a shard is unreadable ({type(err).__name__}: {err}); "
                       f"re-run the conversion of split '{split}'"]
    return count, [mismatch_message(m, split) for m in mismatches]


def splits_of(data_dir) -> list[str]:
    return sorted(p.name[: -len(".json")] for p in Path(data_dir).glob("*.json"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data_dir", type=text, help="shard folder or URL")
    p.add_argument("--split", type=text, nargs="+", help="splits to check (default: every {split}.json of a local folder)")
    args = p.parse_args(argv)
    if not args.split and is_url(args.data_dir):
        p.error("a URL needs --split (its folder cannot always be listed)")
    if not is_url(args.data_dir) and not Path(args.data_dir).is_dir():
        p.error(f"{args.data_dir}: no such folder")
    splits = args.split or splits_of(args.data_dir)
    if not splits:
        p.error(f"{args.data_dir} holds no {{split}}.json: not a shard folder")
    damaged = 0
    for split in splits:
        try:
            count, problems = verify_split(args.data_dir, split)
        except StorageStalled as err:  # not known to be damaged: not checked
            damaged += 1
            print(f"STALLED  {split}: {err}")
            continue
        damaged += bool(problems)
        print(f"DAMAGED  {split}: {problems[0]}" if problems else f"ok  {split}: {count} samples, every shard intact")
        for problem in problems[1:]:
            print(f"DAMAGED  {split}: {problem}")
    return 1 if damaged else 0


if __name__ == "__main__":
    sys.exit(main())
