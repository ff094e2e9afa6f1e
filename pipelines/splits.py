"""Which input lines go to which split: Kaggle's 7 days by line count, Terabyte's day files."""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from typing import Optional

from tfdlrm.errors import UserError
from tfdlrm.pipelines.manifest import SPLITS
from tfdlrm.pipelines.progress import Progress
from tfdlrm.pipelines.tsv import check_input, count_lines, is_gzip

KAGGLE_DAYS = 7
TERABYTE_DAYS = 24
_TERABYTE_NAME = re.compile(r"day_(\d+)(\.gz)?$")


@dataclass
class Segment:
    start: int  # first line (0-based), inclusive
    stop: float  # last line, exclusive (inf: to the end of the file)
    split: str


@dataclass
class InputFile:
    path: str
    size: int
    segments: list
    day: Optional[int] = None
    lines: Optional[int] = None  # known after counting (day splits)
    sha256: Optional[str] = None


def day_sizes(lines: int, days: int) -> list[int]:
    """Lines per day, as ``np.array_split``: the first ``lines % days`` days get one more."""
    base, extra = divmod(lines, days)
    return [base + (1 if d < extra else 0) for d in range(days)]


def held_out_segments(start: int, lines: int, halve: bool) -> list[Segment]:
    """The held-out day's lines: all ``test``, or first half ``val`` and second half ``test``."""
    if not halve:
        return [Segment(start, start + lines, "test")]
    first = (lines + 1) // 2  # np.array_split(day, 2): the first half gets the odd line
    return [Segment(start, start + first, "val"), Segment(start + first, start + lines, "test")]


def kaggle_segments(lines: int, halve: bool) -> list[Segment]:
    """Kaggle's single file: days 1-6 train, day 7 held out."""
    sizes = day_sizes(lines, KAGGLE_DAYS)
    train = sum(sizes[:-1])
    return [Segment(0, train, "train")] + held_out_segments(train, sizes[-1], halve)


def terabyte_day(path: str) -> int:
    match = _TERABYTE_NAME.search(os.path.basename(path))
    if not match:
        raise UserError(f"{path}: Terabyte files are named day_0 .. day_23 (optionally .gz), "
                        f"which gives each file's day; for other names use --train/--test")
    day = int(match.group(1))
    if not 0 <= day < TERABYTE_DAYS:
        raise UserError(f"{path}: the Terabyte data has days 0 .. 23, not {day}")
    return day


def plan_inputs(spec, progress: Progress) -> list[InputFile]:
    """Check every input and assign its lines to splits (counting lines where the split needs it)."""
    if not spec.inputs:
        files = []
        for split in SPLITS:
            for path in getattr(spec, split):
                files.append(InputFile(path, check_input(path), [Segment(0, math.inf, split)]))
        _no_duplicates(files)
        if getattr(spec, "val_fraction", None):
            _hold_out_val([f for f in files if f.segments[0].split == "train"], spec.val_fraction, progress)
        return files
    paths = list(spec.inputs)
    sizes = [check_input(p) for p in paths]
    if spec.format == "kaggle":
        if len(paths) != 1:
            raise UserError(f"--format kaggle splits one file (Kaggle's train.txt) into 7 days; got {len(paths)} "
                            f"files (use --train/--test for data already split)")
        counted = _count(paths[0], progress)
        if counted.lines < KAGGLE_DAYS * (2 if spec.halve_held_out else 1):
            raise UserError(f"{paths[0]} has {counted.lines} line(s): too few to split into {KAGGLE_DAYS} days")
        return [InputFile(paths[0], sizes[0], kaggle_segments(counted.lines, spec.halve_held_out),
                          lines=counted.lines, sha256=counted.sha256)]
    files = []
    for path, size in zip(paths, sizes):
        files.append(InputFile(path, size, [], day=terabyte_day(path)))
    _no_duplicates(files)
    days = sorted(f.day for f in files)
    if len(set(days)) != len(days):
        raise UserError("two input files name the same Terabyte day: " + ", ".join(f.path for f in files))
    if TERABYTE_DAYS - 1 not in days:
        raise UserError(f"the Terabyte split holds out day {TERABYTE_DAYS - 1}, but no day_{TERABYTE_DAYS - 1} "
                        f"file was given (for other splits use --train/--test)")
    if len(days) < 2:
        raise UserError("the Terabyte split needs training days (day_0 .. day_22) besides day_23")
    files.sort(key=lambda f: f.day)
    for f in files:
        if f.day < TERABYTE_DAYS - 1:
            f.segments = [Segment(0, math.inf, "train")]
        elif spec.halve_held_out:
            counted = _count(f.path, progress)
            if counted.lines < 2:
                raise UserError(f"{f.path} has {counted.lines} line(s): too few to halve")
            f.lines, f.sha256 = counted.lines, counted.sha256
            f.segments = held_out_segments(0, counted.lines, True)
        else:
            f.segments = [Segment(0, math.inf, "test")]
    return files


def _hold_out_val(train: list[InputFile], fraction: float, progress: "Progress") -> None:
    """The last ``fraction`` of the training lines (the latest rows, as a held-out day is)
    become the ``val`` split; the files are counted to know where that starts."""
    for f in train:
        counted = _count(f.path, progress)
        f.lines, f.sha256 = counted.lines, counted.sha256
    total = sum(f.lines for f in train)
    val = round(total * fraction)
    if val < 1 or val >= total:
        raise UserError(f"--val-fraction {fraction} of {total:,} training line(s) leaves no rows for "
                        f"{'validation' if val < 1 else 'training'}")
    for f in reversed(train):
        take = min(val, f.lines)
        val -= take
        f.segments = ([Segment(0, f.lines - take, "train")] if take < f.lines else []) \
            + ([Segment(f.lines - take, f.lines, "val")] if take else [])


def _no_duplicates(files: list[InputFile]) -> None:
    seen = {}
    for f in files:
        key = os.path.realpath(f.path)
        if key in seen:
            raise UserError(f"{f.path} is given twice (as {seen[key]} and again): a row would be in two splits")
        seen[key] = f.path


def _count(path: str, progress: "Progress"):
    progress.start(f"counting lines of {os.path.basename(path)}", total_bytes=os.path.getsize(path))
    counted = count_lines(path, on_bytes=progress.at_bytes)
    progress.done()
    return counted


def _locate(first_line: int, lines: int, segments: list[Segment]):
    """(split, lo, hi) chunk-relative line ranges of each segment overlapping the chunk."""
    out = []
    for seg in segments:
        lo, hi = max(seg.start, first_line), min(seg.stop, first_line + lines)
        if hi > lo:
            out.append((seg.split, int(lo - first_line), int(hi - first_line)))
    return out


def _estimated_rows(f: InputFile, split: str) -> float:
    """Rows of ``split`` in a file, for sizing shuffle buckets (known for counted files)."""
    if f.lines is not None:
        return sum(min(s.stop, f.lines) - s.start for s in f.segments if s.split == split)
    if not any(s.split == split for s in f.segments):
        return 0
    ratio = 5 if is_gzip(f.path) else 1
    return f.size * ratio / 150  # Criteo lines are ~240 bytes; overestimating makes buckets smaller
