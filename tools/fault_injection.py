"""Fault injection: SIGKILL ``convert``, ``train`` and ``export`` (real ``python -m tfdlrm``
processes) at random moments, and check what each leaves and what its rerun gives.

    .venv/bin/python -m tools.fault_injection --trials 5 [--seed 0] [--rows 60000] [--keep]

Once: raw Criteo-format rows, and an uninterrupted reference of each command.  Then each
trial kills three runs, each at a moment drawn uniformly over the span of its reference run
between its first write (the partial directory of ``convert``; the lock of the run directory
or export base) and its end:

* ``convert`` into a new directory, or (every other trial) ``--overwrite`` over a complete
  dataset.  After the kill, ``--out`` is absent (new) or a complete dataset (its manifest and
  every shard it lists, at their sizes); with ``--overwrite``, it must still be there.  The
  rerun leaves no ``.NAME.partial-*``/``.old-*`` and writes the reference's shards, byte for byte.
* ``train --deterministic`` with step checkpoints.  After the kill, ``metrics.json`` (the
  mark of a finished run) only with the run finished, and the checkpoint TensorFlow names is
  a complete one.  The rerun of the same command resumes and ends with the reference's
  ``metrics.json`` (evaluation, history) and final weights, bit for bit.
* ``export --version 1 --force`` over an exported version 1, or (every other trial) an export
  of a new version.  After the kill, version 1 is complete and loads, and so is every version
  directory.  The rerun leaves only version directories, each complete; the new one loads.

Prints the counts: trials, faults injected (runs killed before they ended), survived (every
check passed), half-written taken as complete, data lost (an output that was complete
before is gone, or a rerun does not end where the uninterrupted run ended); exit status 1 if
any check failed.  See docs/fault-tolerance.md.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

REPO = Path(__file__).resolve().parent.parent
TRAIN = ["--preset", "tiny", "--batch-size", "512", "--epochs", "2", "--steps-per-epoch", "16", "--optimizer",
         "adagrad", "--lr", "0.05", "--checkpoint-every", "5", "--seed", "3", "--deterministic",
         "--eval-batch-size", "2048"]


def raw_lines(n: int, start: int, rng: random.Random) -> str:
    """``n`` Criteo-format rows (label, 13 counts, 26 hex ids; some missing)."""
    rows = []
    for i in range(start, start + n):
        dense = [str(i)] + [rng.choice(["", "0", "1", "3", "17", "250", "9999"]) for _ in range(12)]
        cats = [rng.choice(["", f"{rng.randrange(1 << 32):08x}", f"{rng.randrange(64):08x}"]) for _ in range(26)]
        rows.append("\t".join([str(rng.randrange(2)), *dense, *cats]))
    return "\n".join(rows) + "\n"


def cli_env() -> dict:
    env = dict(os.environ)
    env.pop("TF_USE_LEGACY_KERAS", None)
    env["PYTHONPATH"] = str(REPO)
    return env


@dataclass
class Outcome:
    killed: bool  # SIGKILLed before it ended on its own
    seconds: float  # from its first write to the kill (or its end)
    problems: list = field(default_factory=list)  # (kind, text): "half-written" | "lost" | "failed"


def run(args: list[str], started: Callable[[], bool], kill_after: Optional[float] = None,
        timeout: float = 900) -> tuple[int, float, str]:
    """``python -m tfdlrm ARGS``; with ``kill_after``, SIGKILL it that many seconds after
    ``started()`` first holds (its first write).  Returns (status, seconds from that first
    write to the kill or the end, stderr's tail)."""
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen([sys.executable, "-m", "tfdlrm", *args], cwd=REPO, env=cli_env(),
                                stdout=subprocess.DEVNULL, stderr=err)
        give_up = time.monotonic() + timeout
        began = None
        while proc.poll() is None and time.monotonic() < give_up:
            now = time.monotonic()
            if began is None and started():
                began = now
            if began is not None and kill_after is not None and now - began >= kill_after:
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.005)
        if proc.poll() is None and kill_after is None:
            proc.kill()
        status = proc.wait()
        err.seek(0)
        tail = err.read().decode(errors="replace")[-1500:]
    return status, (time.monotonic() - began) if began is not None else 0.0, tail


