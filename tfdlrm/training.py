"""Build, compile, fit and evaluate: what ``python -m tfdlrm train`` does, as functions.

A run directory (``--out``) holds::

    run.json          model name, full model config, data description, training spec
    checkpoints/      TF checkpoints (model + optimizer slots) at each epoch end and every
                      ``checkpoint_every`` steps, each with a record of where training stood
                      (``tfdlrm/checkpoints.py``)
    logs/             TensorBoard event files
    metrics.json      the final exact evaluation, throughput and parameter count (written last)

Training into a directory that holds an unfinished run of the same settings resumes it
from its newest good checkpoint; a finished one is not trained again (``restart``
discards it).  ``load_run(run_dir)`` rebuilds the model from ``run.json`` alone and
restores the latest checkpoint: no command line needed.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import tensorflow as tf

from tfdlrm.callbacks import LearningCurve, StopOnNonFinite, TrainingClock
from tfdlrm import checkpoints as ckpt
from tfdlrm.errors import UserError
from tfdlrm.metrics import Evaluation, evaluate_predictions
from tfdlrm.presets import ModelConfig, get_preset

MODEL_NAMES = ("dlrm", "dcn", "dcn-v2")
OPTIMIZER_NAMES = ("sgd", "adagrad", "adam")
RUN_FILE = "run.json"
METRICS_FILE = "metrics.json"
CHECKPOINT_DIR = "checkpoints"
LOGS_DIR = "logs"


# -- models and optimizers ----------------------------------------------------------
def build_model(name: str, config: ModelConfig, mixed_precision: Optional[str] = None) -> tf.keras.Model:
    """A built DLRM, DCN or DCN-v2 (variables created) for ``config``.

    ``mixed_precision="bf16"`` computes the MLPs in bfloat16 (variables, embedding
    tables included, stay float32, so checkpoints are the same either way).
    """
    if name == "dlrm":
        from tfdlrm.models import DLRM

        model = DLRM(config, mixed_precision=mixed_precision)
    elif name in ("dcn", "dcn-v2"):
        from baselines.dcn import DCN

        model = DCN(config, cross="v1" if name == "dcn" else "v2", mixed_precision=mixed_precision)
    else:
        raise UserError(f"unknown model {name!r}; choose one of: {', '.join(MODEL_NAMES)}")
    return model.build_from_config()


def make_optimizer(name: str, lr: float) -> tf.keras.optimizers.legacy.Optimizer:
    """A tf_keras *legacy* optimizer: these apply ``IndexedSlices`` gradients as sparse
    row updates, where the new optimizers keep and rewrite full-table state.

    Adagrad starts its accumulators at 0 with epsilon 1e-10, as ``torch.optim.Adagrad``
    in the reference DLRM.  Adam's moment slots are dense: every step decays the whole
    table's slots, so prefer SGD or Adagrad for large embeddings.
    """
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise UserError(f"learning rate must be a positive number, got {lr}")
    legacy = tf.keras.optimizers.legacy
    if name == "sgd":
        return legacy.SGD(learning_rate=lr)
    if name == "adagrad":
        return legacy.Adagrad(learning_rate=lr, initial_accumulator_value=0.0, epsilon=1e-10)
    if name == "adam":
        return legacy.Adam(learning_rate=lr)
    raise UserError(f"unknown optimizer {name!r}; choose one of: {', '.join(OPTIMIZER_NAMES)}")


def embedding_variables(model: tf.keras.Model) -> list:
    return list(model.sparse_arch.trainable_variables)


def dense_variables(model: tf.keras.Model) -> list:
    sparse = {v.ref() for v in embedding_variables(model)}
    return [v for v in model.trainable_variables if v.ref() not in sparse]


def compile_model(model: tf.keras.Model, optimizer: str = "sgd", lr: float = 0.1,
                  embedding_optimizer: Optional[str] = None, embedding_lr: Optional[float] = None,
                  jit_compile: bool = False, metrics: bool = True, xla: str = "sparse") -> tf.keras.Model:
    """Compile with binary cross-entropy and (optionally) AUC / log loss / accuracy.

    With ``embedding_optimizer`` or ``embedding_lr`` the embedding tables get their own
    optimizer through TFRS's ``CompositeOptimizer``.

    ``xla`` picks the training step on one device (``tfdlrm.fast``): ``sparse`` (the
    default) compiles the embedding gathers and row updates with XLA, ``full`` the
    whole step (as ``jit_compile=True``), ``off`` is Keras's stock step.  Ids are
    range-checked in every case.  Parallel modes use their own steps.
    """
    dense_opt = make_optimizer(optimizer, lr)
    if embedding_optimizer is None and embedding_lr is None:
        opt = dense_opt
    else:
        import tensorflow_recommenders as tfrs

        sparse_opt = make_optimizer(embedding_optimizer or optimizer, embedding_lr or lr)
        opt = tfrs.experimental.optimizers.CompositeOptimizer([
            (sparse_opt, lambda: embedding_variables(model)),
            (dense_opt, lambda: dense_variables(model)),
        ])
    keras_metrics = None
    if metrics:
        keras_metrics = [
            tf.keras.metrics.AUC(num_thresholds=1000, name="auc"),
            tf.keras.metrics.BinaryCrossentropy(name="logloss"),
            tf.keras.metrics.BinaryAccuracy(name="accuracy"),
        ]
    model.compile(optimizer=opt, loss=tf.keras.losses.BinaryCrossentropy(), metrics=keras_metrics)
    from tfdlrm.fast import use_fast_step

    use_fast_step(model, "full" if jit_compile else xla)
    return model


# -- evaluation ---------------------------------------------------------------------
def predict_with_labels(model: tf.keras.Model, dataset: tf.data.Dataset) -> tuple[np.ndarray, np.ndarray]:
    """Labels and predicted probabilities over a whole ``(features, label)`` dataset."""
    from tfdlrm.parallel import batch_predictor

    predict = batch_predictor(model)
    labels, probabilities = [], []
    for features, y in dataset:
        probabilities.append(predict(features).reshape(-1))
        labels.append(y.numpy().reshape(-1))
    if not labels:
        raise UserError("the evaluation split is empty: nothing to evaluate")
    return np.concatenate(labels), np.concatenate(probabilities)


def evaluate(model: tf.keras.Model, dataset: tf.data.Dataset) -> Evaluation:
    """Exact AUC (rank-based), log loss and accuracy of ``model`` on ``dataset``."""
    return evaluate_predictions(*predict_with_labels(model, dataset))


# -- a training run -------------------------------------------------------------------
@dataclass
class TrainSpec:
    """Everything ``python -m tfdlrm train`` takes; ``train(spec)`` runs it."""

    model: str = "dlrm"
    preset: str = "tiny"
    data: str = "synthetic"
    eval_data: Optional[str] = None
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
    seed: int = 1
    data_seed: int = 0
    train_examples: int = 500_000
    eval_examples: int = 100_000
    out: Optional[str] = None
    curve_points: int = 0
    verbose: int | str = "auto"
    # tfdlrm.parallel: a device count or list; none|hybrid|mirrored|ps (default: hybrid
    # over several devices); hybrid's per-device byte budget for embeddings.
    devices: Optional[int | str | list] = None
    parallel: Optional[str] = None
    budget: Optional[int | str] = None
    # raw Criteo TSV given as data: where and how it is converted (pipelines/criteo.py)
    cache_dir: Optional[str] = None
    hash_buckets: Optional[int] = None
    min_frequency: Optional[int] = None
    # fault tolerance (tfdlrm/checkpoints.py): a checkpoint every N steps besides each epoch end;
    # deterministic ops (tf.config.experimental.enable_op_determinism); discard the run in ``out``.
    checkpoint_every: Optional[int] = None
    deterministic: bool = False
    restart: bool = False
    # speed (tfdlrm/fast.py): the one-device step (auto = sparse on one device, off in
    # parallel modes) and bfloat16 MLPs (auto = on where the CPU has native bf16)
    xla: str = "auto"
    mixed_precision: str = "auto"

    def check(self) -> "TrainSpec":
        if self.model not in MODEL_NAMES:
            raise UserError(f"unknown model {self.model!r}; choose one of: {', '.join(MODEL_NAMES)}")
        for name in ("epochs", "batch_size", "eval_batch_size"):
            if getattr(self, name) <= 0:
                raise UserError(f"{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.steps_per_epoch is not None and self.steps_per_epoch <= 0:
            raise UserError(f"steps-per-epoch must be positive, got {self.steps_per_epoch}")
        if self.curve_points < 0:
            raise UserError(f"curve-points must be >= 0, got {self.curve_points}")
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
        if self.embedding_optimizer is not None or self.embedding_lr is not None:
            make_optimizer(self.embedding_optimizer or self.optimizer, self.embedding_lr or self.lr)
        from tfdlrm.parallel import check_parallel_args

        check_parallel_args(self.parallel, self.devices, self.budget, self.steps_per_epoch)
        from tfdlrm.fast import resolve_mixed_precision, resolve_xla

        resolve_xla(self.xla, self.parallel)
        resolve_mixed_precision(self.mixed_precision)
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


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

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["evaluation"] = self.evaluation.to_dict()
        return out


def prepare_out_dir(path: str) -> Path:
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UserError(f"cannot write to output directory {out}: {e.strerror or e}") from None
    return out


def write_json(path: Path, data: dict) -> None:
    """Write strict JSON (NaN and infinities become null) atomically: temporary file, then rename."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(json.dumps(_finite(data), indent=2, default=ckpt.json_default, allow_nan=False) + "\n")
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def model_config_for(spec: TrainSpec) -> ModelConfig:
    return get_preset(spec.preset, rows=spec.rows, **spec.overrides)


