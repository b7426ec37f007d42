"""How a model's weights are multiplied: float32; bfloat16 or int8 kept so for a backend that multiplies
them natively, or widened to float32 once at load. Decided when a model is loaded, from the selected
backend (picogpt.blas) and this CPU, never assumed; `-v` shows the choice (Precision.note). With the
automatic backend (--backend auto, the default), the file's precision picks the backend first
(pick_backend).
"""

import os
from typing import NamedTuple

import numpy as np

from . import bfloat16, blas, int8
from .errors import PicogptError
from .hints import install_command
from .modelfile import SCALE
from .tensors import output_axis

BF16_ENV = "PICOGPT_BF16"  # "native" or "widen": overrides bf16_support()'s choice (tests, or a user who measured)


def bf16_support(forced=None):
    """(True, how) if the selected backend multiplies bfloat16 weights natively and fast on this CPU,
    else (False, why): then bfloat16 weights are widened to float32 at load (weights_for_backend).

    Native needs the library's bfloat16 product (MKL's or oneDNN's), a CPU with bfloat16 instructions
    (avx512_bf16 or amx_bf16), and for MKL an Intel CPU: MKL picks its bfloat16 kernels by Intel's CPU
    identification, where oneDNN picks them by the instructions. On an
    AMD Zen 4 with avx512_bf16, a 1x768 by 768x3072 bfloat16 product took 5.2 ms against 0.12 ms in
    float32 (MKL 2026.2), and without the instructions Intel's own CPUs are 10-22x slower in bfloat16
    (the shared performance notes). forced="native" or "widen" (else $PICOGPT_BF16) overrides the choice;
    native still needs the library's bfloat16 product (else the weights are widened, and the reason says
    that native was asked for). Any other value is refused in one sentence.
    """
    backend = blas.current()
    source = "asked for" if forced else f"${BF16_ENV}"
    asked = "bf16='native'" if forced else f"${BF16_ENV}=native"
    forced = asked_for(forced)
    if backend._gemm_bf16 is None:
        why = (f"the {backend.name} backend has no bfloat16 product on this CPU (oneDNN's needs AVX-512)"
               if backend.name == "onednn" else
               f"the {backend.name} backend has no bfloat16 product (--backend mkl and onednn have)")
        return False, (f"native bfloat16 products were asked for ({asked}), but {why}" if forced == "native"
                       else why)
    if forced in ("native", "widen"):
        return forced == "native", f"{source}: {forced}"
    vendor, flags = blas.cpu_features()
    if not flags:
        return False, "this system does not say whether its CPU has bfloat16 instructions (no /proc/cpuinfo)"
    found = sorted({"avx512_bf16", "amx_bf16"} & flags)
    if not found:
        return False, "this CPU has no bfloat16 instructions (avx512_bf16 or amx_bf16)"
    if vendor != "GenuineIntel" and backend.name != "onednn":  # oneDNN dispatches on the instructions
        return False, (f"MKL runs its bfloat16 kernels on Intel CPUs only, and this one is {vendor} (measured on "
                       f"an AMD CPU with avx512_bf16: bfloat16 products 40x slower than float32)")
    return True, f"{backend.name}'s cblas_gemm_bf16bf16f32 on a CPU with {' and '.join(found)}"


def asked_for(forced=None):
    """The choice a caller (forced) or $PICOGPT_BF16 makes: "native", "widen" or "" (none); a value that
    means nothing is a one-line error, not ignored."""
    given = (forced or os.environ.get(BF16_ENV, "")).strip().lower()
    if given not in ("", "native", "widen"):
        where = "bf16=" if forced else f"${BF16_ENV}="
        raise PicogptError(f"{where}{given!r} means nothing: give native or widen, or leave it unset for picogpt's "
                           f"choice (bfloat16 products where the backend and CPU do them well)")
    return given


