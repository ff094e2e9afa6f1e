"""The hybrid placement plan: which device holds which embedding table (or rows of it).

Tables go to devices greedily by bytes, largest first; a table over the per-device budget
is split by rows.  No TensorFlow here.  See docs/parallelism.md.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from tfdlrm.errors import UserError
from tfdlrm.parallel.devices import device_names
from tfdlrm.presets import ModelConfig, table_variable_name
from tfdlrm.sizes import dense_parameter_count
from tfdlrm.tables import table_specs

BYTES_PER_VALUE = 4  # float32 tables


@dataclass(frozen=True)
class Shard:
    """Rows ``[start, stop)`` of a table, on ``device``."""

    device: str
    start: int
    stop: int

    @property
    def rows(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class TablePlacement:
    """Where one table variable lives: a full table, a QR table's quotient or remainder part, an MD
    table's rows or its projection (tfdlrm/tables.py), each placed like any table."""

    name: str  # the feature's name for a full table (C1 ...), else the variable's without "table_"
    rows: int
    dim: int  # the variable's width
    shards: tuple[Shard, ...]
    variable: str = ""  # the model's variable name (default: table_<name>)
    feature: str = ""  # the feature it serves (default: name)

    @property
    def variable_name(self) -> str:
        return self.variable or table_variable_name(self.name)

    @property
    def feature_name(self) -> str:
        return self.feature or self.name

    @property
    def bytes(self) -> int:
        return self.rows * self.dim * BYTES_PER_VALUE

    @property
    def home(self) -> str:
        """Where the table's pooled vectors are assembled: its first shard's device."""
        return self.shards[0].device

    @property
    def split(self) -> bool:
        return len(self.shards) > 1