def result_from_dict(data: dict) -> RunResult:
    """A :class:`RunResult` from its ``metrics.json`` form (nulls back to NaN)."""
    data = dict(data)
    data["evaluation"] = Evaluation(**{k: (float("nan") if v is None else v) for k, v in data["evaluation"].items()})
    for key in ("train_seconds", "examples_per_second"):
        data[key] = float("nan") if data.get(key) is None else data[key]
    return RunResult(**data)


def train(spec: TrainSpec, log: Callable[[str], None] = print) -> RunResult:
    """Train ``spec.model`` with ``model.fit`` and evaluate it exactly on the held-out split.

    With ``spec.out`` holding an unfinished run of the same settings, training resumes
    from its newest good checkpoint; a finished run is returned as it is (``spec.restart``
    trains it again).
    """
    from pipelines.sources import open_data

    from tfdlrm import parallel

    spec.check()
    if spec.devices is not None and spec.parallel != "ps":
        parallel.configure_devices(spec.devices)  # before TensorFlow's runtime starts
    if spec.deterministic:
        tf.config.experimental.enable_op_determinism()
    tf.keras.utils.set_random_seed(spec.seed)
    source = open_data(spec.data, model_config_for(spec), train_examples=spec.train_examples,
                       eval_examples=spec.eval_examples, data_seed=spec.data_seed, eval_data=spec.eval_data,
                       cache_dir=spec.cache_dir, hash_buckets=spec.hash_buckets, min_frequency=spec.min_frequency)
    config = source.config
    out = prepare_out_dir(spec.out) if spec.out else None
    per_pass = source.train_batches(spec.batch_size)
    steps_per_epoch = spec.steps_per_epoch or per_pass
    total_steps = spec.epochs * steps_per_epoch
    from tfdlrm.fast import resolve_mixed_precision, resolve_xla

    precision = resolve_mixed_precision(spec.mixed_precision)
    run_info = {"model": spec.model, "config": config.to_dict(), "data": source.describe(), "spec": spec.to_dict(),
                "mixed_precision": precision or "off"}
    status = None
    if out is not None:
        status = ckpt.open_run(out, run_info, restart=spec.restart, total_steps=total_steps,
                               spec_defaults=TrainSpec().to_dict(), run_file=RUN_FILE, metrics_file=METRICS_FILE,
                               checkpoint_dir=CHECKPOINT_DIR, logs_dir=LOGS_DIR)
        if status.finished is not None:
            result = result_from_dict(status.finished)
            log(f"{out}: this run finished earlier; {spec.model} held-out: {result.evaluation}  "
                f"(nothing to train: --restart trains it again, a larger --epochs continues it)")
            return result

    setup = parallel.make_parallel(spec.parallel, spec.devices, config, parallel.parse_budget(spec.budget),
                                   spec.model)
    xla = resolve_xla(spec.xla, setup.mode)
    with setup.scope():
        model = build_model(spec.model, config, mixed_precision=precision)
        compile_model(model, spec.optimizer, spec.lr, spec.embedding_optimizer, spec.embedding_lr, xla=xla)
    setup.attach(model)
    params = model.count_params()
    log(f"{spec.model}: preset {config.preset}, {config.num_tables} tables ({sum(config.table_rows):,} rows, "
        f"dim {config.embedding_dim}), {params:,} parameters; data {source.name}: "
        f"{source.train_examples:,} train / {source.eval_examples:,} eval examples; {setup.describe()}; "
        f"step: xla {xla}, {'bf16' if precision else 'float32'} MLPs")
    if setup.plan is not None and len(setup.devices) > 1:
        per_device = ", ".join(f"{d}: {b:,}" for d, b in setup.plan.bytes_per_device().items())
        log(f"embedding bytes per device: {per_device}")
        for t in setup.plan.tables:
            if t.split:
                log(f"table {t.name} split by rows over {len(t.shards)} devices: "
                    + ", ".join(f"{s.device} rows {s.start}-{s.stop - 1}" for s in t.shards))

    record = resume(model, status, log) if status is not None else None
    start_epoch, start_batch = (record["epoch"], record["batch"]) if record else (0, 0)
    start = start_epoch * steps_per_epoch + start_batch
    saved_state = record.get("state", {}) if record else {}
    resumed_from = list(record.get("extra", {}).get("resumed_from", [])) if record else []
    if record:
        resumed_from.append({"checkpoint": record["name"], "step": record["step"]})
    if out is not None:
        (out / METRICS_FILE).unlink(missing_ok=True)  # a continued run's old results are not its results
        write_json(out / RUN_FILE, run_info)

    if setup.mode == "ps":
        # Each worker reads its own shard of the data; the coordinator evaluates.
        train_data = tf.keras.utils.experimental.DatasetCreator(
            lambda context: source.train_dataset(spec.batch_size, seed=spec.seed, input_context=context).repeat())
    elif start < total_steps:
        train_data = ckpt.training_stream(source, spec.batch_size, spec.seed, start, total_steps)
    eval_data = source.eval_dataset(spec.eval_batch_size)

    clock = TrainingClock(saved_state.get("clock", {}).get("seconds", 0.0))
    callbacks: list = [clock]
    store = status.store if status is not None else None
    if setup.mode != "ps":  # Keras allows no batch-level callbacks under ParameterServerStrategy
        callbacks.append(StopOnNonFinite(store.describe_latest if store else None, first_step=start))
    curve = None
    if spec.curve_points and setup.mode == "ps":
        raise UserError("learning curves (--curve-points) need batch-level callbacks, which Keras does not "
                        "allow with --parallel ps; use --curve-points 0")
    if spec.curve_points:
        curve = LearningCurve(eval_data, max(1, total_steps // spec.curve_points), spec.batch_size)
        if "curve" in saved_state:
            curve.restore(saved_state["curve"], mid_epoch=start_batch > 0)
        callbacks.append(curve)
    saver = None
    if out is not None:
        state_of = {"clock": clock}
        if curve is not None:
            state_of["curve"] = curve
        saver = ckpt.RunCheckpoints(
            store, spec.checkpoint_every, steps_per_epoch, per_pass, spec.seed, start_epoch, start_batch,
            history=record.get("history") if record else None,
            metrics=record.get("metrics") if record and start_batch else None,
            extra={"resumed_from": resumed_from}, state_of=state_of, clock=clock,
            identity={"model": spec.model, "config": config.to_dict()})
        if start_batch and record.get("metrics"):
            ckpt.build_metrics(model)  # so that the epoch's running metrics can be set before its next step
        callbacks += [
            tf.keras.callbacks.TensorBoard(log_dir=str(out / LOGS_DIR), update_freq="epoch", profile_batch=0),
            saver,  # after TensorBoard: a run killed between the two repeats the epoch's summary, not loses it
        ]
    history: dict = {}
    if start < total_steps:
        if start_batch:
            ckpt.StartAt(start_epoch, start_batch).attach(model)
        try:
            fitted = model.fit(train_data, epochs=spec.epochs, steps_per_epoch=steps_per_epoch,
                               initial_epoch=start_epoch, callbacks=callbacks,
                               validation_data=None if setup.mode == "ps" else eval_data, verbose=spec.verbose)
        finally:
            ckpt.StartAt.detach(model)
        history = {k: [float(v) for v in vs] for k, vs in fitted.history.items()}
    if saver is not None:
        history = saver.history  # the whole run's, epochs of earlier processes included

    evaluation = evaluate(model, eval_data)
    teacher = source.teacher_auc()
    steps = int(model.optimizer.iterations.numpy())
    trained_examples = steps * spec.batch_size
    if spec.steps_per_epoch is None:  # the last batch of an epoch may be short
        trained_examples = min(trained_examples, spec.epochs * source.train_examples)
    result = RunResult(
        model=spec.model,
        evaluation=evaluation,
        params=params,
        train_seconds=clock.seconds,
        examples_per_second=trained_examples / clock.seconds if clock.seconds else float("nan"),
        teacher_auc=teacher,
        history=history,
        run_dir=str(out) if out else None,
        examples=trained_examples,
        curve=curve.points if curve else [],
        resumed_from=resumed_from,
    )
    line = f"{spec.model} held-out: {evaluation}"
    if teacher is not None:
        line += f"  [teacher AUC {teacher:.4f}]"
    log(line)
    if out is not None:
        write_json(out / METRICS_FILE, result.to_dict())
    return result


def resume(model: tf.keras.Model, status: "ckpt.RunStatus", log: Callable[[str], None]) -> Optional[dict]:
    """Restore the newest of ``status.candidates`` that restores cleanly into ``model`` (older
    ones if it is damaged); returns its record, or None to train from scratch."""
    store = status.store
    for record in status.candidates:
        try:
            store.restore(model, record)
        except (tf.errors.OpError, ValueError, AssertionError) as e:
            log(f"checkpoint {store.prefix(record)} cannot be restored ({ckpt.first_line(e)}); "
                f"trying the one before")
            continue
        dropped = store.discard_after(record)
        log(f"resuming from {store.prefix(record)}: step {record['step']:,}, epoch {record['epoch'] + 1}"
            + (f" after batch {record['batch']:,}" if record["batch"] else " from its start")
            + (f" (dropped incomplete or damaged: {', '.join(dropped)})" if dropped else ""))
        return record
    if status.candidates:
        raise UserError(f"no checkpoint in {store.dir} can be restored: --restart trains the run from scratch")
    return None


def load_run(run_dir: str, mixed_precision: Optional[str] = "run") -> tuple[tf.keras.Model, dict]:
    """Rebuild the model of a run directory from its ``run.json`` and restore its latest
    complete checkpoint (a run that diverged never saved its broken state).

    The model is the plain single-device one whatever ``--devices``/``--parallel`` the
    run trained with: checkpoints name variables by role, and a row-split table
    restores whole.  It computes in the run's precision (``mixed_precision="run"``,
    so it predicts exactly what training evaluated), or as asked: ``None`` for
    float32, ``"bf16"``; the weights are float32 either way.
    """
    run = Path(run_dir)
    meta_path = run / RUN_FILE
    if not meta_path.is_file():
        raise UserError(f"{run_dir} is not a training run: {RUN_FILE} not found")
    try:
        meta = json.loads(meta_path.read_text())
        config = ModelConfig.from_dict(meta["config"])
        name = meta["model"]
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{meta_path} is unreadable: {e}") from None
    if mixed_precision == "run":
        mixed_precision = meta.get("mixed_precision")
    model = build_model(name, config, mixed_precision=None if mixed_precision in (None, "off") else mixed_precision)
    latest = ckpt.CheckpointStore(run / CHECKPOINT_DIR).latest()  # the newest complete one
    checkpoint = str(run / CHECKPOINT_DIR / latest["name"]) if latest else tf.train.latest_checkpoint(
        str(run / CHECKPOINT_DIR))
    if checkpoint is None:
        raise UserError(f"{run_dir} has no checkpoint under {CHECKPOINT_DIR}/")
    model.load_weights(checkpoint).expect_partial()
    return model, meta
