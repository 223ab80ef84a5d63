"""Argument types of the command-line entry points: a value out of range, of the wrong kind or empty is
argparse's one line (``argument --limit: must be a whole number >= 1, got '0'``) and exit code 2, before
any work starts."""
from __future__ import annotations

import argparse
import math
import sys


def whole(minimum: int = 0, maximum: int | None = None):
    """A whole number in ``[minimum, maximum]``."""
    allowed = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum or (maximum is not None and value > maximum):
            raise argparse.ArgumentTypeError(f"must be a whole number {allowed}, got {text!r}")
        return value

    return parse


def number(minimum: float = -math.inf, maximum: float = math.inf, above: bool = False):
    """A finite number in ``[minimum, maximum]`` (``(minimum, maximum]`` with ``above``)."""
    allowed = f"{'(' if above else '['}{minimum:g}, {maximum:g}]"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and (value > minimum if above else value >= minimum) and value <= maximum):
            raise argparse.ArgumentTypeError(f"must be a number in {allowed}, got {text!r}")
        return value

    return parse


def text(value: str) -> str:
    """A non-blank string (a name, a path, a split)."""
    if not value.strip():
        raise argparse.ArgumentTypeError(f"must not be empty, got {value!r}")
    return value


class _FormerModelFlag(argparse.Action):
    """``--checkpoint``, the model flag's former name: still accepted, with a one-line note."""

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"note: {option_string} is now --model (same meaning); {option_string} still works", file=sys.stderr)
        setattr(namespace, self.dest, values)


def add_model_argument(container, help: str, required: bool = False, **options) -> None:
    """``--model`` (a checkpoint, a model folder or a Hub id: `genloc.hub.load_model`), the one model flag of
    every command, with ``--checkpoint`` accepted as its former name. ``container`` is a parser or an
    argument group (e.g. evaluate.py's one-of group of model / predictions / baseline)."""
    if required:
        container = container.add_mutually_exclusive_group(required=True)
    container.add_argument("--model", type=text, help=help, **options)
    container.add_argument("--checkpoint", type=text, dest="model", action=_FormerModelFlag,
                           help=argparse.SUPPRESS)
