"""What both converters (Criteo's pipelines/convert.py, your own features' pipelines/tabular.py)
do with bad rows: the ``--on-bad-row error|skip`` policy, and the per-split counts that must
add up (rows read = written + rejected, rejected counted by kind)."""
from __future__ import annotations

from dataclasses import dataclass, field

from tfdlrm.errors import UserError
from tfdlrm.pipelines.tsv import BAD_KINDS

BAD_ROW_EXAMPLES = 20  # kept in the manifest


def bad_row_error(path: str, line: int, reason: str) -> UserError:
    return UserError(f"{path} line {line:,}: {reason} (--on-bad-row skip skips bad rows)")


@dataclass
class SplitCounts:
    read: int = 0
    written: int = 0
    rejected: int = 0
    rejected_by_kind: dict = field(default_factory=lambda: {k: 0 for k in BAD_KINDS})

    def to_dict(self) -> dict:
        return {"rows_read": self.read, "rows_written": self.written, "rows_rejected": self.rejected,
                "rejected_by_kind": dict(self.rejected_by_kind)}


class BadRows:
    """Bad-row policy: stop at the first (error) or count and keep examples (skip)."""

    def __init__(self, policy: str):
        self.policy = policy
        self.examples: list[dict] = []

    def handle(self, path: str, bad: list, counts: dict) -> None:
        """``bad``: ``(line, split, kind, reason)`` in line order; ``counts``: split -> SplitCounts."""
        for line, split, kind, reason in bad:
            if self.policy == "error":
                raise bad_row_error(path, line, reason)
            c = counts[split]
            c.rejected += 1
            c.rejected_by_kind[kind] += 1
            if len(self.examples) < BAD_ROW_EXAMPLES:
                self.examples.append({"file": path, "line": line, "split": split, "kind": kind, "reason": reason})
