"""How a model's weights are multiplied: float32, or bfloat16 kept as bfloat16 for a BLAS that multiplies
it natively, or widened to float32 once at load. Decided when a model is loaded, from the selected
backend (picogpt.blas) and this CPU, never assumed; `-v` shows the choice (Precision.note).
"""

import os
from typing import NamedTuple

import numpy as np

from . import bfloat16, blas
from .errors import PicogptError

BF16_ENV = "PICOGPT_BF16"  # "native" or "widen": overrides bf16_support()'s choice (tests, or a user who measured)


def bf16_support(forced=None):
    """(True, how) if the selected backend multiplies bfloat16 weights natively and fast on this CPU,
    else (False, why): then bfloat16 weights are widened to float32 at load (weights_for_backend).

    Native needs the library's bfloat16 product (MKL's), a CPU with bfloat16 instructions (avx512_bf16
    or amx_bf16), and an Intel CPU: MKL picks its bfloat16 kernels by Intel's CPU identification. On an
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
        why = f"the {backend.name} backend has no bfloat16 product (--backend mkl has)"
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
    if vendor != "GenuineIntel":
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


class Precision(NamedTuple):
    """How a loaded model's weights are stored and multiplied (-v shows it)."""

    file: str  # the weight matrices' type in the file: "f32" or "bf16"
    native: bool  # bf16 files: multiplied as bfloat16 by the BLAS (else widened to float32 at load)
    note: str  # one line saying so, and why

    @property
    def widened(self):
        return self.file == "bf16" and not self.native


def weights_for_backend(opened, bf16=None):
    """The tensors to compute with, and how: a bfloat16 file's matrices stay bfloat16 (BFloat16Matrix,
    half the memory) where the selected BLAS multiplies bfloat16 natively on this CPU
    (bf16_support), and are widened to float32 once, here, otherwise: exact, never failing, at the
    cost of float32's memory (the file's mapping is then let go: every tensor is copied). The model's code
    is the same either way. bf16="widen" or "native" overrides the choice (see bf16_support)."""
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
