"""Rank 0's read progress on stderr: a tqdm bar on a terminal, a plain line every few seconds
otherwise (CI logs). It counts rank 0's own bytes, which is what rank 0 can see without a
collective; the other ranks read their shares alongside.
"""

from __future__ import annotations

import os
import sys
import time
from typing import TextIO

PLAIN_EVERY = 5.0
"""seconds between plain progress lines"""


class Progress:
    """A ``progress(done, total)`` callback for ``distload.load``.

    Args:
        stream: where to write (default stderr).
        tty: draw a tqdm bar (default: when ``stream`` is a terminal); otherwise plain lines.
        every: seconds between plain lines.

    Example:
        >>> import io
        >>> out = io.StringIO()
        >>> p = Progress(out, tty=False, every=0.0)
        >>> p(0, 2 * 2**30); p(2**30, 2 * 2**30); p(2 * 2**30, 2 * 2**30)
        >>> out.getvalue().splitlines()[-1].startswith("distload: rank 0 read 2.00 of 2.00 GiB (100%)")
        True
    """

    def __init__(self, stream: TextIO | None = None, *, tty: bool | None = None, every: float = PLAIN_EVERY) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.every = every
        self._bar = None
        self._start: float | None = None
        self._last_line = 0.0
        self._printed = False

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if self._start is None:
            self._start = self._last_line = now
        if self.tty:
            self._draw(done, total)
        elif done >= total:
            if self._printed:  # a load that printed lines ends with one; a quick one prints none
                self._line(done, total, now)
        elif now - self._last_line >= self.every:
            self._line(done, total, now)

    def _draw(self, done: int, total: int) -> None:
        if self._bar is None:
            from tqdm import tqdm
            self._bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, file=self.stream,
                             desc="distload: rank 0 read", leave=True, **_size(self.stream))
        self._bar.update(done - self._bar.n)
        if done >= total:
            self._bar.close()

    def _line(self, done: int, total: int, now: float) -> None:
        elapsed = max(now - (self._start or now), 1e-9)
        rate = done / elapsed
        eta = f", ETA {(total - done) / rate:.0f} s" if 0 < done < total else ""
        self.stream.write(f"distload: rank 0 read {done / 2**30:.2f} of {total / 2**30:.2f} GiB "
                          f"({100 * done // max(total, 1)}%), {rate / 1e9:.2f} GB/s{eta}\n")
        self.stream.flush()
        self._last_line = now
        self._printed = True


def _size(stream: TextIO) -> dict[str, int]:
    """The terminal's size for tqdm; 80 x 24 where it reports none (a fresh pseudo-terminal says
    0 x 0, and tqdm then hides its bar as if below the last row)."""
    try:
        size = os.get_terminal_size(stream.fileno())
        return {"ncols": size.columns or 80, "nrows": size.lines or 24}
    except (AttributeError, OSError, ValueError):
        return {"ncols": 80, "nrows": 24}
