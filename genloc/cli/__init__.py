"""The `genloc` command (docs/usage.md#the-genloc-command): `genloc.cli.parsers` builds its parsers
without torch; each subcommand's code is imported only when it runs."""
from __future__ import annotations

from .parsers import build_parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    parser = args.command_parser
    if args.command == "demo":
        from ..demo import run

        return run(parser, args)
    if args.command == "score":
        from .scoring import run

        return run(parser, args)
    from .placing import run

    return run(parser, args)
