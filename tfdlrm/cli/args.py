"""Argument types and the flag groups that several commands share."""
from __future__ import annotations

import argparse
import sys
from typing import Callable, Optional, Sequence

from tfdlrm.errors import UserError
from tfdlrm.presets import (
    AUTO,
    DENSE_NORMS,
    LAST_BATCH,
    MD_DEFAULT_TEMPERATURE,
    MIXED_PRECISIONS,
    MODEL_NAMES,
    OPTIMIZER_NAMES,
    PARALLEL_MODES,
    PRESET_NAMES,
    QR_DEFAULT_COLLISIONS,
    QR_OPERATIONS,
    SHUFFLES,
    XLA_MODES,
    parse_widths,
)

EXIT_USAGE = 2
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a shell reports for a process killed by it
EXIT_LOST_TASK = 1  # a --parallel ps run lost a server or worker it cannot do without

class Parser(argparse.ArgumentParser):
    """argparse with one-line errors, and no abbreviated flags (``--ref`` for ``--reference``): the
    benchmarks rebuild their children's command lines by removing whole flags."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message):
        sys.stderr.write(f"{self.prog}: error: {message} (see {self.prog} --help)\n")
        sys.exit(EXIT_USAGE)


def _int_at_least(low: int, wanted: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low:
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {text!r}")
        return value
    return parse


positive_int = _int_at_least(1, "a positive integer")


non_negative_int = _int_at_least(0, "an integer >= 0")


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {text!r}")
    return value


def fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be a number between 0 and 1 (exclusive), got {text!r}")
    return value


def widths(text: str) -> tuple[int, ...]:
    try:
        return parse_widths(text)
    except UserError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def name_list(choices: Sequence[str]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        names = [part.strip() for part in text.split(",") if part.strip()]
        unknown = [n for n in names if n not in choices]
        if not names or unknown:
            raise argparse.ArgumentTypeError(
                f"expected a comma-separated list of {', '.join(choices)}; got {text!r}")
        return names
    return parse


def devices_arg(text: str):
    from tfdlrm.parallel.devices import parse_devices

    try:
        return parse_devices(text)
    except UserError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("--devices: ").removeprefix("--devices ")) from None


def bytes_arg(text: str) -> int:
    from tfdlrm.parallel.devices import parse_bytes

    try:
        return parse_bytes(text)
    except UserError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("--budget: ").removeprefix("--budget ")) from None


def int_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
        if any(v < 0 for v in values):
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 0, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 0, got {text!r}")
    return values


def add_model_args(p: argparse.ArgumentParser, preset: str = "tiny") -> None:
    g = p.add_argument_group("model (a preset, any field overridden by a flag)")
    g.add_argument("--preset", default=preset, choices=PRESET_NAMES, help=f"model shape preset (default: {preset})")
    g.add_argument("--rows", type=positive_int, help="rows of every embedding table (generated data; "
                   "a converted dataset's manifest sets its own)")
    g.add_argument("--embedding-dim", type=positive_int, help="embedding width")
    g.add_argument("--bottom-mlp", type=widths, help="bottom MLP in the paper's notation, input first: 13-512-256-64-16")
    g.add_argument("--top-mlp", type=widths, help="top MLP without its input width, ending in 1: 512-256-1")
    g.add_argument("--interaction", choices=("dot", "cat"), help="feature interaction (default: dot)")
    g.add_argument("--self-interaction", action="store_true", default=None,
                   help="include each vector's dot product with itself")
    g.add_argument("--pooling", choices=("sum", "mean"), help="multi-hot bag pooling (default: sum)")
    g.add_argument("--ids-per-lookup", type=positive_int, help="ids per categorical feature (random data)")
    g.add_argument("--cross-layers", type=non_negative_int, help="DCN cross layers (default: 6)")
    g.add_argument("--deep-mlp", type=widths, help="DCN deep network widths (default: 512-256)")
    g.add_argument("--cross-low-rank", type=positive_int, help="DCN-v2 low-rank projection size")
    g.add_argument("--dense-norm", type=dense_norm_arg, metavar="standardize|none",
                   help="the dense features as every model's first layer sees them: standardize (default: "
                        "by the training split's mean and variance) or none (as transformed, the reference's "
                        "raw log counts); compare also takes MODEL=VALUE,... with --mixed-inputs")


    add_table_args(p)


def add_table_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("memory-saving tables (the reference's --qr-* and --md-* flags; docs/memory.md)")
    g.add_argument("--qr-collisions", type=int, metavar="K",
                   help="quotient-remainder tables: a table of n rows becomes ceil(n/K) + K rows (K >= 2)")
    g.add_argument("--qr-flag", action="store_true", help="QR tables with the reference's default 4 collisions")
    g.add_argument("--qr-operation", choices=QR_OPERATIONS,
                   help="how an id's two rows make its vector (default: mult; concat makes vectors 2 x the dim)")
    g.add_argument("--qr-threshold", type=int, metavar="N", help="QR for tables of more than N rows (default: 200)")
    g.add_argument("--md-temperature", type=float, metavar="A",
                   help="mixed-dimension tables: widths by the alpha-power rule with temperature A in (0, 1]")
    g.add_argument("--md-flag", action="store_true",
                   help="mixed dimensions with the reference's default temperature 0.3")
    g.add_argument("--md-threshold", type=int, metavar="N", help="MD for tables of more than N rows (default: 200)")
    g.add_argument("--md-round-dims", action="store_true", default=None, help="round MD widths to powers of two")
    g.add_argument("--memory-budget", type=bytes_arg, metavar="SIZE",
                   help="the embedding tables' bytes at most (e.g. 2G): QR (--qr-collisions, default 4) on the "
                        "largest tables, as few as fit; train prints the choice")


CONFIG_FLAGS = ("embedding_dim", "bottom_mlp", "top_mlp", "interaction", "self_interaction", "pooling",
                "ids_per_lookup", "cross_layers", "deep_mlp", "cross_low_rank", "dense_norm", "qr_collisions",
                "qr_operation", "qr_threshold", "md_temperature", "md_threshold", "md_round_dims", "memory_budget")


def dense_norm_arg(text: str):
    """``standardize`` or ``none``, or per model ``dlrm=none,dcn=standardize`` (a dict)."""
    if "=" not in text:
        if text not in DENSE_NORMS:
            raise argparse.ArgumentTypeError(f"expected one of {', '.join(DENSE_NORMS)} or MODEL=VALUE,..., "
                                             f"got {text!r}")
        return text
    out = {}
    for part in text.split(","):
        model, _, value = part.strip().partition("=")
        if model not in MODEL_NAMES or value not in DENSE_NORMS or model in out:
            raise argparse.ArgumentTypeError(
                f"expected MODEL=VALUE,... with MODEL one of {', '.join(MODEL_NAMES)} (each once) and VALUE one "
                f"of {', '.join(DENSE_NORMS)}, got {part.strip()!r}")
        out[model] = value
    return out


def config_overrides(args: argparse.Namespace, model: Optional[str] = None) -> dict:
    """The model flags given; ``model``: compare's run of that model, where ``--dense-norm`` may name
    values per model (``dlrm=none,...``; a model it leaves out keeps the default)."""
    out = {name: getattr(args, name) for name in CONFIG_FLAGS if getattr(args, name, None) is not None}
    if getattr(args, "qr_flag", False):
        out.setdefault("qr_collisions", QR_DEFAULT_COLLISIONS)
    if getattr(args, "md_flag", False):
        out.setdefault("md_temperature", MD_DEFAULT_TEMPERATURE)
    if isinstance(out.get("dense_norm"), dict):
        if model is None:
            raise UserError("--dense-norm MODEL=VALUE,... is for compare (with --mixed-inputs); "
                            "give standardize or none")
        per_model = out.pop("dense_norm")
        if model in per_model:
            out["dense_norm"] = per_model[model]
    return out


def add_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", default="synthetic",
                   help="random, synthetic (default), a converted Criteo dataset directory, or a raw Criteo "
                        "TSV file (plain or .gz; converted once into the cache, Kaggle's 7-day split unless "
                        "--eval-data is given)")
    g.add_argument("--eval-data", help="raw Criteo TSV: the held-out file, when raw data comes already split")
    val = g.add_mutually_exclusive_group()
    val.add_argument("--val-data", metavar="FILE",
                     help="raw Criteo TSV with --eval-data: a validation file, which picks the best epoch")
    val.add_argument("--val-fraction", type=fraction, metavar="F",
                     help="raw Criteo TSV with --eval-data: hold out the last F of the training rows for validation")
    g.add_argument("--cache-dir", help="raw Criteo TSV: where conversions are cached (default: $TFDLRM_CACHE, "
                                       "else ~/.cache/tfdlrm)")
    mapping = g.add_mutually_exclusive_group()
    mapping.add_argument("--hash-buckets", type=positive_int,
                         help="raw Criteo TSV: categorical ids by hashing into N buckets per feature")
    mapping.add_argument("--min-frequency", type=positive_int,
                         help="raw Criteo TSV: vocabulary of values seen at least T times (default: 1)")
    g.add_argument("--train-examples", type=positive_int, default=500_000,
                   help="generated data: rows in the training split (default: 500000)")
    g.add_argument("--eval-examples", type=positive_int, default=100_000,
                   help="generated data: rows in the held-out split (default: 100000)")
    g.add_argument("--data-seed", type=non_negative_int, default=0,
                   help="generated data: seed of the data set itself (default: 0)")


def add_training_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=positive_int, default=1, help="passes over the data (default: 1)")
    g.add_argument("--steps-per-epoch", type=positive_int, help="batches per epoch (default: the whole split)")
    g.add_argument("--batch-size", type=positive_int, default=128, help="training batch size (default: 128)")
    g.add_argument("--eval-batch-size", type=positive_int, default=4096, help="evaluation batch size (default: 4096)")
    g.add_argument("--embedding-optimizer", choices=OPTIMIZER_NAMES,
                   help="optimizer for the embedding tables (default: --optimizer)")
    g.add_argument("--embedding-lr", type=positive_float, help="learning rate of the embedding tables (default: --lr)")
    g.add_argument("--warmup-steps", type=non_negative_int, default=0, metavar="W",
                   help="raise every learning rate linearly over the first W steps, as MLPerf's DLRM reference "
                        "(step n uses lr*n/W; default: 0, no warmup; see docs/training.md)")
    g.add_argument("--decay-start-step", type=non_negative_int, metavar="D",
                   help="with --decay-steps: the step where the decay starts (default: the warmup's end)")
    g.add_argument("--decay-steps", type=non_negative_int, default=0, metavar="N",
                   help="decay every learning rate polynomially (power 2) over N steps from --decay-start-step, "
                        "as the reference (ending at lr/N^2; default: 0, no decay)")
    g.add_argument("--early-stop", type=positive_int, metavar="PATIENCE",
                   help="stop once the validation AUC has not improved for PATIENCE epochs (needs a validation "
                        "split)")
    g.add_argument("--shuffle", choices=SHUFFLES, default="once",
                   help="order of the training rows: one per seed, read the same way every epoch (default; the "
                        "reference DLRM's --data-randomize total), a new one each epoch, or as stored")
    g.add_argument("--last-batch", choices=LAST_BATCH, default="fold",
                   help="an epoch's short last batch: fold its rows into the batch before (default), drop it, "
                        "or keep it (see docs/training.md)")
    g.add_argument("--memory-limit", type=bytes_arg, metavar="SIZE",
                   help="refuse to train when the estimated peak memory exceeds SIZE (8G, 512MiB, 16GB; "
                        "default: what the machine has available, MemAvailable; see docs/training.md)")
    g = p.add_argument_group("fault tolerance (see docs/fault-tolerance.md)")
    g.add_argument("--checkpoint-every", type=positive_int, metavar="N",
                   help="also checkpoint every N steps (default: only at each epoch end); rerunning the same "
                        "command resumes from the newest checkpoint")
    g.add_argument("--keep", type=positive_int, metavar="N",
                   help="keep the newest N checkpoints and the best epoch's on validation (default: every epoch's, "
                        "and the newest two step checkpoints since the last epoch end)")
    g.add_argument("--deterministic", action="store_true",
                   help="deterministic ops: the same seed gives bit-identical weights on this machine (slower)")
    g = p.add_argument_group("progress and TensorBoard (see docs/training.md)")
    g.add_argument("--log-every", type=positive_int, default=100, metavar="N",
                   help="TensorBoard scalars (loss, learning rate, examples/s) every N steps into --out's logs/ "
                        "(default: 100); the loss is also checked for NaN every N steps")
    g.add_argument("--quiet", action="store_true",
                   help="no progress (plain lines every 10%% of an epoch, or a line redrawn on a terminal); "
                        "results are still printed")
    g.add_argument("--steps-per-execution", type=positive_int, metavar="N",
                   help="training steps a call of Keras's train function runs, one device (default: about 4096 "
                        "examples' worth, at most 32, dividing --log-every and --checkpoint-every); callbacks "
                        "run once a call")
    add_speed_args(p)
    add_parallel_args(p)


def add_speed_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("speed (see docs/benchmarks.md)")
    g.add_argument("--xla", choices=(AUTO, *XLA_MODES), default="auto",
                   help="one-device training step: sparse = embedding gathers and row updates compiled by XLA, "
                        "MLPs by TensorFlow/oneDNN; full = the whole step compiled; off = Keras's stock step "
                        "(default: auto = sparse on one device, off in parallel modes)")
    g.add_argument("--mixed-precision", choices=(AUTO, *MIXED_PRECISIONS), default="auto",
                   help="bf16 = MLPs compute in bfloat16, weights and embedding tables stay float32; off = float32 "
                        "(default: auto = bf16 where the CPU has native bfloat16, avx512_bf16 or AMX)")
    g.add_argument("--threads", choices=("auto", "tf"), default="auto",
                   help="TensorFlow's thread pools: auto = one thread an op and several ops at once at batch "
                        "sizes up to 256 on one device (a step of small matmuls), TensorFlow's defaults above; "
                        "tf = TensorFlow's defaults always. TF_NUM_INTRAOP_THREADS / TF_NUM_INTEROP_THREADS in "
                        "the environment win")
    g.add_argument("--huge-pages", choices=("auto", "off"), default="auto",
                   help="auto: on Linux with glibc 2.35+ and transparent huge pages in madvise mode, the command "
                        "restarts itself with GLIBC_TUNABLES=glibc.malloc.hugetlb=1, so that the embedding "
                        "tables sit in 2 MiB pages (fewer TLB misses per looked-up row); off: leave memory as is")


def add_parallel_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("devices (see docs/parallelism.md)")
    g.add_argument("--devices", type=devices_arg,
                   help="a device count (GPUs, or the CPU split into logical devices) or a list: GPU:0,GPU:1")
    g.add_argument("--parallel", choices=PARALLEL_MODES,
                   help="hybrid: tables placed per device, MLPs on every device; mirrored: everything "
                        "replicated; ps: parameter servers from TF_CONFIG (default: hybrid with several "
                        "devices, else none)")
    g.add_argument("--budget", type=bytes_arg,
                   help="hybrid: embedding bytes per device (512MiB, 2GB, ...); larger tables are split by rows")


def learning_rates(text: str) -> float | dict:
    """``0.1`` (every optimizer) or ``sgd=0.1,adagrad=0.02`` (one per optimizer)."""
    if "=" not in text:
        return positive_float(text)
    rates = {}
    for part in text.split(","):
        name, _, value = part.partition("=")
        name = name.strip()
        if name not in OPTIMIZER_NAMES:
            raise argparse.ArgumentTypeError(
                f"expected NUMBER or OPTIMIZER=NUMBER,... with optimizers {', '.join(OPTIMIZER_NAMES)}; got {text!r}")
        rates[name] = positive_float(value)
    return rates
