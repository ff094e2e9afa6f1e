"""Where training data comes from: one interface over generators and converted datasets.

``open_data(spec, config)`` gives a :class:`DataSource` bound to the model config
the data implies (table row counts, dense width).  Sources differ in where rows
come from, never in what a batch looks like (see :mod:`pipelines`).

``spec`` is ``random``, ``synthetic``, a converted Criteo dataset directory
(``python -m tfdlrm convert``), or a raw Criteo TSV file (plain or gzip): a raw
file is converted once into a cache directory (``tfdlrm.pipelines.cache.cached_conversion``)
and read from there afterwards.
"""
from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path
from typing import Optional

import tensorflow as tf

from tfdlrm.errors import UserError
from tfdlrm.pipelines.batching import batches_per_epoch, rebatch
from tfdlrm.pipelines.generators import RandomData, SyntheticData
from tfdlrm.presets import CRITEO_DENSE, GENERATED, ModelConfig

# Synthetic rows are generated in blocks of this many, so that the data set is the
# same whatever the batch size (batches are cut from the stream of blocks).
SYNTHETIC_BLOCK = 1024


class DataSource:
    """A training split, a held-out (test) split, and where there is one a validation split.

    Attributes: ``name``, ``config`` (the model config with the data's table sizes),
    ``train_examples``, ``eval_examples`` and ``val_examples`` (rows per split; 0: no val).
    Model selection (the best epoch, early stopping) uses val, never the test split.
    """

    name: str
    config: ModelConfig
    train_examples: int
    eval_examples: int
    val_examples: int = 0

    def train_dataset(self, batch_size: int, seed: Optional[int] = None, start_batch: int = 0,
                      input_context: Optional[tf.distribute.InputContext] = None,
                      last_batch: str = "keep") -> tf.data.Dataset:
        """One epoch of training batches (shuffled by ``seed`` where the source can; the
        short last batch kept, dropped or folded: pipelines/batching.py)."""
        raise NotImplementedError

    def eval_dataset(self, batch_size: int) -> tf.data.Dataset:
        """All of the held-out split, in a fixed order."""
        raise NotImplementedError

    def val_dataset(self, batch_size: int) -> Optional[tf.data.Dataset]:
        """All of the validation split in a fixed order, or None where the data has none."""
        return None

    def train_batches(self, batch_size: int, last_batch: str = "keep") -> int:
        """Batches in one training epoch."""
        return batches_per_epoch(self.train_examples, batch_size, last_batch)

    def teacher_auc(self, batch_size: int = 4096) -> Optional[float]:
        """The best AUC a model can reach on the eval split, where known (synthetic data)."""
        return None

    def describe(self) -> dict:
        """What to record in a run's ``run.json`` to say which data it saw."""
        raise NotImplementedError

    # Lines to log before training: what the checks of the data could not check.
    notes: tuple = ()

    def damage(self, error: BaseException) -> Optional[UserError]:
        """The UserError for a damaged file met while reading (a ``tf.errors.DataLossError``),
        naming it where the source can tell; None: not a data file of this source."""
        return None


