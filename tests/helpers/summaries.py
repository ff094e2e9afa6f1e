"""Reading a run's TensorBoard event files in tests."""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path


def read_events(logs_dir) -> dict:
    """{tag: [(step, value), ...]} over every event file in ``logs_dir``, in file order (hparams:
    the plugin's payload bytes)."""
    import tensorflow as tf

    out = defaultdict(list)
    for path in sorted(Path(logs_dir).glob("events.out.tfevents*")):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                if value.metadata.plugin_data.plugin_name == "hparams":
                    out[value.tag].append((event.step, value.metadata.plugin_data.content))
                else:
                    out[value.tag].append((event.step, float(tf.make_ndarray(value.tensor))))
    return dict(out)


def hparams_in(events: dict) -> dict:
    """The hparams of the one session start in ``events`` (``read_events``), by name."""
    from tensorboard.plugins.hparams import plugin_data_pb2

    (_, content), = events["_hparams_/session_start_info"]
    values = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    return {k: getattr(v, v.WhichOneof("kind")) for k, v in values.items()}