# -- what a directory holds ------------------------------------------------------------------------------------
def dataset_problem(out: Path) -> Optional[str]:
    """Why ``out`` is not a complete converted dataset, or None."""
    try:
        manifest = json.loads((out / "manifest.json").read_text())
    except (OSError, ValueError) as e:
        return f"{out} has no readable manifest ({e})"
    if manifest.get("complete") is not True:
        return f"{out}/manifest.json is not marked complete"
    for split in manifest["splits"].values():
        for entry in split["files"]:
            path = out / entry["path"]
            if not path.is_file() or path.stat().st_size != entry["bytes"]:
                return f"{path} is missing or not {entry['bytes']} bytes"
    return None


def same_dataset(a: Path, b: Path) -> Optional[str]:
    """None if ``a`` and ``b`` hold the same shards and vocabulary, byte for byte."""
    files = lambda d: sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file() and p.name != "manifest.json")
    if files(a) != files(b):
        return f"{a} and {b} hold different files"
    for name in files(a):
        if (a / name).read_bytes() != (b / name).read_bytes():
            return f"{a / name} differs from the uninterrupted conversion"
    ma, mb = (json.loads((d / "manifest.json").read_text()) for d in (a, b))
    if ma["splits"] != mb["splits"] or ma["table_sizes"] != mb["table_sizes"]:
        return f"{a}/manifest.json counts differ from the uninterrupted conversion"
    return None


def tensors(prefix: Path) -> dict:
    import tensorflow as tf

    reader = tf.train.load_checkpoint(str(prefix))
    return {k: reader.get_tensor(k) for k in reader.get_variable_to_shape_map() if k != "_CHECKPOINTABLE_OBJECT_GRAPH"}


def run_problems(out: Path) -> list:
    """What a killed train's directory shows that it should not."""
    from tfdlrm.training.checkpoints import CheckpointStore

    problems = []
    store = CheckpointStore(out / "checkpoints")
    good, _ = store.scan()
    index = out / "checkpoints" / "checkpoint"
    if index.is_file():
        import tensorflow as tf

        named = tf.train.latest_checkpoint(str(out / "checkpoints"))
        if named is not None and Path(named).name not in {r["name"] for r in good}:
            problems.append(("half-written", f"the checkpoint index names {named}, which is incomplete"))
    if (out / "metrics.json").exists():
        try:
            metrics = json.loads((out / "metrics.json").read_text())
            metrics["evaluation"]["auc"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            problems.append(("half-written", f"{out}/metrics.json is unreadable ({e})"))
        else:
            if not good or good[-1]["name"] != "epoch-002":
                problems.append(("half-written", f"{out} has metrics.json but not its last epoch's checkpoint"))
    return problems


def same_run(a: Path, b: Path) -> Optional[str]:
    import numpy as np

    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (a, b))
    for key in ("evaluation", "history", "examples"):
        if ma[key] != mb[key]:
            return f"metrics.json {key} differs from the uninterrupted run's"
    ta, tb = tensors(a / "checkpoints" / "epoch-002"), tensors(b / "checkpoints" / "epoch-002")
    if ta.keys() != tb.keys() or any(not np.array_equal(ta[k], tb[k]) for k in ta):
        return "the final weights differ from the uninterrupted run's"
    return None


def loads(version: Path) -> Optional[str]:
    """None if ``version`` is a complete export that TensorFlow loads with its serving signature."""
    from tfdlrm.serving.export import is_complete

    if not is_complete(version):
        return f"{version} is not a complete export"
    import tensorflow as tf

    try:
        loaded = tf.saved_model.load(str(version))
    except Exception as e:  # noqa: BLE001 (any failure to load is the finding)
        return f"{version} does not load: {str(e).splitlines()[0][:200]}"
    return None if "serving_default" in loaded.signatures else f"{version} has no serving_default"


def versions_of(base: Path) -> list[Path]:
    return sorted((p for p in base.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))


