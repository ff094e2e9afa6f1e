"""The serving layer: SavedModel exports for TF Serving; manual: docs/serving.md.

``export`` writes versions, ``signatures`` defines what they take, ``warmup`` what TF
Serving replays when it loads one.
"""
