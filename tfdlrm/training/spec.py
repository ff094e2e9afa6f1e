"""What a training run takes (``TrainSpec``, the flags of ``train``) and gives (``RunResult``)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

from tfdlrm.errors import UserError
from tfdlrm.metrics import Evaluation
from tfdlrm.presets import LAST_BATCH, MODEL_NAMES, SHUFFLES, ModelConfig, get_preset
from tfdlrm.training.compile import make_optimizer


@dataclass
class TrainSpec:
    """Everything ``python -m tfdlrm train`` takes; ``train(spec)`` runs it."""

    model: str = "dlrm"
    preset: str = "tiny"
    data: str = "synthetic"
    eval_data: Optional[str] = None
    # model selection: raw data's validation rows (a file, or the last fraction of the training file)
    val_data: Optional[str] = None
    val_fraction: Optional[float] = None
    rows: Optional[int] = None
    overrides: dict = field(default_factory=dict)
    epochs: int = 1
    steps_per_epoch: Optional[int] = None
    batch_size: int = 128
    eval_batch_size: int = 4096
    optimizer: str = "sgd"
    lr: float = 0.1
    embedding_optimizer: Optional[str] = None
    embedding_lr: Optional[float] = None
    # the reference DLRM's learning-rate policy for every optimizer (tfdlrm/training/schedule.py): linear
    # warmup, then from decay_start_step (default: the warmup's end) a decay of power 2 over decay_steps
    warmup_steps: int = 0
    decay_start_step: Optional[int] = None
    decay_steps: int = 0
    # stop once the validation AUC has not improved for this many epochs (tfdlrm/training/early_stop.py)
    early_stop: Optional[int] = None
    seed: int = 1
    # the order of the training rows: a new one each epoch, one per seed, or as stored; and
    # what becomes of an epoch's short last batch (pipelines/batching.py)
    shuffle: str = "once"
    last_batch: str = "fold"
    data_seed: int = 0
    train_examples: int = 500_000
    eval_examples: int = 100_000
    out: Optional[str] = None
    curve_points: int = 0
    # held-out rows each learning-curve point evaluates (the validation split's first ones, whole
    # evaluation batches; 0: all of it); the epoch ends evaluate every row
    curve_examples: int = 8192
    # progress: auto = plain lines (a line redrawn on a terminal), 0 none, 1 or 2 Keras's own
    # (tfdlrm/training/progress.py); TensorBoard scalars every log_every steps (reporting.py)
    verbose: int | str = "auto"
    log_every: int = 100
    # steps a call of Keras's train function runs on one device (None: auto, training/stream.py)
    steps_per_execution: Optional[int] = None
    # tfdlrm.parallel: a device count or list; none|hybrid|mirrored|ps (default: hybrid
    # over several devices); hybrid's per-device byte budget for embeddings.
    devices: Optional[int | str | list] = None
    parallel: Optional[str] = None
    budget: Optional[int | str] = None
    # raw Criteo TSV given as data: where and how it is converted (pipelines/cache.py)
    cache_dir: Optional[str] = None
    hash_buckets: Optional[int] = None
    min_frequency: Optional[int] = None
    # fault tolerance (tfdlrm/training/checkpoints.py): a checkpoint every N steps besides each epoch end;
    # deterministic ops (tf.config.experimental.enable_op_determinism); discard the run in ``out``.
    checkpoint_every: Optional[int] = None
    # checkpoints kept: the newest N and the best epoch on validation (None: every epoch's, and the newest
    # two step checkpoints after the last epoch end; tfdlrm/training/checkpoints.py)
    keep: Optional[int] = None
    deterministic: bool = False
    restart: bool = False
    # speed (tfdlrm/models/fast_step.py): the one-device step (auto = sparse on one device, off in
    # parallel modes) and bfloat16 MLPs (auto = on where the CPU has native bf16)
    xla: str = "auto"
    mixed_precision: str = "auto"
    # TensorFlow's thread pools by batch size (auto) or its defaults (tf): tfdlrm/training/threads.py
    threads: str = "auto"
    # before training, check every shard's and vocabulary file's sha256 against the manifest
    # (without it: the held-out shards only; pipelines/sources.py CriteoSource)
    verify_data: bool = False
    # refuse a run whose estimated peak memory exceeds this (bytes, or a size: 8G, 512MiB); default:
    # what the machine has available (tfdlrm/training/memory.py)
    memory_limit: Optional[int | str] = None

    def check(self) -> "TrainSpec":
        if self.model not in MODEL_NAMES:
            raise UserError(f"unknown model {self.model!r}; choose one of: {', '.join(MODEL_NAMES)}")
        for name in ("epochs", "batch_size", "eval_batch_size"):
            if getattr(self, name) <= 0:
                raise UserError(f"{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.steps_per_epoch is not None and self.steps_per_epoch <= 0:
            raise UserError(f"steps-per-epoch must be positive, got {self.steps_per_epoch}")
        if self.shuffle not in SHUFFLES:
            raise UserError(f"--shuffle must be one of {', '.join(SHUFFLES)}, got {self.shuffle!r}")
        if self.last_batch not in LAST_BATCH:
            raise UserError(f"--last-batch must be one of {', '.join(LAST_BATCH)}, got {self.last_batch!r}")
        if self.val_fraction is not None and not 0 < self.val_fraction < 1:
            raise UserError(f"--val-fraction must be between 0 and 1 (exclusive), got {self.val_fraction}")
        if self.curve_points < 0:
            raise UserError(f"curve-points must be >= 0, got {self.curve_points}")
        if isinstance(self.curve_examples, bool) or not isinstance(self.curve_examples, int) or self.curve_examples < 0:
            raise UserError(f"--curve-examples must be a number of rows >= 0, got {self.curve_examples!r}")
        if isinstance(self.log_every, bool) or not isinstance(self.log_every, int) or self.log_every <= 0:
            raise UserError(f"--log-every must be a positive number of steps, got {self.log_every!r}")
        if self.steps_per_execution is not None and (isinstance(self.steps_per_execution, bool) or not isinstance(
                self.steps_per_execution, int) or self.steps_per_execution <= 0):
            raise UserError(f"--steps-per-execution must be a positive number of steps, got "
                            f"{self.steps_per_execution!r}")
        if self.verbose not in ("auto", 0, 1, 2):
            raise UserError(f"verbose must be 'auto', 0, 1 or 2, got {self.verbose!r}")
        if self.rows is not None and self.rows <= 0:
            raise UserError(f"rows must be positive, got {self.rows}")
        if self.checkpoint_every is not None:
            if self.checkpoint_every <= 0:
                raise UserError(f"checkpoint-every must be positive, got {self.checkpoint_every}")
            if not self.out:
                raise UserError("--checkpoint-every needs --out: the run directory its checkpoints go to")
            if self.parallel == "ps":
                raise UserError("--checkpoint-every needs batch-level callbacks, which Keras does not allow with "
                                "--parallel ps; ps runs checkpoint at each epoch end")
        make_optimizer(self.optimizer, self.lr)
        from tfdlrm.training.schedule import check_schedule

        check_schedule(self.warmup_steps, self.decay_start_step, self.decay_steps)
        if self.early_stop is not None and (isinstance(self.early_stop, bool) or not isinstance(self.early_stop, int)
                                            or self.early_stop <= 0):
            raise UserError(f"--early-stop must be a positive number of epochs, got {self.early_stop!r}")
        if self.keep is not None:
            if isinstance(self.keep, bool) or not isinstance(self.keep, int) or self.keep <= 0:
                raise UserError(f"--keep must be a positive number of checkpoints, got {self.keep!r}")
            if not self.out:
                raise UserError("--keep needs --out: the run directory whose checkpoints it keeps")
        if self.embedding_optimizer is not None or self.embedding_lr is not None:
            make_optimizer(self.embedding_optimizer or self.optimizer, self.embedding_lr or self.lr)
        from tfdlrm.parallel.devices import check_parallel_args

        check_parallel_args(self.parallel, self.devices, self.budget, self.steps_per_epoch)
        from tfdlrm.models.fast_step import resolve_mixed_precision, resolve_xla

        resolve_xla(self.xla, self.parallel)
        resolve_mixed_precision(self.mixed_precision)
        from tfdlrm.training.threads import thread_pools

        thread_pools(self.batch_size, self.threads, self.parallel)
        from tfdlrm.training.memory import parse_memory_limit

        parse_memory_limit(self.memory_limit)
        return self

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        del out["verify_data"]  # how the data is checked, not what the run computes: no setting of the run
        del out["memory_limit"]  # a limit of the machine, not a setting of the run: may change on resume
        return out


@dataclass
class RunResult:
    model: str
    evaluation: Evaluation
    params: int
    train_seconds: float
    examples_per_second: float
    teacher_auc: Optional[float]
    history: dict
    run_dir: Optional[str]
    examples: int = 0
    curve: list = field(default_factory=list)
    diverged: Optional[str] = None
    resumed_from: list = field(default_factory=list)  # checkpoints this run continued from, oldest first
    # Exact metrics at each epoch end: {"epoch", "step", "val": {...} (where there is a
    # validation split), "test": {...}}; ``best_epoch`` (1-based) is the one with the highest
    # validation AUC, the last epoch without a validation split.  The test split never selects.
    epochs: list = field(default_factory=list)
    best_epoch: Optional[int] = None
    # the epoch after which --early-stop ended training, before --epochs (None: it did not)
    stopped_epoch: Optional[int] = None
    # seconds of held-out evaluation (not in train_seconds): the learning-curve points and the epoch
    # ends; the curve points' part
    eval_seconds: float = 0.0
    curve_seconds: float = 0.0
    # what the model saw (training/inputs.py, describe_inputs); {} for runs from before it was recorded
    inputs: dict = field(default_factory=dict)

    @property
    def selected(self) -> Optional[dict]:
        """The test metrics at ``best_epoch`` (None before any epoch ended)."""
        for entry in self.epochs:
            if entry["epoch"] == self.best_epoch:
                return entry["test"]
        return None

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["evaluation"] = self.evaluation.to_dict()
        return out


def model_config_for(spec: TrainSpec) -> ModelConfig:
    return get_preset(spec.preset, rows=spec.rows, **spec.overrides)


def result_from_dict(data: dict) -> RunResult:
    """A :class:`RunResult` from its ``metrics.json`` form (nulls back to NaN)."""
    data = dict(data)
    data["evaluation"] = Evaluation(**{k: (float("nan") if v is None else v) for k, v in data["evaluation"].items()})
    for key in ("train_seconds", "examples_per_second"):
        data[key] = float("nan") if data.get(key) is None else data[key]
    return RunResult(**data)
