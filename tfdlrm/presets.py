"""The config layer: model configurations, the named presets, and every choice list.

MLP shapes use the paper's (and the reference's ``--arch-mlp-*``) notation:
``bottom_mlp`` starts with the number of dense features (``13-512-256-64-16``);
``top_mlp`` leaves out its input width, which the interaction determines
(``512-256-1``).  This module does not import TensorFlow.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from tfdlrm.errors import UserError

CRITEO_DENSE = 13
CRITEO_TABLES = 26

# -- every choice list, defined once (the command line's choices and the checks use these) --
MODEL_NAMES = ("dlrm", "dcn", "dcn-v2")
OPTIMIZER_NAMES = ("sgd", "adagrad", "adam")
INTERACTIONS = ("dot", "cat")
POOLINGS = ("sum", "mean")
CROSS_KINDS = ("v1", "v2")
PARALLEL_MODES = ("none", "hybrid", "mirrored", "ps")
AUTO = "auto"  # --xla and --mixed-precision also take auto: chosen for the machine and the parallel mode
XLA_MODES = ("sparse", "full", "off")
MIXED_PRECISIONS = ("bf16", "off")
FORMATS = ("kaggle", "terabyte")  # raw Criteo layouts that convert reads
BAD_ROW_POLICIES = ("error", "skip")
GENERATED = ("random", "synthetic")  # --data that needs no files
SHUFFLES = ("epoch", "once", "none")  # a new order each epoch, one order per seed, or file order
LAST_BATCH = ("keep", "drop", "fold")  # an epoch's short last batch (pipelines/batching.py)
# The dense features as every model's first layer sees them: standardised by the training split's
# mean and variance (the default, all models), or the data's values as they are (the reference's
# raw log counts); runs saved before the choice existed ran DLRM on raw values.
DENSE_NORMS = ("standardize", "none")
# How a table's two parts make an id's vector under QR embeddings (tfdlrm/tables.py): the reference's names.
QR_OPERATIONS = ("mult", "add", "concat")
# The config fields that shape the tables (tfdlrm/tables.py), and the reference's defaults behind its
# --qr-flag and --md-flag (also the collisions a --memory-budget uses when --qr-collisions is not given).
TABLE_OPTIONS = ("qr_collisions", "qr_operation", "qr_threshold", "md_temperature", "md_threshold",
                 "md_round_dims", "memory_budget")
QR_DEFAULT_COLLISIONS = 4
MD_DEFAULT_TEMPERATURE = 0.3


def qr_vector_dim(dim: int, qr_collisions: Optional[int], qr_operation: str,
                  memory_budget: Optional[int] = None) -> int:
    """Every feature's vector width: ``dim``, or twice it where QR tables may concatenate their parts
    (QR on, or a budget that may turn it on): then every table is that wide, as the reference asks."""
    return 2 * dim if (qr_collisions or memory_budget) and qr_operation == "concat" else dim



# -- names of the categorical features and their tables ----------------------------------------
def default_feature_names(count: int) -> list[str]:
    """Criteo's column names for categorical features: C1, C2, ..."""
    return [f"C{i + 1}" for i in range(count)]


