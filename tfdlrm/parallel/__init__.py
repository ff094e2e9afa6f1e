"""Training over several devices (``--parallel none|hybrid|mirrored|ps``); manual: docs/parallelism.md.

``devices`` and ``plan`` parse arguments and place tables without TensorFlow; ``hybrid``,
``mirrored`` and ``ps`` are the runners; ``setup.make_parallel`` picks one for a run.
"""