class GeneratedSource(DataSource):
    """``random`` or ``synthetic`` rows, generated on the fly from ``data_seed``."""

    def __init__(self, kind: str, config: ModelConfig, train_examples: int, eval_examples: int,
                 data_seed: int = 0, dense_distribution: str = "uniform", variable_bags: bool = False):
        if kind not in GENERATED:
            raise UserError(f"generated data must be one of {', '.join(GENERATED)}, got {kind!r}")
        for name, value in (("train examples", train_examples), ("eval examples", eval_examples)):
            if value <= 0:
                raise UserError(f"{name} must be positive, got {value} (an empty split cannot train or evaluate)")
        self.name = kind
        self.config = config
        self.data_seed = int(data_seed)
        if kind == "random":
            self.generator = RandomData(config.table_rows, config.num_dense, config.ids_per_lookup,
                                        variable_bags, dense_distribution, self.data_seed)
            self.train_examples, self.eval_examples = int(train_examples), int(eval_examples)
        else:
            if config.ids_per_lookup != 1:
                raise UserError(
                    f"synthetic data has one id per feature, but preset {config.preset!r} looks up "
                    f"{config.ids_per_lookup} ids per feature; use --data random for multi-hot bags"
                )
            self.generator = SyntheticData(config.table_rows, config.num_dense, self.data_seed)
            self.train_examples = _whole_blocks(train_examples, "train examples")
            self.eval_examples = _whole_blocks(eval_examples, "eval examples")
        self.val_examples = self.eval_examples  # a validation split as large as the held-out one
        self._teacher_auc: Optional[float] = None

    def _blocks(self, split: str, examples: int, batch_size: int, order_seed: Optional[int],
                start_batch: int, with_teacher: bool = False, last_batch: str = "keep") -> tf.data.Dataset:
        if batch_size <= 0:
            raise UserError(f"batch size must be positive, got {batch_size}")
        if self.name == "random":
            # The paper's random data: one generated block per batch (all full: no short last batch).
            batches = math.ceil(examples / batch_size)
            return self.generator.dataset(batch_size, batches, split, start_batch, order_seed)
        blocks = examples // SYNTHETIC_BLOCK
        data = self.generator.dataset(SYNTHETIC_BLOCK, blocks, split, 0, order_seed, with_teacher)
        data = rebatch(data, examples, batch_size, last_batch)  # with its cardinality, for Keras's progress bar
        return data.skip(start_batch) if start_batch else data

    def train_batches(self, batch_size: int, last_batch: str = "keep") -> int:
        if self.name == "random":
            return math.ceil(self.train_examples / batch_size)
        return super().train_batches(batch_size, last_batch)

    def train_dataset(self, batch_size, seed=None, start_batch=0, input_context=None, last_batch="keep"):
        data = self._blocks("train", self.train_examples, batch_size, seed, start_batch, last_batch=last_batch)
        if input_context is not None and input_context.num_input_pipelines > 1:
            data = data.shard(input_context.num_input_pipelines, input_context.input_pipeline_id)
        return data

    def eval_dataset(self, batch_size):
        return self._blocks("eval", self.eval_examples, batch_size, None, 0)

    def val_dataset(self, batch_size):
        return self._blocks("val", self.val_examples, batch_size, None, 0)

    def teacher_auc(self, batch_size: int = 4096) -> Optional[float]:
        if self.name != "synthetic":
            return None
        if self._teacher_auc is None:
            import numpy as np

            from tfdlrm.metrics import exact_auc

            labels, probabilities = [], []
            for _, y, p in self._blocks("eval", self.eval_examples, batch_size, None, 0, with_teacher=True):
                labels.append(y.numpy())
                probabilities.append(p.numpy())
            self._teacher_auc = exact_auc(np.concatenate(labels), np.concatenate(probabilities))
        return self._teacher_auc

    def describe(self) -> dict:
        return {
            "kind": self.name,
            "data_seed": self.data_seed,
            "train_examples": self.train_examples,
            "eval_examples": self.eval_examples,
            "table_rows": list(self.config.table_rows),
            "num_dense": self.config.num_dense,
        }


def _whole_blocks(examples: int, what: str) -> int:
    blocks = examples // SYNTHETIC_BLOCK
    if blocks == 0:
        raise UserError(f"{what} must be at least {SYNTHETIC_BLOCK} for synthetic data, got {examples}")
    return blocks * SYNTHETIC_BLOCK