# -- the three kinds of trial ---------------------------------------------------------------------------------------
class Injector:
    def __init__(self, work: Path, rows: int, rng: random.Random, log: Callable[[str], None]):
        self.work, self.rng, self.log = work, rng, log
        raw = work / "raw"
        raw.mkdir(parents=True)
        (raw / "train.txt").write_text(raw_lines(rows, 0, rng))
        (raw / "test.txt").write_text(raw_lines(max(rows // 8, 1000), rows, rng))
        self.convert_args = ["convert", "--train", str(raw / "train.txt"), "--test", str(raw / "test.txt"),
                             "--rows-per-shard", str(max(rows // 6, 1000))]
        self.spans: dict = {}
        # the uninterrupted references
        self.data = work / "reference" / "data"
        self.spans["convert"] = self._reference(self.convert_args + ["--out", str(self.data)],
                                                self._partial_seen(self.data))
        self.train_args = ["train", "--data", str(self.data), *TRAIN]
        self.run = work / "reference" / "run"
        self.spans["train"] = self._reference(self.train_args + ["--out", str(self.run)],
                                              lambda: (self.run / ".lock").exists())
        self.base = work / "reference" / "saved"
        self.spans["export"] = self._reference(["export", str(self.run), "--out", str(self.base)],
                                               lambda: (self.base / ".lock").exists())
        self.log("reference runs, from first write to end: " + ", ".join(f"{k} {v:.1f} s" for k, v in
                                                                         self.spans.items()))

    def _reference(self, args: list[str], started: Callable[[], bool]) -> float:
        status, seconds, err = run(args, started)
        if status != 0:
            raise SystemExit(f"the uninterrupted run failed ({status}): {' '.join(args)}\n{err}")
        return seconds

    @staticmethod
    def _partial_seen(out: Path) -> Callable[[], bool]:
        return lambda: out.parent.is_dir() and any(p.name.startswith(f".{out.name}.partial-")
                                                   for p in out.parent.iterdir())

    def _moment(self, kind: str) -> float:
        return self.rng.uniform(0.0, self.spans[kind] * 1.05)

    def convert(self, trial: Path, overwrite: bool) -> Outcome:
        out = trial / "data"
        trial.mkdir(parents=True, exist_ok=True)
        args = self.convert_args + ["--out", str(out)] + (["--overwrite"] if overwrite else [])
        if overwrite:
            shutil.copytree(self.data, out)
        status, seconds, err = run(args, self._partial_seen(out), self._moment("convert"))
        outcome = Outcome(status == -signal.SIGKILL, seconds)
        if status not in (0, -signal.SIGKILL):
            outcome.problems.append(("failed", f"convert exited {status}: {err}"))
        if out.exists():
            if (problem := dataset_problem(out)) is not None:
                outcome.problems.append(("half-written", problem))
        elif overwrite:
            outcome.problems.append(("lost", f"{out} (a complete dataset before --overwrite) is gone"))
        status, _, err = run(args + (["--overwrite"] if out.exists() and not overwrite else []), lambda: True)
        if status != 0:
            outcome.problems.append(("failed", f"the rerun of convert exited {status}: {err}"))
            return outcome
        leftovers = [p.name for p in trial.iterdir() if p.name.startswith(".data.")]
        if leftovers:
            outcome.problems.append(("failed", f"the rerun left {leftovers}"))
        if (problem := dataset_problem(out) or same_dataset(out, self.data)) is not None:
            outcome.problems.append(("lost", problem))
        return outcome

    def train(self, trial: Path) -> Outcome:
        out = trial / "run"
        args = self.train_args + ["--out", str(out)]
        status, seconds, err = run(args, lambda: (out / ".lock").exists(), self._moment("train"))
        outcome = Outcome(status == -signal.SIGKILL, seconds)
        if status not in (0, -signal.SIGKILL):
            outcome.problems.append(("failed", f"train exited {status}: {err}"))
        if out.exists():
            outcome.problems += run_problems(out)
        status, _, err = run(args, lambda: True)  # the same command again: resumes
        if status != 0:
            outcome.problems.append(("failed", f"the rerun of train exited {status}: {err}"))
            return outcome
        if (out / ".lock").exists():
            outcome.problems.append(("failed", f"{out}/.lock left after the rerun"))
        if (problem := same_run(out, self.run)) is not None:
            outcome.problems.append(("lost", problem))
        return outcome

    def export(self, trial: Path, force: bool) -> Outcome:
        base = trial / "saved"
        shutil.copytree(self.base, base)  # version 1, exported before
        args = ["export", str(self.run), "--out", str(base)] + (["--version", "1", "--force"] if force else [])
        status, seconds, err = run(args, lambda: (base / ".lock").exists(), self._moment("export"))
        outcome = Outcome(status == -signal.SIGKILL, seconds)
        if status not in (0, -signal.SIGKILL):
            outcome.problems.append(("failed", f"export exited {status}: {err}"))
        if not (base / "1").is_dir():
            outcome.problems.append(("lost", f"{base} lost version 1"))
        for version in versions_of(base):
            if (problem := loads(version)) is not None:
                outcome.problems.append(("half-written", problem))
        status, _, err = run(args, lambda: True)
        if status != 0:
            outcome.problems.append(("failed", f"the rerun of export exited {status}: {err}"))
            return outcome
        names = sorted(p.name for p in base.iterdir())
        if any(not name.isdigit() for name in names):
            outcome.problems.append(("failed", f"the rerun left {names} in {base}"))
        newest = versions_of(base)[-1]
        if (problem := loads(newest)) is not None:
            outcome.problems.append(("lost", problem))
        return outcome


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.fault_injection", description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=5, help="trials, each killing a convert, a train, an export")
    parser.add_argument("--seed", type=int, default=0, help="seeds the data and the moments of the kills")
    parser.add_argument("--rows", type=int, default=40_000, help="raw training rows (held-out: an eighth)")
    parser.add_argument("--work", help="working directory (default: a new temporary one, removed after)")
    parser.add_argument("--keep", action="store_true", help="keep the working directory")
    args = parser.parse_args(argv)
    if args.trials < 1 or args.rows < 1000:
        parser.error("--trials must be >= 1 and --rows >= 1000")
    from tfdlrm._env import import_tensorflow_quietly

    import_tensorflow_quietly()  # for checking checkpoints and exports, without its start-up chatter
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="tfdlrm-faults-"))
    log = lambda text: print(text, flush=True)  # noqa: E731
    t0 = time.monotonic()
    try:
        injector = Injector(work, args.rows, random.Random(args.seed), log)
        counts = {"runs": 0, "faults injected": 0, "survived": 0, "half-written taken as complete": 0,
                  "data lost": 0, "other failures": 0}
        for i in range(1, args.trials + 1):
            trial = work / f"trial-{i:03d}"
            for name, check in (("convert" + (" --overwrite" if i % 2 == 0 else ""),
                                 lambda: injector.convert(trial, overwrite=i % 2 == 0)),
                                ("train", lambda: injector.train(trial)),
                                ("export" + (" --force" if i % 2 == 1 else " (new version)"),
                                 lambda: injector.export(trial, force=i % 2 == 1))):
                outcome = check()
                counts["runs"] += 1
                counts["faults injected"] += outcome.killed
                kinds = {kind for kind, _ in outcome.problems}
                counts["survived"] += not outcome.problems
                counts["half-written taken as complete"] += "half-written" in kinds
                counts["data lost"] += "lost" in kinds
                counts["other failures"] += "failed" in kinds
                when = f"killed {outcome.seconds:.2f} s in" if outcome.killed else "ended before its kill"
                log(f"trial {i} {name}: {when}; " + ("ok" if not outcome.problems else
                                                      "; ".join(f"{k}: {t}" for k, t in outcome.problems)))
        log(f"\ntrials: {args.trials} ({counts['runs']} runs: convert, train and export each trial)")
        for key in ("faults injected", "survived", "half-written taken as complete", "data lost", "other failures"):
            log(f"{key}: {counts[key]}")
        log(f"({time.monotonic() - t0:.0f} s)")
        failed = counts["runs"] - counts["survived"]
        return 1 if failed else 0
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
