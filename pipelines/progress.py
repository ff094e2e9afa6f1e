"""The converter's progress line (bytes read, rows/s) on a terminal."""
from __future__ import annotations

import sys
import time
from typing import Optional


class Progress:
    """One stderr line, rewritten at most twice a second: rows, rows/s, percent of bytes."""

    def __init__(self, enabled: Optional[bool] = None, stream=None):
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.label = ""
        self.rows = 0
        self.total_bytes = 0
        self.base_bytes = 0
        self.read_bytes = 0
        self.t0 = time.perf_counter()
        self.last = 0.0

    def start(self, label: str, total_bytes: int) -> None:
        self.label, self.total_bytes = label, total_bytes
        self.rows, self.base_bytes, self.read_bytes = 0, 0, 0
        self.t0 = time.perf_counter()
        self.last = 0.0

    def next_file(self) -> None:
        self.base_bytes += self.read_bytes
        self.read_bytes = 0

    def at_bytes(self, n: int) -> None:
        self.read_bytes = n
        self._show()

    def add_rows(self, n: int) -> None:
        self.rows += n
        self._show()

    def _show(self, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if not force and now - self.last < 0.5:
            return
        self.last = now
        seconds = max(now - self.t0, 1e-9)
        pct = 100.0 * (self.base_bytes + self.read_bytes) / self.total_bytes if self.total_bytes else 100.0
        rows = f"{self.rows:,} rows, {self.rows / seconds:,.0f} rows/s, " if self.rows else ""
        self.stream.write(f"\r{self.label}: {rows}{min(pct, 100.0):5.1f}%  {seconds:6.1f} s ")
        self.stream.flush()

    def done(self) -> None:
        if self.enabled:
            self._show(force=True)
            self.stream.write("\n")
            self.stream.flush()