class CriteoSource(DataSource):
    """A converted Criteo dataset (``pipelines/reader.py``); table sizes from its manifest.

    The training split trains; the held-out ``eval_split`` (``test``) evaluates; a
    ``val`` split (``convert --halve-held-out``, ``--val``, ``--val-fraction``) selects.
    Opening checks the manifest and every shard's size and record layout, and the held-out
    shards in full (sha256; small, and otherwise first read after a whole epoch of training);
    ``verify_data`` checks every shard and vocabulary file in full (``train --verify-data``).
    """

    def __init__(self, path: str | os.PathLike, config: ModelConfig, eval_split: str = "test",
                 raw_files: Optional[list] = None, verify_data: bool = False):
        from tfdlrm.pipelines.reader import CriteoDataset

        self.dataset = CriteoDataset(path)
        held_out = [s for s in self.dataset.splits if s != "train"]
        self.notes = tuple(self.dataset.verify(None if verify_data else held_out, vocabulary=verify_data))
        self.name = f"criteo {self.dataset.path}"
        if eval_split == "test" and "test" not in self.dataset.splits:
            if "val" not in self.dataset.splits:
                raise UserError(f"{self.dataset.path} has no held-out split to evaluate on (convert with "
                                f"--test FILE or --val-fraction F)")
            eval_split = "val"  # a dataset converted without --test: val is the held-out split
        self.eval_split = eval_split
        self.raw_files = raw_files
        features = self.dataset.manifest.get("features")
        if features is None and config.num_dense != CRITEO_DENSE:
            raise UserError(f"Criteo rows have {CRITEO_DENSE} dense features but preset {config.preset!r} "
                            f"expects {config.num_dense}")
        if config.ids_per_lookup != 1:
            raise UserError(f"converted rows have one id (or a bag of ids) per feature, but preset "
                            f"{config.preset!r} looks up {config.ids_per_lookup} ids per feature")
        if features is not None:  # your own features: the dense width and the pooling come from the feature spec
            self.name = f"features {self.dataset.path}"
            config = config.replace(bottom_mlp=(self.dataset.num_dense, *config.bottom_mlp[1:]),
                                    pooling=features["spec"]["pooling"])
        self.config = config.with_rows(self.dataset.table_sizes)
        self.train_examples = self.dataset.rows("train")
        self.eval_examples = self.dataset.rows(eval_split)
        self.val_examples = self.dataset.rows("val") if "val" in self.dataset.splits and eval_split != "val" else 0

    def train_dataset(self, batch_size, seed=None, start_batch=0, input_context=None, deterministic=True,
                      last_batch="keep"):
        return self.dataset.dataset("train", batch_size, seed=seed, start_batch=start_batch,
                                    input_context=input_context, deterministic=deterministic, last_batch=last_batch)

    def eval_dataset(self, batch_size):
        return self.dataset.dataset(self.eval_split, batch_size)

    def val_dataset(self, batch_size):
        return self.dataset.dataset("val", batch_size) if self.val_examples else None

    def split_dataset(self, split: str, batch_size: int, **kwargs):
        """Any split of the dataset (``train``, ``val``, ``test``), in file order unless ``seed`` is given."""
        return self.dataset.dataset(split, batch_size, **kwargs)

    def damage(self, error: BaseException) -> Optional[UserError]:
        return self.dataset.damage(error)

    def describe(self) -> dict:
        manifest = self.dataset.manifest
        out = {
            "kind": "criteo",
            "path": str(self.dataset.path),
            "manifest_sha256": self.dataset.manifest_sha256,
            "created_at": manifest.get("created_at"),
            "eval_split": self.eval_split,
            "train_examples": self.train_examples,
            "eval_examples": self.eval_examples,
            "val_examples": self.val_examples,
            "table_rows": list(self.config.table_rows),
            "features": self.dataset.manifest.get("features") is not None,
            "mapping": {k: v for k, v in manifest["mapping"].items() if k != "vocabulary_sizes"},
            "sources": [{"path": src["path"], "sha256": src["sha256"]} for src in manifest["sources"]],
        }
        if self.raw_files:
            out["raw_files"] = self.raw_files
        return out


