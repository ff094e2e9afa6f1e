"""Device and size arguments (``--devices``, ``--budget``, ``--parallel``): parsed without TensorFlow."""
from __future__ import annotations

import os
import re
from typing import Optional

from tfdlrm.errors import UserError
from tfdlrm.presets import PARALLEL_MODES

# Set by ``tfdlrm cluster`` (tfdlrm/parallel/cluster.py) for the processes it starts: "private" (a
# network namespace of their own) or "open" (--open-ports).
NETWORK_ENV = "TFDLRM_CLUSTER_NETWORK"
# Set by ``tfdlrm cluster --memory-per-process``: the cap of every process it starts, in bytes.
MEMORY_ENV = "TFDLRM_CLUSTER_MEMORY"

_DEVICE = re.compile(r"^(?:/?(?:job:[^/]+/)?(?:replica:\d+/)?(?:task:\d+/)?(?:device:)?)?(cpu|gpu):(\d+)$", re.I)


def parse_devices(text) -> "int | list[str]":
    """``--devices``: a count (``4``) or a comma-separated list (``GPU:0,GPU:1`` or
    ``/device:CPU:0,/device:CPU:2``).  Pure parsing: no TensorFlow."""
    if isinstance(text, int) and not isinstance(text, bool):
        if text <= 0:
            raise UserError(f"--devices must be a positive device count or a list of devices, got {text}")
        return text
    if isinstance(text, (list, tuple)):
        names = [str(t) for t in text]
    else:
        text = str(text).strip()
        if re.fullmatch(r"[+-]?\d+", text):
            return parse_devices(int(text))
        names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise UserError(f"--devices must be a positive device count or a list of devices, got {text!r}")
    out = []
    for name in names:
        match = _DEVICE.match(name)
        if not match:
            raise UserError(f"--devices: cannot read device {name!r}; write a count such as 4, "
                            f"or devices such as GPU:0,GPU:1 or CPU:0,CPU:1")
        out.append(f"/device:{match.group(1).upper()}:{int(match.group(2))}")
    if len(set(out)) != len(out):
        raise UserError(f"--devices lists a device twice: {', '.join(names)}")
    if len({d.split(':')[1] for d in out}) > 1:
        raise UserError(f"--devices mixes device types: {', '.join(names)}; use GPUs or CPUs")
    return out


def accelerator_type() -> str:
    """``GPU`` when the machine has GPUs, else ``CPU``: the kind of device a count means."""
    import tensorflow as tf

    return "GPU" if tf.config.list_physical_devices("GPU") else "CPU"


def device_names(devices) -> list[str]:
    """The device strings a ``--devices`` value means (no TensorFlow runtime start)."""
    devices = parse_devices(devices)
    if isinstance(devices, list):
        return devices
    kind = accelerator_type()
    return [f"/device:{kind}:{k}" for k in range(devices)]


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.I)


def parse_bytes(text, flag: str = "--budget") -> int:
    """``--budget`` (or ``flag``): bytes, or with a unit: ``512MiB``, ``2GiB`` (1024-based), ``500MB`` (1000-based)."""
    if isinstance(text, int):
        value = text
    else:
        match = _SIZE.match(str(text))
        if not match:
            raise UserError(f"{flag}: expected bytes such as 1000000, 512MiB or 2GB, got {text!r}")
        number, unit = float(match.group(1)), (match.group(2) or "").lower()
        scale = {"": 1, "b": 1, "k": 1024, "kb": 1000, "kib": 1024, "m": 1024 ** 2, "mb": 1000 ** 2,
                 "mib": 1024 ** 2, "g": 1024 ** 3, "gb": 1000 ** 3, "gib": 1024 ** 3, "t": 1024 ** 4,
                 "tb": 1000 ** 4, "tib": 1024 ** 4}.get(unit)
        if scale is None:
            raise UserError(f"{flag}: unknown unit in {text!r}; use B, KiB, MiB, GiB (or KB, MB, GB)")
        value = int(number * scale)
    if value <= 0:
        raise UserError(f"{flag} must be a positive number of bytes, got {text!r}")
    return value


def parse_budget(budget) -> Optional[int]:
    return None if budget is None else parse_bytes(budget)


