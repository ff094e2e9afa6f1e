"""One prediction from an exported SavedModel, as a TF Serving client would get it.

Loads the newest version under BASE (``saved_models/dlrm``) with plain TensorFlow (of tfdlrm
only the import that hides TensorFlow's start-up log; ``TFDLRM_TF_LOGS=1`` shows it), reads raw Criteo lines (label, 13 counts, 26 hex values, tab-separated)
from FILE and calls the raw ``serving_default`` signature on them.  ``make demo`` ends
with it.

Usage: python -m tools.predict_raw BASE FILE [--lines N]
"""
import argparse
import gzip
import math
import sys
from pathlib import Path


def newest_version(base: Path) -> Path:
    if not base.is_dir():
        sys.exit(f"error: {base} is not a directory (an export base such as saved_models/dlrm)")
    versions = sorted((int(p.name), p) for p in base.iterdir() if p.name.isdigit() and p.is_dir())
    if not versions:
        sys.exit(f"error: {base} holds no numbered SavedModel version")
    return versions[-1][1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base", help="the export base, e.g. saved_models/dlrm")
    parser.add_argument("file", help="raw Criteo TSV (plain or gzip); its last lines are scored")
    parser.add_argument("--lines", type=int, default=3, help="how many of the file's last lines (default: 3)")
    args = parser.parse_args()
    opener = gzip.open if args.file.endswith(".gz") else open
    try:
        with opener(args.file, "rt") as f:
            lines = f.read().splitlines()[-args.lines:]
    except OSError as e:
        sys.exit(f"error: cannot read {args.file}: {e.strerror or e}")
    labels, dense, categorical = [], [], []
    for line in lines:
        fields = line.split("\t")
        labels.append(fields[0])
        dense.append([float(x) if x else math.nan for x in fields[1:14]])
        categorical.append(fields[14:40])

    from tfdlrm._env import import_tensorflow_quietly

    import_tensorflow_quietly()
    import tensorflow as tf  # TensorFlow only: what a serving host has

    path = newest_version(Path(args.base))
    predict = tf.saved_model.load(str(path)).signatures["serving_default"]
    inputs = predict.structured_input_signature[1]
    if set(inputs) != {"dense", "categorical"}:
        sys.exit(f"error: {path}'s serving_default takes {sorted(inputs)}, not raw Criteo features "
                 f"(dense, categorical): was it trained on generated ids?")
    out = predict(dense=tf.constant(dense, tf.float32), categorical=tf.constant(categorical))
    for label, p, line in zip(labels, out["probability"].numpy()[:, 0], lines):
        print(f"{path}: click probability {p:.4f} (label {label}) for {line[:60]}...")
    return 0


if __name__ == "__main__":
    sys.exit(main())
