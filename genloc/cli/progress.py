"""Progress of the command's long loops, on stderr: a tqdm bar when tqdm is installed (the train extra
brings it), else one plain line per step, so a long run never looks stalled."""
from __future__ import annotations

import sys


class Progress:
    """``update(k)`` after each step of ``total``; ``close()`` at the end."""

    def __init__(self, total: int, desc: str):
        self.total, self.desc, self.done = total, desc, 0
        try:
            from tqdm import tqdm
        except ImportError:
            self.bar = None
        else:
            self.bar = tqdm(total=total, desc=desc, file=sys.stderr, unit="image")

    def update(self, k: int = 1) -> None:
        self.done += k
        if self.bar is not None:
            self.bar.update(k)
        else:
            print(f"{self.desc}: {self.done}/{self.total}", file=sys.stderr, flush=True)

    def write(self, line: str) -> None:
        """A message line on stderr that does not break the bar."""
        if self.bar is not None:
            self.bar.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