def open_data(spec: str, config: ModelConfig, *, train_examples: int = 500_000, eval_examples: int = 100_000,
              data_seed: int = 0, dense_distribution: str = "uniform", variable_bags: bool = False,
              eval_data: Optional[str] = None, cache_dir: Optional[str] = None,
              hash_buckets: Optional[int] = None, min_frequency: Optional[int] = None,
              val_data: Optional[str] = None, val_fraction: Optional[float] = None,
              verify_data: bool = False) -> DataSource:
    """The data named by ``spec``: ``random``, ``synthetic``, a converted dataset
    directory, or a raw Criteo TSV file (with ``eval_data`` its held-out file).

    For generated data the table sizes come from ``config`` (``--rows`` changes
    them); for Criteo data they come from the dataset's manifest and override the
    preset's.  ``cache_dir``, ``hash_buckets`` and ``min_frequency`` apply to raw
    files (how and where they are converted).  ``verify_data``: check every shard's and
    vocabulary file's sha256 before use (:class:`CriteoSource`).
    """
    raw_options = {"--cache-dir": cache_dir, "--hash-buckets": hash_buckets, "--min-frequency": min_frequency,
                   "--val-data": val_data, "--val-fraction": val_fraction}
    if spec in GENERATED:
        if eval_data is not None:
            raise UserError("--eval-data applies to files only; generated data makes its own eval split")
        _refuse(raw_options, f"generated ({spec}) data")
        if verify_data:
            raise UserError(f"--verify-data checks converted datasets' files; generated ({spec}) data has none")
        if spec == "synthetic" and config.num_dense != CRITEO_DENSE:
            raise UserError(
                f"synthetic data is Criteo-shaped ({CRITEO_DENSE} dense features) but preset "
                f"{config.preset!r} expects {config.num_dense}; use --data random"
            )
        return GeneratedSource(spec, config, train_examples, eval_examples, data_seed, dense_distribution,
                               variable_bags)
    path = Path(spec)
    if path.name == "manifest.json" and path.is_file():  # the manifest named instead of its directory
        path = path.parent
    if path.is_dir():
        if eval_data is not None:
            raise UserError(f"--eval-data applies to raw TSV files; {spec} is a converted dataset with its own "
                            f"held-out split")
        _refuse(raw_options, f"a converted dataset ({spec})")
        return CriteoSource(path, config, verify_data=verify_data)
    if path.is_file():
        from tfdlrm.pipelines.cache import cached_conversion

        if eval_data is not None and not Path(eval_data).is_file():
            raise UserError(f"--eval-data file not found: {eval_data}")
        if val_data is not None and not Path(val_data).is_file():
            raise UserError(f"--val-data file not found: {val_data}")
        converted = cached_conversion(spec, eval_data, cache_dir, hash_buckets, min_frequency,
                                      val_data=val_data, val_fraction=val_fraction)
        raw = [os.path.abspath(p) for p in (spec, eval_data, val_data) if p]
        return CriteoSource(converted, config, raw_files=raw, verify_data=verify_data)
    raise UserError(
        f"unknown data {spec!r}: not random or synthetic, and no such file or directory "
        f"(give a converted Criteo dataset directory or a raw Criteo TSV file)"
    )


@contextlib.contextmanager
def damaged_data_named(source: DataSource):
    """Inside: a ``tf.errors.DataLossError`` (a damaged record that tf.data met, reported
    without its file) becomes ``source.damage(error)``, one line naming the file and record."""
    try:
        yield
    except tf.errors.DataLossError as e:
        error = source.damage(e)
        if error is None:
            raise
        raise error from None


def _refuse(options: dict, what: str) -> None:
    given = [flag for flag, value in options.items() if value is not None]
    if given:
        raise UserError(f"{', '.join(given)} appl{'ies' if len(given) == 1 else 'y'} to raw Criteo TSV files, "
                        f"not to {what}")
