"""Time from pressing Place to the first boxes on screen in the demo page, in a real headless Chromium.

    python -m benchmarks.demo_latency [--model runs/toy_model] [--repeats 5] [--category person]

Starts `demo.py` on 127.0.0.1 (a free port), uploads a real photo from tests/fixtures/, then presses
Place `--repeats` times (a new seed each time) and measures, in the browser, from the click to the
moment the new boxes image has loaded. Prints each press (browser latency and the server's own
time for the same call), the first and median latency, and median / target. Target: < 3 s for the
toy model on 2 CPU cores. Needs Chromium and its driver (`make browser` installs them) and the demo and
test extras (`pip install '.[demo,test]'`). The page is driven with benchmarks/browser.py.
"""
import argparse
import re
import statistics
from pathlib import Path

from PIL import Image

from benchmarks.browser import ROOT, chromium, demo_server, press, set_text, upload

PHOTO = ROOT / "tests" / "fixtures" / "libcom" / "controllable_composition" / "background" / "000000460450.png"
TARGET_S = 3.0


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="runs/toy_model", help="model folder, Hub id or checkpoint")
    p.add_argument("--photo", default=str(PHOTO), help="photo to upload")
    p.add_argument("--category", default="person")
    p.add_argument("--repeats", type=int, default=5, help="Place presses (seeds 0..repeats-1)")
    args = p.parse_args(argv)
    if not Path(args.model).exists():
        p.error(f"--model {args.model}: not found; `make train` exports the toy model to runs/toy_model")
    with demo_server(["--model", args.model]) as url:
        driver = chromium()
        try:
            driver.get(url)
            upload(driver, "photo", Path(args.photo))
            set_text(driver, "categories", args.category)
            rows = []
            for seed in range(args.repeats):
                set_text(driver, "seed", str(seed))
                seconds, text = press(driver, "place", "boxes", timeout=120)
                if "Error" in text:
                    raise SystemExit(f"demo_latency: the page answered {text!r}")
                server = float(re.search(r"in ([\d.]+) s", text).group(1))
                rows.append((seed, seconds, server))
        finally:
            driver.quit()
    print(f"model {args.model}, photo {Path(args.photo).name} {Image.open(args.photo).size}, category {args.category}")
    print("press  place->boxes on screen (s)  server place_boxes (s)")
    for seed, seconds, server in rows:
        print(f"{seed:5d}  {seconds:27.3f}  {server:23.3f}")
    latencies = [r[1] for r in rows]
    median = statistics.median(latencies)
    print(f"first press {latencies[0]:.3f} s, median {median:.3f} s, target < {TARGET_S:.0f} s: "
          f"median / target = {median / TARGET_S:.2f} ({'met' if median < TARGET_S else 'missed'})")


if __name__ == "__main__":
    main()
