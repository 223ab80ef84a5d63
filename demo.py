"""The demo page from the repository: `genloc demo` (genloc/demo.py) looking up its default model
(runs/toy_model, which `make train` writes) and its example photos (tests/fixtures) in the repository root.

    python demo.py
    python demo.py --model runs/toy_model --inpainter /models/sd-inpainting --backend sd --port 7860
"""
import sys
from pathlib import Path

from genloc import demo


def main(argv=None) -> int:
    demo.ROOT = Path(__file__).resolve().parent
    return demo.main(argv)


if __name__ == "__main__":
    sys.exit(main())
