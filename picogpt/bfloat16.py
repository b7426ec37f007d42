"""bfloat16 weights in NumPy, which has no bfloat16 type: the 16-bit patterns in uint16 arrays.

bfloat16 is the upper half of a float32 (sign, 8 exponent bits, 7 mantissa bits), so widening is a
16-bit shift and exact, and narrowing is rounding away the lower half (to nearest, ties to even).
A model.dat may store its weight matrices so (half the bytes, about 3 significant digits); the
loader either widens them to float32 once or keeps them as `BFloat16Matrix` for a BLAS that multiplies
bfloat16 itself (MKL's cblas_gemm_bf16bf16f32, see picogpt.blas).

(ml_dtypes has a real bfloat16 dtype for NumPy, but importing it takes about half a second: longer
than loading and running GPT-2 124M for a few tokens. Shifts and adds on uint16 do all we need.)
"""

import numpy as np


def round_to_bfloat16(array):
    """float32 -> the bit patterns of the nearest bfloat16 (ties to even), uint16, same shape and order.

    Adding 0x7FFF plus the lowest kept bit, then dropping the low 16 bits, rounds to nearest with ties
    to even; a value beyond bfloat16's range becomes infinity. (Not for NaN: weights are checked first.)
    """
    values = np.asarray(array, dtype=np.float32)
    bits = values.view(np.uint32)
    rounded = ((bits + (np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1)))) >> np.uint32(16))
    rounded = rounded.astype(np.uint16)
    nan = np.isnan(values)
    return np.where(nan, np.uint16(0x7FC0), rounded) if nan.any() else rounded  # a NaN stays NaN


def widen(bits):
    """bfloat16 bit patterns (uint16) -> float32, exactly, keeping C or Fortran order."""
    bits = np.asarray(bits, dtype=np.uint16)
    order = "F" if bits.flags.f_contiguous and not bits.flags.c_contiguous else "C"
    wide = bits.astype(np.uint32, order=order)
    wide <<= np.uint32(16)  # in place: one float32-sized array, not two
    return wide.view(np.float32)


def isfinite(bits):
    """Element-wise: is the bfloat16 finite (its exponent bits are not all ones)?"""
    return (np.asarray(bits, dtype=np.uint16) & np.uint16(0x7F80)) != np.uint16(0x7F80)


class BFloat16Matrix(np.ndarray):
    """A weight matrix kept in bfloat16 (its uint16 bit patterns) for a BLAS that multiplies bfloat16.

    Views (`wte.T`, slices) stay BFloat16Matrix, so picogpt.blas.matmul recognises them; picking rows
    by an array of ids (the token lookup `wte[ids]`) gives float32, so the model's code reads the same for
    either type.
    """

    @classmethod
    def of(cls, bits):
        return np.asarray(bits, dtype=np.uint16).view(cls)

    def __getitem__(self, index):
        picked = super().__getitem__(index)
        if isinstance(picked, BFloat16Matrix) and not np.may_share_memory(picked, self):  # rows picked by ids
            return widen(picked.view(np.ndarray))  # (fancy indexing copies): float32 values
        return picked  # a view (a slice, .T): still the weights, still BFloat16Matrix

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        """Any NumPy arithmetic on it (`x @ w`, `w + 1`, `w.sum()`) sees float32 values, never the bit
        patterns: widened first. (picogpt.blas multiplies it as bfloat16 without this detour.)"""
        inputs = tuple(x.widened() if isinstance(x, BFloat16Matrix) else x for x in inputs)
        return getattr(ufunc, method)(*inputs, **kwargs)

    def widened(self):
        """The same matrix in float32 (a new array, same order)."""
        return widen(self.view(np.ndarray))