def check_parallel_args(mode, devices, budget, steps_per_epoch=None, tf_config: bool = True) -> None:
    """The checks of ``--parallel``, ``--devices`` and ``--budget`` that need no TensorFlow; ``tf_config``
    False where TF_CONFIG is not written yet (``tfdlrm cluster`` checking its chief's flags)."""
    if mode is not None and mode not in PARALLEL_MODES:
        raise UserError(f"unknown parallel mode {mode!r}; choose one of: {', '.join(PARALLEL_MODES)}")
    if devices is not None:
        if mode == "ps":
            raise UserError("--parallel ps takes its devices from TF_CONFIG's cluster; drop --devices")
        parsed = parse_devices(devices)
        count = parsed if isinstance(parsed, int) else len(parsed)
        if mode == "none" and count > 1:
            raise UserError(f"--parallel none trains on one device but --devices names {count}; "
                            f"use --parallel hybrid or mirrored")
    if budget is not None:
        parse_bytes(budget)
        if mode not in (None, "hybrid"):
            raise UserError(f"--budget applies to --parallel hybrid (its placement plan), not {mode}")
    if mode == "ps" and steps_per_epoch is None:
        raise UserError("--parallel ps needs --steps-per-epoch (workers read their data shards endlessly)")
    if mode == "ps" and tf_config and not os.environ.get("TF_CONFIG"):
        raise UserError("--parallel ps needs TF_CONFIG describing the cluster (see docs/parallelism.md)")


def tf_config_part(key: str) -> dict:
    """``TF_CONFIG``'s ``cluster`` or ``task``, read leniently: ``{}`` when it is unset, not JSON or not
    a mapping (check_tf_config says what is wrong where that matters)."""
    import json

    try:
        part = json.loads(os.environ.get("TF_CONFIG") or "{}").get(key)
    except (ValueError, AttributeError):
        return {}
    return part if isinstance(part, dict) else {}


def check_tf_config() -> dict:
    """``TF_CONFIG`` parsed and checked (a cluster of ``host:port`` lists, and a task in it)."""
    import json

    try:
        config = json.loads(os.environ["TF_CONFIG"])
    except ValueError as e:
        raise UserError(f"TF_CONFIG is not valid JSON: {e}") from None
    cluster = config.get("cluster") if isinstance(config, dict) else None
    if not isinstance(cluster, dict) or not cluster or not all(
            isinstance(v, list) and all(isinstance(a, str) and ":" in a for a in v) for v in cluster.values()):
        raise UserError('TF_CONFIG needs a "cluster": {"job": ["host:port", ...], ...}')
    task = config.get("task")
    if isinstance(task, dict) and "type" in task:
        kind, index = task.get("type"), task.get("index", 0)
        if kind not in cluster and kind != "chief":
            raise UserError(f"TF_CONFIG's task type {kind!r} is not a job of its cluster ({', '.join(cluster)})")
        if kind in cluster and not (isinstance(index, int) and 0 <= index < len(cluster[kind])):
            raise UserError(f"TF_CONFIG's task index {index!r} is outside its {kind!r} job "
                            f"({len(cluster[kind])} task(s))")
    check_cluster_addresses(cluster, loopback_only=bool(os.environ.get(NETWORK_ENV)))
    return config


def check_cluster_addresses(cluster: dict, loopback_only: bool = False) -> None:
    """Every ``host:port`` of a TF_CONFIG cluster names a port and a host that resolves, no two tasks
    share one, and (for ``tfdlrm cluster``, which runs on one host) each host is a loopback address."""
    import ipaddress
    import socket

    seen = {}
    for job, addresses in cluster.items():
        for index, address in enumerate(addresses):
            task = f"{job} {index}"
            host, _, port = address.rpartition(":")
            host = host.strip("[]")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise UserError(f"TF_CONFIG's {task} address {address!r} is not host:port")
            if address in seen:
                raise UserError(f"TF_CONFIG names {address} for both {seen[address]} and {task}: each task needs "
                                f"its own host:port")
            seen[address] = task
            try:
                found = {info[4][0] for info in socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)}
            except (socket.gaierror, UnicodeError) as e:
                raise UserError(f"TF_CONFIG's {task} host {host!r} does not resolve "
                                f"({getattr(e, 'strerror', None) or e})") from None
            if loopback_only and not all(ipaddress.ip_address(ip.split("%")[0]).is_loopback for ip in found):
                raise UserError(f"tfdlrm cluster runs on this host only, but TF_CONFIG's {task} is {address} "
                                f"({', '.join(sorted(found))}), not a loopback address")