def table_variable_name(feature: str) -> str:
    """The variable (and checkpoint) name of a feature's table: ``table_C1``.

    Placement (``tfdlrm.parallel``) finds tables by this name; it never depends on
    the device a table lives on, so checkpoints move between device counts.
    """
    return f"table_{feature}"


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a DLRM or DCN, saved beside its checkpoints."""

    preset: str
    embedding_dim: int
    bottom_mlp: tuple[int, ...]
    top_mlp: tuple[int, ...]
    table_rows: tuple[int, ...]
    ids_per_lookup: int = 1
    interaction: str = "dot"
    self_interaction: bool = False
    pooling: str = "sum"
    # DCN baseline (baselines/dcn.py)
    cross_layers: int = 6
    deep_mlp: tuple[int, ...] = (512, 256)
    cross_low_rank: Optional[int] = None
    # every model: the dense features standardised first (layers/standardize.py), or as they are
    dense_norm: str = "standardize"
    # memory-saving tables (tfdlrm/tables.py), as the reference's --qr-* and --md-* flags: quotient-remainder
    # tables for tables of more than qr_threshold rows (on when qr_collisions is set), mixed dimensions for
    # tables of more than md_threshold rows (on when md_temperature is set); QR first where both apply
    qr_collisions: Optional[int] = None
    qr_operation: str = "mult"
    qr_threshold: int = 200
    md_temperature: Optional[float] = None
    md_threshold: int = 200
    md_round_dims: bool = False
    # the tables' bytes at most: QR (qr_collisions, else 4) on the fewest, largest tables that fit it
    memory_budget: Optional[int] = None

    @property
    def vector_dim(self) -> int:
        """The width of every feature's embedding vector (:func:`qr_vector_dim`)."""
        return qr_vector_dim(self.embedding_dim, self.qr_collisions, self.qr_operation, self.memory_budget)

    @property
    def num_dense(self) -> int:
        return self.bottom_mlp[0]

    @property
    def num_tables(self) -> int:
        return len(self.table_rows)

    def replace(self, **changes: Any) -> "ModelConfig":
        """A copy with some fields changed, validated."""
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise UserError(f"unknown config field(s): {', '.join(unknown)}")
        for name in ("bottom_mlp", "top_mlp", "table_rows", "deep_mlp"):
            if name in changes and changes[name] is not None:
                changes[name] = tuple(int(v) for v in changes[name])
        return dataclasses.replace(self, **changes).validated()

    def with_rows(self, rows: int | Sequence[int]) -> "ModelConfig":
        """Every table ``rows`` rows (an int), or one count per table (a sequence)."""
        if isinstance(rows, int):
            rows = (rows,) * self.num_tables
        return self.replace(table_rows=tuple(rows))

    def validated(self) -> "ModelConfig":
        problems = []
        if self.embedding_dim <= 0:
            problems.append(f"embedding_dim must be positive, got {self.embedding_dim}")
        for name in ("bottom_mlp", "top_mlp", "deep_mlp"):
            widths = getattr(self, name)
            if not widths or any(w <= 0 for w in widths):
                problems.append(f"{name} must be positive widths, got {_dashed(widths)}")
        if len(self.bottom_mlp) < 2:
            problems.append(
                f"bottom_mlp needs the dense feature count and at least one layer, got {_dashed(self.bottom_mlp)}"
            )
        if self.top_mlp and self.top_mlp[-1] != 1:
            problems.append(f"top_mlp must end in 1 (one logit), got {_dashed(self.top_mlp)}")
        if self.interaction not in INTERACTIONS:
            problems.append(f"interaction must be one of {', '.join(INTERACTIONS)}, got {self.interaction!r}")
        elif self.interaction == "dot" and self.bottom_mlp and self.bottom_mlp[-1] != self.vector_dim:
            if self.vector_dim != self.embedding_dim:
                problems.append(
                    f"--qr-operation concat makes every embedding vector 2 x the embedding dim: the dot interaction "
                    f"needs the bottom MLP to end in {self.vector_dim}, got {_dashed(self.bottom_mlp)}")
            else:
                problems.append(
                    f"dot interaction needs the bottom MLP to end in the embedding dim {self.embedding_dim}, "
                    f"got {_dashed(self.bottom_mlp)}"
                )
        if self.pooling not in POOLINGS:
            problems.append(f"pooling must be one of {', '.join(POOLINGS)}, got {self.pooling!r}")
        if not self.table_rows:
            problems.append("there must be at least one embedding table")
        elif any(r <= 0 for r in self.table_rows):
            problems.append(f"every table needs at least one row, got {min(self.table_rows)}")
        if self.ids_per_lookup <= 0:
            problems.append(f"ids_per_lookup must be positive, got {self.ids_per_lookup}")
        if self.cross_layers < 0:
            problems.append(f"cross_layers must be >= 0, got {self.cross_layers}")
        if self.cross_low_rank is not None and self.cross_low_rank <= 0:
            problems.append(f"cross_low_rank must be positive, got {self.cross_low_rank}")
        if self.dense_norm not in DENSE_NORMS:
            problems.append(f"dense_norm must be one of {', '.join(DENSE_NORMS)}, got {self.dense_norm!r}")
        problems += self._table_problems()
        if problems:
            raise UserError(f"invalid config for preset {self.preset!r}: " + "; ".join(problems))
        return self

    def embedding_kind(self) -> str:
        """``full``, or the QR and MD settings that shape the tables (tfdlrm/tables.py), as one phrase."""
        kinds = []
        if self.qr_collisions and not self.memory_budget:
            kinds.append(f"qr {self.qr_operation} {self.qr_collisions} collisions over {self.qr_threshold} rows")
        if self.md_temperature:
            kinds.append(f"md temperature {self.md_temperature} over {self.md_threshold} rows"
                         + (" rounded" if self.md_round_dims else ""))
        if self.memory_budget:
            kinds.append(f"qr {self.qr_operation} {self.qr_collisions or QR_DEFAULT_COLLISIONS} collisions over "
                         f"{self.qr_threshold} rows "
                         f"within a budget of {self.memory_budget:,} bytes")
        return " + ".join(kinds) or "full"

    def _table_problems(self) -> list[str]:
        problems = []
        if self.qr_collisions is not None and (isinstance(self.qr_collisions, bool) or self.qr_collisions < 2):
            problems.append(f"--qr-collisions must be at least 2 (ids per quotient row), got {self.qr_collisions}")
        if self.qr_operation not in QR_OPERATIONS:
            problems.append(f"--qr-operation must be one of {', '.join(QR_OPERATIONS)}, got {self.qr_operation!r}")
        for name in ("qr_threshold", "md_threshold"):
            if getattr(self, name) < 0:
                problems.append(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.memory_budget is not None and self.memory_budget <= 0:
            problems.append(f"--memory-budget must be a positive number of bytes, got {self.memory_budget}")
        if self.md_temperature is not None and not 0 < self.md_temperature <= 1:
            problems.append(f"--md-temperature must be in (0, 1], got {self.md_temperature}")
        return problems

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: dict, model: Optional[str] = None) -> "ModelConfig":
        """The config saved as ``data`` (run.json, a SavedModel's or a checkpoint's), for ``model``:
        a DLRM saved before ``dense_norm`` existed took its dense features as they were."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise UserError(f"config has unknown field(s): {', '.join(unknown)}")
        missing = sorted(f.name for f in dataclasses.fields(cls)
                         if f.name not in data and f.default is dataclasses.MISSING)
        if missing:
            raise UserError(f"config lacks field(s): {', '.join(missing)}")
        values = dict(data)
        if "dense_norm" not in values and model == "dlrm":
            values["dense_norm"] = "none"
        for name in ("bottom_mlp", "top_mlp", "table_rows", "deep_mlp"):
            if name in values:
                values[name] = tuple(int(v) for v in values[name])
        return cls(**values).validated()

    def differences(self, other: "ModelConfig") -> list[str]:
        """Human-readable ``field: mine != theirs`` lines (for refusing mismatched checkpoints)."""
        out = []
        if self.embedding_kind() != other.embedding_kind():
            out.append(f"embedding tables: {self.embedding_kind()} != {other.embedding_kind()}")
        for f in dataclasses.fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            if f.name in TABLE_OPTIONS:  # said once, as the kind of tables, above
                continue
            if a != b:
                if f.name == "table_rows" and len(a) == len(b):
                    diff = [i for i, (x, y) in enumerate(zip(a, b)) if x != y]
                    out.append(f"table_rows differ for {len(diff)} table(s), first table {diff[0]}: "
                               f"{a[diff[0]]} != {b[diff[0]]}")
                else:
                    out.append(f"{f.name}: {_short(a)} != {_short(b)}")
        return out


def _dashed(widths: Sequence[int]) -> str:
    return "-".join(str(w) for w in widths) if widths else "(empty)"


def _short(value: Any) -> str:
    if isinstance(value, tuple) and len(value) > 6:
        return f"({len(value)} values, {value[0]}, {value[1]}, ...)"
    return str(value)


def parse_widths(text: str, flag: str = "widths") -> tuple[int, ...]:
    """Parse ``13-512-256`` (the paper's notation) into a tuple of ints."""
    try:
        widths = tuple(int(part) for part in text.strip().split("-"))
    except ValueError:
        raise UserError(f"{flag} must be dash-separated positive ints such as 512-256-1, got {text!r}") from None
    if not widths or any(w <= 0 for w in widths):
        raise UserError(f"{flag} must be dash-separated positive ints such as 512-256-1, got {text!r}")
    return widths


_PRESETS: dict[str, dict] = {
    # Small enough for unit tests and the demo's CPU budget.
    "tiny": dict(embedding_dim=8, bottom_mlp=(CRITEO_DENSE, 32, 8), top_mlp=(32, 1),
                 table_rows=(1000,) * CRITEO_TABLES, deep_mlp=(32, 16), cross_layers=3),
    # The paper's Criteo Kaggle model.
    "kaggle": dict(embedding_dim=16, bottom_mlp=(CRITEO_DENSE, 512, 256, 64, 16), top_mlp=(512, 256, 1),
                   table_rows=(1_000_000,) * CRITEO_TABLES),
    # The paper's Criteo Terabyte model.
    "terabyte": dict(embedding_dim=64, bottom_mlp=(CRITEO_DENSE, 512, 256, 64), top_mlp=(512, 512, 256, 1),
                     table_rows=(1_000_000,) * CRITEO_TABLES),
    # MLPerf's DLRM (Terabyte data).
    "mlperf": dict(embedding_dim=128, bottom_mlp=(CRITEO_DENSE, 512, 256, 128),
                   top_mlp=(1024, 1024, 512, 256, 1), table_rows=(1_000_000,) * CRITEO_TABLES),
    # The paper's single-socket benchmark: 8 tables x 1M rows, 100 ids per lookup.
    "paper-benchmark": dict(embedding_dim=64, bottom_mlp=(512, 512, 64), top_mlp=(1024, 1024, 1024, 1),
                            table_rows=(1_000_000,) * 8, ids_per_lookup=100),
}

PRESET_NAMES = tuple(_PRESETS)


def get_preset(name: str, **overrides: Any) -> ModelConfig:
    """The named preset, with any fields overridden (``rows=N`` sets every table)."""
    if name not in _PRESETS:
        raise UserError(f"unknown preset {name!r}; choose one of: {', '.join(PRESET_NAMES)}")
    config = ModelConfig(preset=name, **_PRESETS[name]).validated()
    rows = overrides.pop("rows", None)
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if overrides:
        config = config.replace(**overrides)
    if rows is not None:
        config = config.with_rows(rows)
    return config
