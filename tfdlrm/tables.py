"""Each embedding table's layout: full, quotient-remainder (QR) or mixed dimensions (MD).  No TensorFlow.

One design for every table, read by the embedding layer (which variables it creates and how an id's
vector is made of them), the parameter counts, the memory estimate and the placement plan (which
places every part like a table):

* ``full``: ``rows x dim`` rows, an id's vector is its row (the reference's ``EmbeddingBag``).
* ``qr`` (Shi et al. 2020, the reference's ``--qr-flag``): a quotient table of ``ceil(rows / K)`` rows
  and a remainder table of ``min(K, rows)`` rows; id ``i``'s vector combines quotient row ``i // K`` and
  remainder row ``i % K`` by ``mult`` (elementwise product), ``add`` or ``concat``.  Only tables of more
  than ``qr_threshold`` rows; no two ids share both rows, so every id keeps a vector of its own.
* ``md`` (Ginart et al. 2021, the reference's ``--md-flag``): ``rows x d`` rows with ``d`` from the
  alpha-power rule (the reference's ``md_solver``: the smallest table keeps the embedding dim, a table
  ``n`` times larger gets ``n ** -alpha`` of it) and a learned ``d x dim`` projection back to the common
  width.  Only tables of more than ``md_threshold`` rows whose ``d`` is below the embedding dim (the
  rest are full tables, where the reference crashed).

Where both are on, QR takes the tables it applies to first, as in the reference.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

from tfdlrm.errors import UserError
from tfdlrm.presets import (
    QR_DEFAULT_COLLISIONS,
    TABLE_OPTIONS,
    ModelConfig,
    default_feature_names,
    qr_vector_dim,
    table_variable_name,
)

FLOAT_BYTES = 4


@dataclass(frozen=True)
class TablePart:
    """One variable of a table: its name (what checkpoints and placement plans go by), shape, and
    whether it is a row table (gathered by id, updated row by row) or a dense projection."""

    variable: str
    rows: int
    width: int
    rowwise: bool = True

    @property
    def parameters(self) -> int:
        return self.rows * self.width

    @property
    def bytes(self) -> int:
        return self.parameters * FLOAT_BYTES


@dataclass(frozen=True)
class TableSpec:
    """One categorical feature's table: ``rows`` ids, each given a vector of width ``dim``."""

    feature: str
    rows: int
    kind: str
    dim: int  # the vector the interaction sees
    width: int  # the width of the stored rows (md: its own dim; qr: each part's)
    collisions: int = 0  # qr
    operation: str = ""  # qr

    @property
    def parts(self) -> tuple[TablePart, ...]:
        name = table_variable_name(self.feature)
        if self.kind == "qr":
            return (TablePart(f"{name}_quotient", math.ceil(self.rows / self.collisions), self.width),
                    TablePart(f"{name}_remainder", min(self.collisions, self.rows), self.width))
        if self.kind == "md":
            return (TablePart(name, self.rows, self.width),
                    TablePart(f"projection_{self.feature}", self.width, self.dim, rowwise=False))
        return (TablePart(name, self.rows, self.dim),)

    @property
    def parameters(self) -> int:
        return sum(p.parameters for p in self.parts)

    @property
    def bytes(self) -> int:
        return sum(p.bytes for p in self.parts)

    def describe(self, name: bool = True) -> str:
        """``C3: qr mult 4 collisions, 250,000 x 16 + 4 x 16 (16,000,256 bytes)``."""
        shapes = " + ".join(f"{p.rows:,} x {p.width}" for p in self.parts)
        kind = {"full": "full", "md": f"md dim {self.width}",
                "qr": f"qr {self.operation} {self.collisions} collisions"}[self.kind]
        return (f"{self.feature}: " if name else "") + f"{kind}, {shapes} ({self.bytes:,} bytes)"


def md_dims(rows: Sequence[int], temperature: float, dim: int, round_dims: bool = False) -> list[int]:
    """Each table's mixed dimension by the alpha-power rule of the reference's ``md_solver`` (``d0`` =
    ``dim``, one query per row): ``round(dim * (n_min / n) ** temperature)``, at least 1, rounded to a
    power of two with ``round_dims``; never above ``dim`` (where the reference's projection would raise)."""
    smallest = min(rows)
    out = []
    for n in rows:
        d = max(1, round(dim * (smallest / n) ** temperature))
        if round_dims:
            d = 2 ** round(math.log2(d))
        out.append(min(d, dim))
    return out


def table_specs(config: ModelConfig, feature_names: Optional[Sequence[str]] = None) -> list[TableSpec]:
    """Every table's :class:`TableSpec` for ``config`` (one per categorical feature, in order)."""
    return specs_for(config.table_rows, config.embedding_dim, feature_names, **table_options(config))


def table_options(config: ModelConfig) -> dict:
    """The config's QR and MD fields, as :func:`specs_for` and ``EmbeddingTables`` take them."""
    return {name: getattr(config, name) for name in TABLE_OPTIONS}


