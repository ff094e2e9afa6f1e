"""Row-wise quantized embedding rows for serving (``export --quantize-embeddings 8|4``).

Each row is stored as unsigned codes with its own scale and bias, as FBGEMM's
``embedding_bag_byte_prepack`` (8 bits, float32 scale and bias) and ``embedding_bag_4bit_prepack``
(4 bits, two codes a byte, float16 scale and bias): ``value ~ code * scale + bias`` with
``bias = min(row)`` and ``scale = (max(row) - min(row)) / (2 ** bits - 1)``, so every value is within
``scale / 2`` of the float one.  Only the rows a request looks up are turned back into floats.
"""
from __future__ import annotations

import numpy as np
import tensorflow as tf

BITS = (8, 4)


def variable_name(variable) -> str:
    """``table_C1`` for the variable ``sparse_arch/table_C1:0``."""
    return variable.name.split("/")[-1].split(":")[0]


def quantized_row_bytes(width: int, bits: int) -> int:
    """Bytes of one quantized row of ``width`` values: its codes, scale and bias."""
    return (width if bits == 8 else (width + 1) // 2) + (8 if bits == 8 else 4)


def quantize_rows(values: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(codes uint8 [rows, width or ceil(width / 2)], scale [rows], bias [rows])`` of float rows ``values``;
    4-bit codes packed two a byte, the lower nibble first.  Scale and bias are float32 (8 bits) or
    float16 (4 bits), as FBGEMM stores them; the codes are computed against the stored (rounded) ones."""
    if bits not in BITS:
        raise ValueError(f"quantization bits must be 8 or 4, got {bits}")
    values = np.asarray(values, np.float32)
    levels = 2 ** bits - 1
    store = np.float32 if bits == 8 else np.float16
    low, high = values.min(axis=1), values.max(axis=1)
    scale = ((high - low) / levels).astype(store)
    bias = low.astype(store)
    step = scale.astype(np.float32)[:, None]
    safe = np.where(step > 0, step, 1.0)
    codes = np.clip(np.rint((values - bias.astype(np.float32)[:, None]) / safe), 0, levels).astype(np.uint8)
    if bits == 4:
        if codes.shape[1] % 2:
            codes = np.concatenate([codes, np.zeros((codes.shape[0], 1), np.uint8)], axis=1)
        codes = (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8)
    return codes, scale, bias


def dequantize_rows(codes: np.ndarray, scale: np.ndarray, bias: np.ndarray, bits: int, width: int) -> np.ndarray:
    """The float rows ``[rows, width]`` that quantized rows stand for (numpy; what serving computes)."""
    codes = np.asarray(codes)
    if bits == 4:
        codes = np.stack([codes & 15, codes >> 4], axis=-1).reshape(codes.shape[0], -1)[:, :width]
    return codes.astype(np.float32) * np.asarray(scale, np.float32)[:, None] + np.asarray(bias, np.float32)[:, None]


class QuantizedRows(tf.Module):
    """One table's rows, quantized (:func:`quantize_rows`), as variables a SavedModel stores; :meth:`gather`
    returns float32 rows for the ids asked."""

    def __init__(self, values: np.ndarray, bits: int, name: str):
        super().__init__(name=name)
        codes, scale, bias = quantize_rows(values, bits)
        self.bits, self.width = int(bits), int(np.shape(values)[1])
        self.codes = tf.Variable(codes, trainable=False, name=f"{name}_codes")
        self.scale = tf.Variable(scale, trainable=False, name=f"{name}_scale")
        self.bias = tf.Variable(bias, trainable=False, name=f"{name}_bias")

    @property
    def bytes(self) -> int:
        return sum(int(np.prod(v.shape)) * v.dtype.size for v in (self.codes, self.scale, self.bias))

    def gather(self, ids):
        codes = tf.gather(self.codes, ids)  # ids.shape + [packed width]
        if self.bits == 4:
            codes = tf.stack([tf.bitwise.bitwise_and(codes, 15), tf.bitwise.right_shift(codes, 4)], axis=-1)
            packed = int(self.codes.shape[1])
            codes = tf.reshape(codes, tf.concat([tf.shape(ids), [2 * packed]], axis=0))[..., :self.width]
        scale = tf.cast(tf.gather(self.scale, ids), tf.float32)[..., None]
        bias = tf.cast(tf.gather(self.bias, ids), tf.float32)[..., None]
        return tf.cast(codes, tf.float32) * scale + bias
