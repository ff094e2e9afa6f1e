"""Own-feature tables for tests: a spec, rows of made-up columns, CSV/TSV writing."""
import csv
import gzip

import numpy as np

SPEC = """\
label: bought
dense: [age, {name: price, transform: none}]
categorical:
  - {name: region}
  - {name: shop, hash_buckets: 50}
  - {name: labels, separator: ";", max_ids: 2}
"""
HEADER = ["price", "bought", "junk", "age", "region", "labels", "shop"]


def make_rows(n, seed):
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        labels = ";".join(str(x) for x in rng.choice(["red", "green", "blue", "x y"], rng.integers(0, 4)))
        rows.append({"price": f"{rng.normal(5, 3):.3f}", "bought": str(int(rng.random() < 0.3)), "junk": "a,b",
                     "age": "" if rng.random() < 0.1 else str(rng.integers(1, 90)),
                     "region": rng.choice(["north", "south", "east", "", "west"], p=[.4, .3, .2, .05, .05]),
                     "labels": labels, "shop": f"s{rng.integers(0, 30)}"})
    return rows


def write_table(path, rows, delimiter=",", extra_lines=()):
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wt", newline="") as f:
        w = csv.writer(f, delimiter=delimiter, quoting=csv.QUOTE_MINIMAL if delimiter == "," else csv.QUOTE_NONE,
                       escapechar=None)
        w.writerow(HEADER)
        for row in rows:
            w.writerow([row[h] for h in HEADER])
        for line in extra_lines:
            f.write(line)
    return path