def specs_for(rows: Sequence[int], dim: int, feature_names: Optional[Sequence[str]] = None,
              qr_collisions: Optional[int] = None, qr_operation: str = "mult", qr_threshold: int = 200,
              md_temperature: Optional[float] = None, md_threshold: int = 200,
              md_round_dims: bool = False, memory_budget: Optional[int] = None) -> list[TableSpec]:
    """The tables' specs for ``rows`` ids each, embedding dim ``dim`` and the QR/MD options (see the
    module docstring; the values are checked by ``ModelConfig``).  With ``memory_budget`` (bytes of all
    tables), QR with ``qr_collisions`` (default 4) goes to the largest tables, as few as fit the budget
    (none if full tables fit; never to tables of ``qr_threshold`` rows or fewer); a budget that even QR
    on every such table exceeds is a :class:`UserError`."""
    rows = [int(r) for r in rows]
    names = list(feature_names) if feature_names is not None else default_feature_names(len(rows))
    vector = qr_vector_dim(dim, qr_collisions, qr_operation, memory_budget)
    if memory_budget:
        return _within_budget(rows, dim, vector, names, memory_budget, qr_collisions or QR_DEFAULT_COLLISIONS,
                              qr_operation, qr_threshold, md_temperature, md_threshold, md_round_dims)
    return _layout(rows, dim, vector, names, qr_collisions, qr_operation, qr_threshold, md_temperature,
                   md_threshold, md_round_dims)


def _layout(rows, dim, vector, names, qr_collisions, qr_operation, qr_threshold, md_temperature, md_threshold,
            md_round_dims) -> list[TableSpec]:
    md = md_dims(rows, md_temperature, dim, md_round_dims) if md_temperature else [dim] * len(rows)
    specs = []
    for name, n, d in zip(names, rows, md):
        if qr_collisions and n > qr_threshold:
            specs.append(TableSpec(name, n, "qr", vector, dim, int(qr_collisions), qr_operation))
        elif md_temperature and n > md_threshold and d < dim:
            specs.append(TableSpec(name, n, "md", vector, d))
        else:
            specs.append(TableSpec(name, n, "full", vector, vector))
    return specs


def _within_budget(rows, dim, vector, names, budget: int, collisions: int, operation: str, floor: int,
                   md_temperature, md_threshold, md_round_dims) -> list[TableSpec]:
    def specs(threshold: Optional[int]) -> list[TableSpec]:  # every vector ``vector`` wide, whatever the choice
        return _layout(rows, dim, vector, names, collisions if threshold is not None else None, operation,
                       threshold or 0, md_temperature, md_threshold, md_round_dims)

    # thresholds from "no QR" down to the floor: each step puts QR on the next largest table(s)
    candidates = [None] + sorted({r for r in rows if r > floor}, reverse=True)[1:] + [floor]
    for threshold in candidates:
        chosen = specs(threshold)
        if sum(s.bytes for s in chosen) <= budget:
            return chosen
    least = sum(s.bytes for s in specs(floor))
    raise UserError(f"--memory-budget {budget:,} bytes cannot hold the tables: QR with {collisions} collisions on "
                    f"every table of more than {floor} rows still takes {least:,} bytes; raise the budget, "
                    f"--qr-collisions or lower --qr-threshold")


def embedding_parameter_count(config: ModelConfig) -> int:
    """Every table's parameters (rows and projections)."""
    return sum(spec.parameters for spec in table_specs(config))


def table_summary(config: ModelConfig, feature_names: Optional[Sequence[str]] = None) -> list[str]:
    """Each table's choice, a line per kind and shape (tables alike named together), then the total against
    full tables; nothing when every table is full."""
    specs = table_specs(config, feature_names)
    if all(s.kind == "full" for s in specs):
        return []
    full_bytes = sum(s.rows * s.dim for s in specs) * FLOAT_BYTES
    total = sum(s.bytes for s in specs)
    alike: dict[str, list[str]] = {}  # tables of one description, named together
    for s in specs:
        alike.setdefault(s.describe(name=False), []).append(s.feature)
    lines = [f"{', '.join(features)}: {text}" + (f" each, {len(features)} tables" if len(features) > 1 else "")
             for text, features in alike.items()]
    lines.append(f"tables: {total:,} bytes, {full_bytes / max(total, 1):.2f}x smaller than full tables "
                 f"({full_bytes:,} bytes)" + (f"; --memory-budget {config.memory_budget:,} bytes: QR on the "
                                              f"{sum(s.kind == 'qr' for s in specs)} largest table(s)"
                                              if config.memory_budget else ""))
    return lines


def tables_record(config: ModelConfig, feature_names: Optional[Sequence[str]] = None) -> dict:
    """What run.json keeps of the tables: bytes in all and each table's kind and variables."""
    specs = table_specs(config, feature_names)
    return {"bytes": sum(s.bytes for s in specs), "parameters": sum(s.parameters for s in specs),
            "tables": [{"feature": s.feature, "kind": s.kind, "rows": s.rows, "bytes": s.bytes,
                        **({"collisions": s.collisions, "operation": s.operation} if s.kind == "qr" else {}),
                        "variables": [[p.variable, p.rows, p.width] for p in s.parts]} for s in specs]}
