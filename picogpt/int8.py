"""int8 weights: each weight matrix as 8-bit integers and one float32 scale per output unit, a quarter of
float32's bytes; and the int8 product's other half, the activations quantized at each product.

Weights (once, at conversion): for each output unit j, w[:, j] ≈ scale[j] · q[:, j] with q in -127..127
and scale[j] = max |w[:, j]| / 127 (symmetric, per output column: a unit's weights share one range, and
one large weight coarsens only its own unit). `wte` is both the token table and the output projection's
matrix; its output units are its rows (one per token), so one scale per token serves the projection, and
the lookup `wte[ids]` returns each row times its scale.

Activations (at each product, picogpt.blas): each row x of an [m, k] input is mapped onto 0..126 by its
own range, x ≈ step · (u − zero) with u unsigned 8-bit, so that x · q = step · (u · q − zero · Σq): the
integer sums are exact, and Σq (per output unit) is computed once at load. Why 0..126, not 0..255:
CPUs without VNNI multiply 8-bit pairs into saturating 16-bit sums (two products of at most 127 · 127
fit; of 255 · 127 do not), so this range is exact on every x86 CPU (measured on a Zen 3: 255 gave
wrong sums, 126 exact ones). The price is one bit of activation resolution.

The error of one product, measured on the demo model's layers, is about 1% of the output's RMS; the
model's perplexity and tokens against float32 are checked in tests/test_int8.py.
"""

import numpy as np

LEVELS = 127  # weights: -127..127 (symmetric: -128 unused, so that negation is exact)
ACTIVATION_TOP = 126  # activations: 0..126 (see above: exact without VNNI)


def quantize_rows(matrix):
    """float32 [n_out, n_in] (a row per output unit) -> (int8 values, same shape; float32 scale [n_out])."""
    matrix = np.asarray(matrix, dtype=np.float32)
    largest = np.abs(matrix).max(axis=1)
    scale = np.where(largest > 0, largest / np.float32(LEVELS), np.float32(1)).astype(np.float32)
    values = np.rint(matrix / scale[:, None])
    return np.clip(values, -LEVELS, LEVELS, out=values).astype(np.int8), scale


def relative_error(matrix, values, scale):
    """‖w − scale·q‖ / ‖w‖ (Frobenius) of one quantized matrix, rows as output units: what conversion reports."""
    matrix = np.asarray(matrix, dtype=np.float32)
    error = matrix - values.astype(np.float32) * scale[:, None]
    norm = float(np.sqrt(np.square(matrix, dtype=np.float64).sum()))
    return float(np.sqrt(np.square(error, dtype=np.float64).sum())) / norm if norm else 0.0


def quantize_activations(x):
    """float32 [m, k] -> (uint8 [m, k] in 0..126, step [m] float32, zero [m] int32): x ≈ step · (u − zero),
    each row by its own range, which always includes 0 (so that zero is a whole number in 0..126)."""
    low = np.minimum(x.min(axis=1), 0)
    high = np.maximum(x.max(axis=1), 0)
    step = (high - low) / np.float32(ACTIVATION_TOP)
    step[step == 0] = 1  # an all-zero row: any step gives u = zero
    zero = np.rint(-low / step)
    scaled = x / step[:, None]
    scaled += zero[:, None]
    return np.rint(scaled, out=scaled).astype(np.uint8), step.astype(np.float32), zero.astype(np.int32)


def widen(values, scale, out_axis):
    """int8 values times their output unit's scale (units along out_axis) -> float32, in the values' order."""
    return np.multiply(values, scale[:, None] if out_axis == 0 else scale, dtype=np.float32, order="K")


class Int8Matrix:
    """A weight matrix kept as int8 values and one float32 scale per output unit, for a backend with an
    int8 product (picogpt.blas: oneDNN's); elsewhere int8 weights are widened to float32 at load.

    values [rows, cols] as the model uses the matrix (a linear layer's [n_in, n_out], `wte`'s
    [n_vocab, n_embd]); `out_axis` is the axis of its output units (1 for a linear layer's columns, 0 for
    `wte`'s rows), along which `scale` and `sums` (Σ of each unit's values, int32) run. `.T` swaps the
    axes and keeps both, so `x @ wte.T` is an int8 product too; `wte[ids]` gives float32 rows.
    """

    def __init__(self, values, scale, out_axis, sums=None):
        self.values, self.scale, self.out_axis = values, scale, out_axis
        self.sums = values.sum(axis=1 - out_axis, dtype=np.int32) if sums is None else sums

    shape = property(lambda self: self.values.shape)
    ndim = property(lambda self: self.values.ndim)
    size = property(lambda self: self.values.size)
    dtype = np.dtype(np.int8)
    nbytes = property(lambda self: self.values.nbytes + self.scale.nbytes)

    @property
    def T(self):
        return Int8Matrix(self.values.T, self.scale, 1 - self.out_axis, self.sums)

    def __getitem__(self, rows):
        """Rows by index (the token lookup), as float32: each row times its own scale (rows are units)."""
        if self.out_axis != 0:
            raise TypeError("only a matrix whose rows are its output units (wte) is indexed by rows")
        return self.values[rows].astype(np.float32) * self.scale[rows][..., None]

    def widened(self):
        """The matrix in float32, values times their unit's scale (a new array, the values' order)."""
        return widen(self.values, self.scale, self.out_axis)

    def __array__(self, dtype=None, copy=None):
        """Plain NumPy (np.matmul, np.asarray) sees float32 values: widened first, slowly."""
        wide = self.widened()
        return wide if dtype is None else wide.astype(dtype)
