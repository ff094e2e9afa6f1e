"""Where training data comes from: one interface over generators and converted datasets.

``open_data(spec, config)`` gives a :class:`DataSource` bound to the model config
the data implies (table row counts, dense width).  Sources differ in where rows
come from, never in what a batch looks like (see :mod:`pipelines`).
"""
from __future__ import annotations

import math
from typing import Optional

import tensorflow as tf

from pipelines.generators import RandomData, SyntheticData
from tfdlrm.errors import UserError
from tfdlrm.presets import CRITEO_DENSE, ModelConfig

GENERATED = ("random", "synthetic")
# Synthetic rows are generated in blocks of this many, so that the data set is the
# same whatever the batch size (batches are cut from the stream of blocks).
SYNTHETIC_BLOCK = 1024


class DataSource:
    """A training split and an evaluation split.

    Attributes: ``name``, ``config`` (the model config with the data's table sizes),
    ``train_examples`` and ``eval_examples`` (rows per split).
    """

    name: str
    config: ModelConfig
    train_examples: int
    eval_examples: int

    def train_dataset(self, batch_size: int, seed: Optional[int] = None, start_batch: int = 0,
                      input_context: Optional[tf.distribute.InputContext] = None) -> tf.data.Dataset:
        """One epoch of training batches (shuffled by ``seed`` where the source can)."""
        raise NotImplementedError

    def eval_dataset(self, batch_size: int) -> tf.data.Dataset:
        """All of the held-out split, in a fixed order."""
        raise NotImplementedError

    def train_batches(self, batch_size: int) -> int:
        """Batches in one training epoch."""
        return math.ceil(self.train_examples / batch_size)

    def teacher_auc(self, batch_size: int = 4096) -> Optional[float]:
        """The best AUC a model can reach on the eval split, where known (synthetic data)."""
        return None

    def describe(self) -> dict:
        """What to record in a run's ``run.json`` to say which data it saw."""
        raise NotImplementedError


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
        self._teacher_auc: Optional[float] = None

    def _blocks(self, split: str, examples: int, batch_size: int, order_seed: Optional[int],
                start_batch: int, with_teacher: bool = False) -> tf.data.Dataset:
        if batch_size <= 0:
            raise UserError(f"batch size must be positive, got {batch_size}")
        if self.name == "random":
            # The paper's random data: one generated block per batch.
            batches = math.ceil(examples / batch_size)
            return self.generator.dataset(batch_size, batches, split, start_batch, order_seed)
        blocks = examples // SYNTHETIC_BLOCK
        data = self.generator.dataset(SYNTHETIC_BLOCK, blocks, split, 0, order_seed, with_teacher)
        # rebatch() loses the cardinality; restore it so Keras shows a real progress bar.
        data = data.rebatch(batch_size).apply(
            tf.data.experimental.assert_cardinality(math.ceil(examples / batch_size)))
        return data.skip(start_batch) if start_batch else data

    def train_dataset(self, batch_size, seed=None, start_batch=0, input_context=None):
        data = self._blocks("train", self.train_examples, batch_size, seed, start_batch)
        if input_context is not None and input_context.num_input_pipelines > 1:
            data = data.shard(input_context.num_input_pipelines, input_context.input_pipeline_id)
        return data

    def eval_dataset(self, batch_size):
        return self._blocks("eval", self.eval_examples, batch_size, None, 0)

    def teacher_auc(self, batch_size: int = 4096) -> Optional[float]:
        if self.name != "synthetic":
            return None
        if self._teacher_auc is None:
            from tfdlrm.metrics import exact_auc
            import numpy as np

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


def open_data(spec: str, config: ModelConfig, *, train_examples: int = 500_000, eval_examples: int = 100_000,
              data_seed: int = 0, dense_distribution: str = "uniform", variable_bags: bool = False,
              eval_data: Optional[str] = None) -> DataSource:
    """The data named by ``spec``: ``random``, ``synthetic`` or a path.

    For generated data the table sizes come from ``config`` (``--rows`` changes
    them); for a converted dataset they come from its manifest and override the
    preset's.
    """
    if spec in GENERATED:
        if eval_data is not None:
            raise UserError("--eval-data applies to files only; generated data makes its own eval split")
        if spec == "synthetic" and config.num_dense != CRITEO_DENSE:
            raise UserError(
                f"synthetic data is Criteo-shaped ({CRITEO_DENSE} dense features) but preset "
                f"{config.preset!r} expects {config.num_dense}; use --data random"
            )
        return GeneratedSource(spec, config, train_examples, eval_examples, data_seed, dense_distribution,
                               variable_bags)
    raise UserError(
        f"unknown data {spec!r}: use random, synthetic, or the path of a converted Criteo dataset"
    )