@dataclass
class PlacementPlan:
    devices: list[str]
    tables: list[TablePlacement]
    budget: Optional[int] = None
    dense_bytes: int = 0
    dense_device: str = ""

    def bytes_per_device(self) -> dict[str, int]:
        """Embedding bytes on each device (optimizer slots come on top, beside their table)."""
        out = {d: 0 for d in self.devices}
        for t in self.tables:
            for s in t.shards:
                out[s.device] += s.rows * t.dim * BYTES_PER_VALUE
        return out

    def tables_per_device(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {d: [] for d in self.devices}
        for t in self.tables:
            for s in t.shards:
                out[s.device].append(t.name)
        return out

    def feature_homes(self) -> list[str]:
        """Per feature (in order), where its vectors are assembled: its first variable's home."""
        homes: dict[str, str] = {}
        for t in self.tables:
            homes.setdefault(t.feature_name, t.home)
        return list(homes.values())

    def table(self, name: str) -> TablePlacement:
        for t in self.tables:
            if t.name == name:
                return t
        raise KeyError(name)

    def to_dict(self) -> dict:
        return {
            "devices": list(self.devices),
            "budget": self.budget,
            "tables": [{"table": t.name, "rows": t.rows, "bytes": t.bytes,
                        "shards": [{"device": s.device, "start": s.start, "stop": s.stop} for s in t.shards]}
                       for t in self.tables],
            "bytes_per_device": self.bytes_per_device(),
            "dense_bytes": self.dense_bytes,
            "dense_device": self.dense_device,
        }

    def format(self) -> str:
        lines = [f"{'table':8} {'rows':>12} {'bytes':>15}  device"]
        for t in self.tables:
            if not t.split:
                where = t.home
            else:
                where = ", ".join(f"{s.device} rows {s.start}-{s.stop - 1}" for s in t.shards)
            lines.append(f"{t.name:8} {t.rows:>12,} {t.bytes:>15,}  {where}"
                         + (f"  ({t.rows:,} x {t.dim})" if t.name != t.feature_name else ""))
        lines.append("")
        lines.append(f"{'device':24} {'tables':>6} {'bytes':>15}")
        per_table = self.tables_per_device()
        for device, b in self.bytes_per_device().items():
            lines.append(f"{device:24} {len(per_table[device]):>6} {b:>15,}")
        total = sum(t.bytes for t in self.tables)
        budget = f"; budget {self.budget:,} bytes per device" if self.budget else ""
        lines.append(f"embeddings: {total:,} bytes in {len(self.tables)} tables on {len(self.devices)} "
                     f"device(s){budget}")
        if self.dense_bytes:
            lines.append(f"dense layers: {self.dense_bytes:,} bytes, kept on {self.dense_device} and run by "
                         f"every device on its slice of the batch")
        lines.append("optimizer slots (Adagrad: one per table value; Adam: two) live beside their table.")
        return "\n".join(lines)


def _div_rows(rows: int, parts: int) -> list[int]:
    """Row counts of ``parts`` contiguous shards, the first ``rows % parts`` one larger
    (TensorFlow's "div" partitioning, as ParameterServerStrategy shards)."""
    base, extra = divmod(rows, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def plan_placement(table_rows: Sequence[int], dim, devices: Sequence[str], budget: Optional[int] = None,
                   feature_names: Optional[Sequence[str]] = None, dense_bytes: int = 0,
                   variables: Optional[Sequence[str]] = None,
                   features: Optional[Sequence[str]] = None) -> PlacementPlan:
    """Assign every table to a device, balancing bytes greedily, largest table first.

    Each table goes whole to the device with the fewest bytes so far (ties: the first
    device).  A table that does not fit there within ``budget`` bytes (larger than
    the budget, or than what is left of it) is split by rows into equal parts over
    the fewest devices that can hold them, the largest part on the emptiest device.
    A table that cannot be placed at all is a :class:`UserError`.
    """
    from tfdlrm.presets import default_feature_names

    devices = list(devices)
    if not devices:
        raise UserError("a placement plan needs at least one device")
    if budget is not None and budget <= 0:
        raise UserError(f"--budget must be a positive number of bytes, got {budget}")
    names = list(feature_names) if feature_names is not None else default_feature_names(len(table_rows))
    dims = [int(d) for d in dim] if isinstance(dim, (list, tuple)) else [int(dim)] * len(table_rows)
    load = [0] * len(devices)
    shards: dict[int, tuple[Shard, ...]] = {}

    order = sorted(range(len(table_rows)), key=lambda t: (-table_rows[t] * dims[t], t))
    for t in order:
        rows = int(table_rows[t])
        row_bytes = dims[t] * BYTES_PER_VALUE

        def fits(d: int, rows: int) -> bool:
            return budget is None or load[d] + rows * row_bytes <= budget

        by_load = sorted(range(len(devices)), key=lambda d: (load[d], d))
        if fits(by_load[0], rows):
            shards[t] = (Shard(devices[by_load[0]], 0, rows),)
            load[by_load[0]] += rows * row_bytes
            continue
        for parts in range(2, min(len(devices), rows) + 1):
            sizes = _div_rows(rows, parts)
            chosen = by_load[:parts]
            if all(fits(d, n) for d, n in zip(chosen, sizes)):
                start, placed = 0, []
                for d, n in zip(chosen, sizes):
                    placed.append(Shard(devices[d], start, start + n))
                    load[d] += n * row_bytes
                    start += n
                shards[t] = tuple(placed)
                break
        else:
            free = sum(max(budget - x, 0) for x in load) if budget is not None else 0
            raise UserError(
                f"cannot place table {names[t]} ({rows:,} rows, {rows * row_bytes:,} bytes) on "
                f"{len(devices)} device(s) with a budget of {budget:,} bytes each ({free:,} bytes left; "
                f"{sum(r * d for r, d in zip(table_rows, dims)) * BYTES_PER_VALUE:,} needed in all, "
                f"{budget * len(devices):,} available); raise --budget or use more --devices")
    tables = [TablePlacement(names[t], int(table_rows[t]), dims[t], shards[t],
                             variables[t] if variables else "", features[t] if features else "")
              for t in range(len(table_rows))]
    return PlacementPlan(devices, tables, budget, int(dense_bytes), devices[0])


def plan_for(config: ModelConfig, devices, budget: Optional[int] = None, model: str = "dlrm") -> PlacementPlan:
    """The placement plan of a model config over ``devices`` (a count or a list)."""
    names = devices if isinstance(devices, list) and all(str(d).startswith("/device:") for d in devices) \
        else device_names(devices)
    # every table variable placed like a table: a full table, a QR table's quotient and remainder, an MD
    # table's rows and projection
    parts = [(spec.feature, part) for spec in table_specs(config) for part in spec.parts]
    prefix = table_variable_name("")
    return plan_placement([p.rows for _, p in parts], [p.width for _, p in parts], names, budget,
                          feature_names=[p.variable[len(prefix):] if p.variable.startswith(prefix) else p.variable
                                         for _, p in parts],
                          dense_bytes=dense_parameter_count(config, model) * BYTES_PER_VALUE,
                          variables=[p.variable for _, p in parts], features=[f for f, _ in parts])
