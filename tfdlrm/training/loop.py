"""``train(spec)``: what ``python -m tfdlrm train`` does, as one function.

Open the data, set up devices, build and compile, resume from the run directory's newest
good checkpoint, ``model.fit`` with the run's callbacks, evaluate exactly, write
``metrics.json``.  See docs/training.md.
"""
from __future__ import annotations

from contextlib import ExitStack
from typing import Callable, Optional

import tensorflow as tf

from tfdlrm.errors import UserError
from tfdlrm.metrics import Evaluation
from tfdlrm.parallel.devices import parse_budget
from tfdlrm.parallel.setup import configure_devices, make_parallel
from tfdlrm.pipelines.batching import odd_batches, rows_per_epoch
from tfdlrm.training.callbacks import (
    EpochEvaluation,
    LearningCurve,
    RunCheckpoints,
    StopOnNonFinite,
    TrainingClock,
)
from tfdlrm.training.checkpoints import build_metrics, first_line
from tfdlrm.training.compile import build_model, compile_model
from tfdlrm.training.early_stop import (
    EarlyStop,
    check_early_stop,
    describe_stop,
    stopped_after,
)
from tfdlrm.training.evaluate import curve_sample, evaluate, in_memory_if_small
from tfdlrm.training.inputs import describe_inputs, standardize_dense
from tfdlrm.training.preemption import StopOnSignal, stop_signals
from tfdlrm.training.progress import progress_for
from tfdlrm.training.reporting import TensorBoardLog, hparams_of
from tfdlrm.training.rundir import (
    CHECKPOINT_DIR,
    LOGS_DIR,
    METRICS_FILE,
    PREDICTIONS_FILE,
    RUN_FILE,
    RunStatus,
    hold_out_dir,
    open_run,
    save_predictions,
    write_json,
)
from tfdlrm.training.schedule import LearningRateLog, scheduled_lr
from tfdlrm.training.spec import (
    RunResult,
    TrainSpec,
    model_config_for,
    result_from_dict,
)
from tfdlrm.training.stream import (
    StartAt,
    steps_a_call,
    steps_per_execution,
    training_stream,
)
from tfdlrm.training.threads import use_thread_pools


def train(spec: TrainSpec, log: Callable[[str], None] = print) -> RunResult:
    """Train ``spec.model`` with ``model.fit`` and evaluate it exactly on the held-out split.

    With ``spec.out`` holding an unfinished run of the same settings, training resumes
    from its newest good checkpoint; a finished run is returned as it is (``spec.restart``
    trains it again).  The process holds ``spec.out``'s lock while it trains (rundir.hold_out_dir):
    a second run into the same directory is refused.
    """
    with ExitStack() as held:
        return _train(spec, log, held)


