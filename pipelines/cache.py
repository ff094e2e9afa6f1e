"""Raw TSV given to ``train --data``: converted once into a cache keyed by its contents and options.

One process converts an entry at a time (a lock beside it, ``.NAME-KEY.lock``); another
asking for the same entry meanwhile waits and then reuses it.  The conversion deletes the
partial directories of killed conversions into the entry first (``convert``)."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable, Optional

from tfdlrm.errors import UserError
from tfdlrm.locks import acquire
from tfdlrm.pipelines.convert import ConvertSpec, convert
from tfdlrm.pipelines.manifest import MANIFEST, SCHEMA_VERSION
from tfdlrm.pipelines.tsv import check_input

CACHE_ENV = "TFDLRM_CACHE"


def default_cache_dir() -> Path:
    """``$TFDLRM_CACHE``, else ``$XDG_CACHE_HOME/tfdlrm``, else ``~/.cache/tfdlrm``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "tfdlrm"


def cached_conversion(train: str, eval_data: Optional[str] = None, cache_dir: Optional[str] = None,
                      hash_buckets: Optional[int] = None, min_frequency: Optional[int] = None,
                      log: Callable[[str], None] = print, val_data: Optional[str] = None,
                      val_fraction: Optional[float] = None) -> Path:
    """The converted dataset of raw file ``train`` (and held-out ``eval_data``), converting on first use.

    Without ``eval_data``, ``train`` is split by Kaggle's days.  ``val_data`` (a file) or
    ``val_fraction`` (the last part of ``train``) makes a validation split.  The cache entry is
    ``CACHE/criteo/<name>-<key>``, where the key hashes the files' paths, sizes and
    modification times, the mapping and the converter's schema version: a changed
    file or setting converts again, anything else reuses the entry.
    """
    if (val_data or val_fraction) and not eval_data:
        raise UserError("--val-data and --val-fraction need --eval-data (raw data already split into train and "
                        "test); for Kaggle's day split convert it with --halve-held-out")
    paths = [train] + ([eval_data] if eval_data else []) + ([val_data] if val_data else [])
    files = []
    for path in paths:
        check_input(path)
        stat = os.stat(path)
        files.append([os.path.abspath(path), stat.st_size, stat.st_mtime_ns])
    spec = ConvertSpec(out="", hash_buckets=hash_buckets, min_frequency=min_frequency,
                       inputs=[train] if not eval_data else (), train=[train] if eval_data else (),
                       test=[eval_data] if eval_data else (), val=[val_data] if val_data else (),
                       val_fraction=val_fraction)
    threshold = None if hash_buckets is not None else (min_frequency or 1)
    key_data = {"schema": SCHEMA_VERSION, "files": files, "mapping": [spec.mapping_kind, hash_buckets, threshold],
                "split": bool(eval_data)}
    if val_data or val_fraction:  # (absent otherwise, so that earlier cache entries keep their keys)
        key_data["val"] = [bool(val_data), val_fraction]
    key = hashlib.sha256(json.dumps(key_data, sort_keys=True).encode()).hexdigest()[:16]
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    out = root / "criteo" / f"{Path(train).name}-{key}"
    if (out / MANIFEST).is_file():
        log(f"using the converted cache of {train}: {out}")
        return out
    spec.out = str(out)
    log(f"converting {train}" + (f" and {eval_data}" if eval_data else " (split into 7 days)")
        + (f", validation {val_data}" if val_data else "")
        + (f", the last {val_fraction:g} of the training rows held out for validation" if val_fraction else "")
        + f" into the cache {out} (once; later runs reuse it)")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the cache directory {out.parent}: {e.strerror or e} "
                        f"(choose another with --cache-dir or ${CACHE_ENV})") from None
    waiting = lambda who: log(f"waiting for {who}, which converts the same data into {out}")  # noqa: E731
    with acquire(out.parent / f".{out.name}.lock", what=f"the cache entry {out}", wait=True, on_wait=waiting):
        if (out / MANIFEST).is_file():  # converted by the process waited for
            log(f"using the converted cache of {train}: {out}")
            return out
        try:
            result = convert(spec)
        except UserError:
            if (out / MANIFEST).is_file():  # another process converted it meanwhile
                return out
            raise
    log(result.summary())
    return out