def pick_backend(weight_dtype, bf16=None):
    """(backend, why): the fastest backend for weights stored as weight_dtype on this CPU, among those
    installed. The rule, and the measurements behind it (the shared performance notes; tests/test_int8.py's
    module docstring for the int8 figures):

    - float32: numpy. NumPy's OpenBLAS was as fast as MKL's and oneDNN's float32 products for a decode
      step on a Xeon (34.5, 34.2, 32.1 ms) and on a Zen 3 (one 768x3072 row product: 209, 295 us).
    - int8: onednn, the one backend with an int8 product; without it the weights are widened at load.
    - bfloat16 on a CPU with avx512_bf16 or amx_bf16: mkl on Intel (its step 18.5 ms, oneDNN's 18.3), onednn
      elsewhere (MKL widens on AMD: 40x slower); without the instructions, or without either library,
      numpy, the weights widened at load (bfloat16 products are 10-22x slower than float32's there).
      bf16="widen" (or $PICOGPT_BF16=widen) asks for float32 products: numpy.
    """
    from .blas import cpu_features, mkl_library, onednn_library
    if weight_dtype == "int8":
        if onednn_library():
            return "onednn", "int8 weights, and oneDNN has the int8 product"
        return "numpy", "int8 weights, but oneDNN (the int8 product) is not installed"
    if weight_dtype == "bf16":
        if asked_for(bf16) == "widen":
            return "numpy", "bfloat16 weights, widened as asked (bf16='widen' or $PICOGPT_BF16=widen)"
        vendor, flags = cpu_features()
        found = sorted({"avx512_bf16", "amx_bf16"} & flags)
        if not found:
            return "numpy", "bfloat16 weights, but this CPU has no bfloat16 instructions: widened, float32 products"
        if vendor == "GenuineIntel" and mkl_library():
            return "mkl", f"bfloat16 weights on an Intel CPU with {' and '.join(found)}"
        if onednn_library():
            return "onednn", f"bfloat16 weights on a CPU with {' and '.join(found)}"
        return "numpy", "bfloat16 weights, but neither MKL (Intel CPUs) nor oneDNN is installed"
    return "numpy", "float32 weights: NumPy's BLAS is as fast as the others for them"


class Precision(NamedTuple):
    """How a loaded model's weights are stored and multiplied (-v shows it)."""

    file: str  # the weight matrices' type in the file: "f32", "bf16" or "int8"
    native: bool  # bf16 and int8 files: multiplied so by the backend (else widened to float32 at load)
    note: str  # one line saying so, and why

    @property
    def widened(self):
        return self.file != "f32" and not self.native


def weights_for_backend(opened, bf16=None):
    """The tensors to compute with, and how (an int8 file's: _int8_weights): a bfloat16 file's matrices stay
    bfloat16 (BFloat16Matrix, half the memory) where the selected BLAS multiplies bfloat16 natively on this CPU
    (bf16_support), and are widened to float32 once, here, otherwise: exact, never failing, at the
    cost of float32's memory (the file's mapping is then let go: every tensor is copied). The model's code
    is the same either way. bf16="widen" or "native" overrides the choice (see bf16_support)."""
    automatic, threads = blas.choosing_automatically()
    if automatic:
        backend, why = pick_backend(opened.weight_dtype, bf16)
        blas.use_for_model(backend, threads, why)
    if opened.weight_dtype == "int8":
        return _int8_weights(opened)
    if opened.weight_dtype != "bf16":
        return opened.tensors, Precision("f32", False, "float32 weights")
    native, why = bf16_support(bf16)
    matrices = [name for name in opened.tensors if opened.tensors[name].dtype == np.uint16]
    if native:
        tensors = {name: bfloat16.BFloat16Matrix.of(t) if name in matrices else t
                   for name, t in opened.tensors.items()}
        return tensors, Precision("bf16", True, f"bfloat16 weights, multiplied as bfloat16: {why}")
    tensors = {name: bfloat16.widen(t) if name in matrices else np.array(t) for name, t in opened.tensors.items()}
    extra = sum(opened.tensors[name].size for name in matrices) * 4
    return tensors, Precision("bf16", False, f"{opened.path}: bfloat16 weights widened to float32 at load "
                                             f"({extra / 1e6:.0f} MB of memory): {why}")


def _int8_weights(opened):
    """An int8 file's tensors: each matrix and its scales as one Int8Matrix where the backend has an int8
    product, else widened to float32 once (the same numbers as the int8 products' weights, float32's
    memory). The scales' own tensors ("NAME.scale") are folded into their matrices."""
    matrices = {name[:-len(SCALE)]: t for name, t in opened.tensors.items() if name.endswith(SCALE)}
    rest = {name: t for name, t in opened.tensors.items() if not name.endswith(SCALE) and name not in matrices}
    if blas.current()._gemm_int8 is not None:
        tensors = {name: int8.Int8Matrix(opened.tensors[name], scale, out_axis=output_axis(name))
                   for name, scale in matrices.items()}
        return {**rest, **tensors}, Precision("int8", True, f"int8 weights, multiplied as int8 by "
                                                            f"{blas.current().name} (activations quantized per row)")
    tensors = {name: int8.widen(opened.tensors[name], scale, output_axis(name))
               for name, scale in matrices.items()}
    extra = sum(t.size for t in tensors.values()) * 3
    return {**{n: np.array(t) for n, t in rest.items()}, **tensors}, Precision(
        "int8", False, f"{opened.path}: int8 weights widened to float32 at load ({extra / 1e6:.0f} MB of memory): "
                       f"the {blas.current().name} backend has no int8 product (--backend onednn has; "
                       f"install it with: {install_command('onednn')})")