def _train(spec: TrainSpec, log: Callable[[str], None], held: ExitStack) -> RunResult:
    from tfdlrm.pipelines.sources import damaged_data_named, open_data

    spec.check()
    threads = use_thread_pools(spec.batch_size, spec.threads, spec.parallel)  # before TensorFlow's runtime starts
    if spec.devices is not None and spec.parallel != "ps":
        configure_devices(spec.devices)  # before TensorFlow's runtime starts
    if spec.deterministic:
        tf.config.experimental.enable_op_determinism()
    tf.keras.utils.set_random_seed(spec.seed)
    # Locked before anything is read or converted: one process decides about the run and writes it.
    out = hold_out_dir(spec.out, held) if spec.out else None
    source = open_data(spec.data, model_config_for(spec), train_examples=spec.train_examples,
                       eval_examples=spec.eval_examples, data_seed=spec.data_seed, eval_data=spec.eval_data,
                       cache_dir=spec.cache_dir, hash_buckets=spec.hash_buckets, min_frequency=spec.min_frequency,
                       val_data=spec.val_data, val_fraction=spec.val_fraction, verify_data=spec.verify_data)
    held.enter_context(damaged_data_named(source))  # a damaged record: one line naming its file
    for note in source.notes:
        log(f"note: {note}")
    check_early_stop(spec.early_stop, source.val_examples, source.name)
    config = source.config
    from tfdlrm.training.cluster_memory import check_cluster_memory
    from tfdlrm.training.memory import check_training_memory, held_out_rows

    eval_rows = held_out_rows(source)
    check_training_memory(spec, config, eval_rows)  # before any variable: refused if it cannot fit
    check_cluster_memory(spec, config, eval_rows, log)  # --parallel ps: each process
    per_pass = source.train_batches(spec.batch_size, spec.last_batch)
    steps_per_epoch = spec.steps_per_epoch or per_pass
    total_steps = spec.epochs * steps_per_epoch
    from tfdlrm.models.fast_step import resolve_mixed_precision, resolve_xla
    from tfdlrm.tables import table_summary, tables_record

    precision = resolve_mixed_precision(spec.mixed_precision)
    run_info = {"model": spec.model, "config": config.to_dict(), "data": source.describe(), "spec": spec.to_dict(),
                "mixed_precision": precision or "off", "tables": tables_record(config)}
    status = None
    if out is not None:
        status = open_run(out, run_info, restart=spec.restart, total_steps=total_steps,
                               spec_defaults=TrainSpec().to_dict(), run_file=RUN_FILE, metrics_file=METRICS_FILE,
                               checkpoint_dir=CHECKPOINT_DIR, logs_dir=LOGS_DIR)
        if status.finished is not None:
            result = result_from_dict(status.finished)
            more = (f"--early-stop ended it after epoch {result.stopped_epoch}" if result.stopped_epoch
                    else "a larger --epochs continues it")
            log(f"{out}: this run finished earlier; {spec.model} held-out: {result.evaluation}  "
                f"(nothing to train: --restart trains it again, {more})")
            return result

    setup = make_parallel(spec.parallel, spec.devices, config, parse_budget(spec.budget),
                                   spec.model)
    xla = resolve_xla(spec.xla, setup.mode)
    with setup.scope():
        model = build_model(spec.model, config, mixed_precision=precision)
        lr, embedding_lr = (scheduled_lr(rate, spec.warmup_steps, spec.decay_start_step, spec.decay_steps)
                            for rate in (spec.lr, spec.embedding_lr))  # a number, or the reference's schedule
        # several steps a call of the train function on one device (callbacks run once a call)
        per_call = steps_per_execution(spec.batch_size, spec.log_every, spec.checkpoint_every,
                                       asked=spec.steps_per_execution) if setup.mode == "none" else 1
        compile_model(model, spec.optimizer, lr, spec.embedding_optimizer, embedding_lr, xla=xla)
    if getattr(model, "fast_step", None) is not None and odd_batches(source.train_examples, spec.batch_size,
                                                                     spec.last_batch):
        model.fast_step.batch_size = spec.batch_size  # the epoch's odd last batch: the parts uncompiled
    setup.attach(model)
    params = model.count_params()
    log(f"{spec.model}: preset {config.preset}, {config.num_tables} tables ({sum(config.table_rows):,} rows, "
        f"dim {config.embedding_dim}), {params:,} parameters; data {source.name}: "
        f"{source.train_examples:,} train / {source.eval_examples:,} eval examples; {setup.describe()}; "
        f"step: xla {xla}, {'bf16' if precision else 'float32'} MLPs, {per_call} steps a call; {threads}")
    for line in table_summary(config):
        log(f"{spec.model} embedding {line}")
    if setup.plan is not None and len(setup.devices) > 1:
        per_device = ", ".join(f"{d}: {b:,}" for d, b in setup.plan.bytes_per_device().items())
        log(f"embedding bytes per device: {per_device}")
        for t in setup.plan.tables:
            if t.split:
                log(f"table {t.name} split by rows over {len(t.shards)} devices: "
                    + ", ".join(f"{s.device} rows {s.start}-{s.stop - 1}" for s in t.shards))

    record = resume(model, status, log) if status is not None else None
    inputs = describe_inputs(config, run_info["data"])
    if record is None:
        standardize_dense(model, source.train_dataset(spec.eval_batch_size))
    log(f"{spec.model} inputs: dense {inputs['dense_transform']}, then {inputs['dense_norm_text']} (--dense-norm); "
        f"ids: {inputs['vocabulary']}")
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
        # Each worker reads its own batches: every worker's pipeline is the same seeded order, and each
        # keeps every workers-th batch from its index (tfdlrm/parallel/ps.py worker_shard).
        from tfdlrm.parallel.ps import worker_shard

        train_data = tf.keras.utils.experimental.DatasetCreator(
            lambda context: worker_shard(source.train_dataset(spec.batch_size, seed=spec.seed),
                                         len(setup.cluster["worker"])).repeat())
    elif start < total_steps:
        train_data = training_stream(source, spec.batch_size, spec.seed, start, total_steps, spec.shuffle,
                                     spec.last_batch)
    eval_data = in_memory_if_small(source.eval_dataset(spec.eval_batch_size), source.eval_examples, config)
    val_data = in_memory_if_small(source.val_dataset(spec.eval_batch_size), source.val_examples,
                                  config)  # None: no validation split

    clock = TrainingClock(saved_state.get("clock", {}).get("seconds", 0.0))
    callbacks: list = [clock]
    store = status.store if status is not None else None
    if store is not None:
        store.keep = spec.keep
    nan_stop = None
    if setup.mode != "ps":  # Keras allows no batch-level callbacks under ParameterServerStrategy
        nan_stop = StopOnNonFinite(store.describe_latest if store else None, first_step=start, every=spec.log_every,
                                   also_every=spec.checkpoint_every, steps_per_epoch=steps_per_epoch)
        callbacks.append(nan_stop)
    curve = None
    if spec.curve_points and setup.mode == "ps":
        raise UserError("learning curves (--curve-points) need batch-level callbacks, which Keras does not "
                        "allow with --parallel ps; use --curve-points 0")
    if spec.curve_points:
        every = max(1, total_steps // spec.curve_points)
        sample = curve_sample(source, spec.eval_batch_size, spec.curve_examples)  # the same rows at every point
        every = max(per_call, round(every / per_call) * per_call)  # whole calls of the train function
        curve = LearningCurve(sample, every, spec.batch_size, clock)
        if "curve" in saved_state:
            curve.restore(saved_state["curve"], mid_epoch=start_batch > 0)
        callbacks.append(curve)
    epoch_eval = EpochEvaluation(eval_data, val_data,
                                 on_best=(lambda y, p: save_predictions(out / PREDICTIONS_FILE, y, p)) if out else None)
    if "epochs" in saved_state:
        epoch_eval.restore(saved_state["epochs"])
    callbacks.append(epoch_eval)
    callbacks.append(LearningRateLog())  # before TensorBoard and the checkpoints, which record the logs
    if spec.early_stop is not None:
        callbacks.append(EarlyStop(epoch_eval, spec.early_stop))
    fit_verbose, progress = progress_for(spec.verbose, spec.epochs, steps_per_epoch, spec.batch_size, clock, log,
                                         start_epoch, start_batch, batch_hooks=setup.mode != "ps")
    if progress is not None:
        callbacks.append(progress)
    saver = None
    if out is not None:
        state_of = {"clock": clock, "epochs": epoch_eval}
        if curve is not None:
            state_of["curve"] = curve
        board = TensorBoardLog(out / LOGS_DIR, spec.log_every, steps_per_epoch, start, clock,
                               hparams=hparams_of(run_info), batch_hooks=setup.mode != "ps")
        if "tensorboard" in saved_state:
            board.restore(saved_state["tensorboard"], mid_epoch=start_batch > 0)
        state_of["tensorboard"] = board
        if curve is not None:
            curve.on_point = board.curve_point
        saver = RunCheckpoints(
            store, spec.checkpoint_every, steps_per_epoch, per_pass, spec.seed, start_epoch, start_batch,
            shuffle=spec.shuffle,
            history=record.get("history") if record else None,
            metrics=record.get("metrics") if record and start_batch else None,
            extra={"resumed_from": resumed_from}, state_of=state_of, clock=clock,
            identity={"model": spec.model, "config": config.to_dict()})
        if start_batch and record.get("metrics"):
            build_metrics(model)  # so that the epoch's running metrics can be set before its next step
        callbacks += [board, saver]  # summaries before checkpoints: a resumed run drops what came after its own
    stopper = StopOnSignal(saver, steps_per_epoch, nan_stop.check) if setup.mode != "ps" else None
    if stopper is not None:
        callbacks.append(stopper)  # last: after the step's checkpoint, if it has one
    history: dict = {}
    # a run resumed from the checkpoint of the epoch where --early-stop ended it has finished training
    stopped = stopped_after(epoch_eval, spec.early_stop, spec.epochs) if not start_batch else None
    if start < total_steps and stopped is None:
        if start_batch:
            StartAt(start_epoch, start_batch).attach(model)
        try:
            with stop_signals(stopper), steps_a_call(model, per_call):  # SIGTERM, SIGINT: a checkpoint, Stopped
                fitted = model.fit(train_data, epochs=spec.epochs, steps_per_epoch=steps_per_epoch,
                                   initial_epoch=start_epoch, callbacks=callbacks, verbose=fit_verbose)
        finally:
            StartAt.detach(model)
        history = {k: [float(v) for v in vs] for k, vs in fitted.history.items()}
    if saver is not None:
        history = saver.history  # the whole run's, epochs of earlier processes included

    steps = int(model.optimizer.iterations.numpy())
    last = epoch_eval.epochs[-1] if epoch_eval.epochs else None
    if last is not None and last["step"] == steps:  # the last epoch's test evaluation is of these weights
        evaluation = Evaluation(**last["test"])
    else:
        evaluation = evaluate(model, eval_data)
    teacher = source.teacher_auc()
    trained_examples = steps * spec.batch_size
    if spec.steps_per_epoch is None:  # an epoch's last batch may be short (keep) or longer (fold)
        passes, rest = divmod(steps, per_pass)
        trained_examples = min(passes * rows_per_epoch(source.train_examples, spec.batch_size, spec.last_batch)
                               + rest * spec.batch_size, spec.epochs * source.train_examples)
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
        epochs=epoch_eval.epochs,
        inputs=inputs,
        best_epoch=epoch_eval.best_epoch,
        stopped_epoch=stopped_after(epoch_eval, spec.early_stop, spec.epochs),
        eval_seconds=round((curve.seconds + curve.setup_seconds if curve else 0.0) + epoch_eval.seconds, 3),
        curve_seconds=round(curve.seconds if curve else 0.0, 3),
    )
    line = f"{spec.model} held-out: {evaluation}"
    if teacher is not None:
        line += f"  [teacher AUC {teacher:.4f}]"
    log(line)
    if val_data is not None and result.selected is not None:
        log(f"{spec.model} best epoch on validation: {result.best_epoch}, test AUC there "
            f"{result.selected['auc']:.4f}")
    if result.stopped_epoch is not None:
        log(f"{spec.model} {describe_stop(result.stopped_epoch, result.best_epoch, spec.early_stop)}")
    if out is not None:
        write_json(out / METRICS_FILE, result.to_dict())
    return result


def resume(model: tf.keras.Model, status: "RunStatus", log: Callable[[str], None]) -> Optional[dict]:
    """Restore the newest of ``status.candidates`` that restores cleanly into ``model`` (older
    ones if it is damaged); returns its record, or None to train from scratch."""
    store = status.store
    for record in status.candidates:
        try:
            store.restore(model, record)
        except (tf.errors.OpError, ValueError, AssertionError) as e:
            log(f"checkpoint {store.prefix(record)} cannot be restored ({first_line(e)}); "
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
