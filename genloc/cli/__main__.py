"""`python -m genloc.cli`: the `genloc` command."""
import sys

from . import main

sys.exit(main())
