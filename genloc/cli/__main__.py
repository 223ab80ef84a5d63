"""`python -m genloc.cli`: the `genloc` command."""
import sys

from . import main

if __name__ == "__main__":
    sys.exit(main())
