"""Which BLAS library multiplies the model's matrices: `use()` selects it, `matmul()` calls it.

Backends (`BACKENDS`; `use(lib=PATH)` adds a fourth, "cblas"):

- numpy: `np.matmul`, i.e. whatever BLAS NumPy was built with (the NumPy wheels bundle OpenBLAS).
- openblas: an OpenBLAS library called through its CBLAS interface. `openblas_sources()` lists the
  ones found, and `use("openblas")` takes the first: the `scipy-openblas32` wheel if installed
  (`scipy_openblas32.get_lib_dir()`), the copy SciPy bundles (scipy.libs/libscipy_openblas*.so, or
  scipy/.dylibs on macOS; libopenblas*.so before SciPy 1.13), the system's libopenblas
  (`ctypes.util.find_library`), and last the 64-bit-int copy NumPy bundles (numpy.libs).
  `use("openblas", lib=PATH)` names the file instead.
- accelerate: Apple's Accelerate framework (macOS only), through the same CBLAS code.
- mkl: Intel's oneMKL (libmkl_rt from the `mkl` wheel, x86-64), through the same CBLAS code. It also
  multiplies bfloat16 weights (`cblas_gemm_bf16bf16f32`: activations rounded to bfloat16 per product,
  sums in float32), the one library here that does; picogpt.precision decides when that is worth it.
- cblas: `use(lib=PATH)` loads any CBLAS library, e.g. BLIS or a system OpenBLAS.

Why ctypes: a CBLAS library is a plain C shared library, so ctypes calls `cblas_sgemm` directly and
picogpt ships no compiled code. Each product passes row/column-major flags (CblasTrans) and leading
dimensions, so transposed views (`x @ wte.T`) and slices of the KV cache are read in place, never
copied. Single-row products call `cblas_sgemv`; batched ones call `cblas_sgemm_batch_strided` where
the library has it (OpenBLAS >= 0.3.31, MKL) and loop over `cblas_sgemm` otherwise.

The pitfall: the same function comes under several names, and with two integer sizes. SciPy's
OpenBLAS builds prefix every symbol (`scipy_cblas_sgemm`); ILP64 builds, which take 64-bit
integers for every dimension and leading dimension, add a suffix (`cblas_sgemm64_`, MKL's
`cblas_sgemm_64`), and OpenBLAS's `openblas_get_config()` says "USE64BITINT" even where no suffix
does. NumPy's own copy is `scipy_cblas_sgemm64_`; SciPy's is 32-bit. Passing 32-bit ints to an
ILP64 library (or the reverse) leaves half of each dimension to chance: wrong results or a crash.
So we look the names up and take the integer type from the suffix and the config string.

Threads: `use(..., threads=N)` applies `threadpoolctl.threadpool_limits(N, user_api="blas")`, which
reaches every loaded OpenBLAS/MKL/BLIS, including ones ctypes loaded, and keeps it until the next
`use()`, which first restores the previous counts. (Accelerate sets its own: VECLIB_MAXIMUM_THREADS.)
"""

import ctypes
import ctypes.util
import glob
import importlib.util
import os
import sys
from ctypes import c_float, c_void_p

import numpy as np

from .errors import PicogptError
from . import int8
from .bfloat16 import BFloat16Matrix, round_to_bfloat16
from .int8 import Int8Matrix
from .hints import install_command

BACKENDS = ("numpy", "openblas", "accelerate", "mkl", "onednn")
ACCELERATE = "/System/Library/Frameworks/Accelerate.framework/Accelerate"
_ROW, _NOTRANS, _TRANS = 101, 111, 112  # CblasRowMajor, CblasNoTrans, CblasTrans
_ONE, _ZERO = c_float(1.0), c_float(0.0)
_F32 = np.dtype(np.float32)

_fallback = np.matmul  # products the library cannot take (other dtypes, odd strides, broadcasting)

def _pointer(a):
    """The address of an array's first element, as a c_void_p."""
    return c_void_p(a.ctypes.data)


def _blas_info(path):
    """threadpoolctl's record of the loaded library at `path` (a path or a bare file name), or None."""
    from threadpoolctl import threadpool_info
    for info in threadpool_info():
        fp = info["filepath"]
        if info["user_api"] == "blas" and (os.path.realpath(fp) == os.path.realpath(path)
                                           or os.path.basename(fp) == path):
            return info
    return None


class Backend:
    """NumPy's own matmul; the base of every backend. `.library` is the path that runs the products."""

    name, int_bits = "numpy", None
    chosen_because = ""  # why the automatic choice (use("auto")) took it
    _gemm_bf16 = None  # the library's bfloat16 product, where it has one (CBLAS: MKL's; oneDNN's)
    _gemm_int8 = None  # the library's int8 product (oneDNN's)

    def __init__(self):
        libs = os.path.dirname(os.path.dirname(np.__file__))  # site-packages: numpy.libs, numpy/.dylibs
        from threadpoolctl import threadpool_info
        own = [i for i in threadpool_info() if i["user_api"] == "blas"
               and os.path.realpath(i["filepath"]).startswith(os.path.join(libs, "numpy"))]
        self.library = own[0]["filepath"] if own else "numpy"
        self.version = f"NumPy {np.__version__}" + (
            f", {own[0]['internal_api']} {own[0]['version']}" if own else "")

    @property
    def threads(self):
        """The library's BLAS thread count as threadpoolctl reports it (None if it cannot tell)."""
        info = _blas_info(self.library)
        return info["num_threads"] if info else None

    matmul = staticmethod(np.matmul)  # a BFloat16Matrix widens itself for it (its __array_ufunc__), slowly


def _layout(strides, rows, cols, size=4):
    """(CBLAS transpose flag, leading dimension) for a [rows, cols] view of `size`-byte elements, or None
    if neither fits."""
    s0, s1 = strides
    if (s1 == size or cols == 1) and s0 % size == 0 and s0 >= size * cols:
        return _NOTRANS, max(s0 // size, cols)
    if (s0 == size or rows == 1) and s1 % size == 0 and s1 >= size * rows:
        return _TRANS, max(s1 // size, rows)
    return None


class CBLAS(Backend):
    """A CBLAS shared library called through ctypes (OpenBLAS, Accelerate, MKL, BLIS...)."""

    def __init__(self, name, path):
        try:
            lib = ctypes.CDLL(path)
        except OSError as error:
            raise PicogptError(f"cannot load the BLAS library {path} ({error}); "
                               "give the path of a CBLAS shared library, e.g. libopenblas.so") from None
        for prefix, suffix in (("", ""), ("scipy_", ""), ("", "64_"), ("scipy_", "64_"), ("", "_64")):
            if hasattr(lib, f"{prefix}cblas_sgemm{suffix}"):
                break
        else:
            raise PicogptError(f"{path} has no CBLAS sgemm (looked for cblas_sgemm, scipy_cblas_sgemm "
                               "and their 64_ variants); give a CBLAS library such as libopenblas")
        def sym(base):  # this library's name for a function, or None
            return getattr(lib, f"{prefix}{base}{suffix}", None)
        self.name, self.library, self._lib = name, path, lib
        self._gemm, self._gemv = sym("cblas_sgemm"), sym("cblas_sgemv")
        self._batch = sym("cblas_sgemm_batch_strided")
        self._gemm_bf16 = getattr(lib, "cblas_gemm_bf16bf16f32", None)  # MKL's (LP64: see below)
        if hasattr(lib, "MKL_Set_Interface_Layer"):
            # libmkl_rt's plain names take 64-bit ints if $MKL_INTERFACE_LAYER says ILP64: pin them to 32-bit
            # (LP64, what this code passes) before the first call; a library that refuses is not used.
            lib.MKL_Set_Interface_Layer.restype = ctypes.c_int
            if lib.MKL_Set_Interface_Layer(ctypes.c_int(0)) != 0:  # MKL_INTERFACE_LP64
                raise PicogptError(f"{path} would not use 32-bit integers (MKL_INTERFACE_LAYER is "
                                   f"{os.environ.get('MKL_INTERFACE_LAYER')!r}); unset MKL_INTERFACE_LAYER")
        config = sym("openblas_get_config")
        if config is not None:
            config.restype = ctypes.c_char_p
            config = config().decode(errors="replace")
        info = _blas_info(path)
        if info:  # a bare name ("libopenblas.so.0") becomes the path the loader found
            self.library = info["filepath"]
        self.int_bits = 64 if suffix or "USE64BITINT" in (config or "") else 32
        self._int = ctypes.c_int64 if self.int_bits == 64 else ctypes.c_int32
        self.version = (" ".join(config.split()[:2]) if config else
                        f"{info['internal_api']} {info['version']}" if info else "version unknown")

    def matmul(self, a, b):
        """a @ b for float32 [m, k] @ [k, n] and [h, m, k] @ [h, k, n], and float32 [m, k] @ bfloat16
        [k, n] where the library has a bfloat16 product; other products go to np.matmul."""
        if isinstance(b, Int8Matrix):
            if self._gemm_int8 is not None and a.ndim == b.ndim == 2:
                return self._matmul_int8(a, b)
            return _fallback(a, b.widened())  # a library without int8 products: widened, slowly
        if isinstance(b, BFloat16Matrix):
            if self._gemm_bf16 is not None and a.ndim == b.ndim == 2:
                return self._matmul_bf16(a, b)
            return _fallback(a, b.widened())  # a library without bfloat16 products: widened, slowly
        if (not isinstance(a, np.ndarray) or not isinstance(b, np.ndarray) or a.dtype is not _F32
                or b.dtype is not _F32 or a.ndim != b.ndim or a.ndim not in (2, 3)):
            return _fallback(a, b)
        if a.ndim == 2:  # one product: a batch of 1
            (m, k), (h_b, k_b, n) = a.shape, (1,) + b.shape
            h, sa, sb, out = 1, (0,) + a.strides, (0,) + b.strides, (m, n)
        else:  # h products; a batch stride sa[0], sb[0] in bytes
            (h, m, k), (h_b, k_b, n) = a.shape, b.shape
            sa, sb, out = a.strides, b.strides, (h, m, n)
        (ta, lda), (tb, ldb) = _layout(sa[1:], m, k) or (0, 0), _layout(sb[1:], k, n) or (0, 0)
        if (not ta or not tb or (h_b, k_b) != (h, k) or not m * n * k
                or sa[0] % 4 or sb[0] % 4 or sa[0] < 0 or sb[0] < 0):
            return _fallback(a, b)
        c, Int = np.empty(out, _F32), self._int
        if h > 1 and self._batch is not None:  # one call for all h products: 2-3x faster than h calls
            self._batch(_ROW, ta, tb, Int(m), Int(n), Int(k), _ONE, _pointer(a), Int(lda),
                        Int(sa[0] // 4), _pointer(b), Int(ldb), Int(sb[0] // 4), _ZERO, _pointer(c),
                        Int(n), Int(m * n), Int(h))
            return c
        pa, pb, pc, sc = _pointer(a).value, _pointer(b).value, _pointer(c).value, 4 * m * n
        if m == 1 and self._gemv is not None:
            # A row times a matrix, y = op(b)^T x: 4-12x faster than OpenBLAS's sgemm with M=1.
            # b as stored is [k, n] (read transposed) or, with CblasTrans, b^T [n, k] (read as is).
            gemv, trans, ldb, inc_a, one = self._gemv, _TRANS + _NOTRANS - tb, Int(ldb), Int(1), Int(1)
            rows, cols = (Int(k), Int(n)) if tb == _NOTRANS else (Int(n), Int(k))
            if ta == _TRANS:  # a's one row is strided
                inc_a = Int(lda)
            for i in range(h):
                gemv(_ROW, trans, rows, cols, _ONE, c_void_p(pb + i * sb[0]), ldb,
                     c_void_p(pa + i * sa[0]), inc_a, _ZERO, c_void_p(pc + i * sc), one)
        else:
            gemm, mm, nn, kk, lda, ldb = self._gemm, Int(m), Int(n), Int(k), Int(lda), Int(ldb)
            for i in range(h):
                gemm(_ROW, ta, tb, mm, nn, kk, _ONE, c_void_p(pa + i * sa[0]), lda,
                     c_void_p(pb + i * sb[0]), ldb, _ZERO, c_void_p(pc + i * sc), nn)
        return c


    def _matmul_bf16(self, a, b):
        """float32 a [m, k] @ bfloat16 b [k, n]: a is rounded to bfloat16 (nearest even), the sums are
        float32 (MKL's cblas_gemm_bf16bf16f32)."""
        (m, k), n = a.shape, b.shape[1]
        layout = _layout(b.strides, k, n, size=2)
        if layout is None or not m * n * k:
            return _fallback(a, b.widened())
        a16 = round_to_bfloat16(np.ascontiguousarray(a, dtype=_F32))
        (tb, ldb), c, Int = layout, np.empty((m, n), _F32), self._int
        self._gemm_bf16(_ROW, _NOTRANS, tb, Int(m), Int(n), Int(k), _ONE, _pointer(a16), Int(k), _pointer(b),
                        Int(ldb), _ZERO, _pointer(c), Int(n))
        return c


class OneDNN(CBLAS):
    """oneDNN's BLAS-like functions (libdnnl from the `onednn-cpu-gomp` wheel), called through ctypes:
    float32 (dnnl_sgemm), bfloat16 (dnnl_gemm_bf16bf16f32) and int8 (dnnl_gemm_u8s8s32) products.

    oneDNN picks its kernels by the CPU's instruction set, not its vendor: bfloat16 runs natively on any
    CPU with avx512_bf16 or amx_bf16, AMD's included, where MKL widens (see picogpt.precision). Its
    functions are row-major only and take chars for transposes and 64-bit dimensions; they return a
    status (0: done, 3: unimplemented on this CPU). oneDNN 3.2 has no bfloat16 product on a CPU without
    AVX-512 (measured on a Zen 3: status 3), so `_gemm_bf16` is None there: a probe decides, at load.
    Threads are OpenMP's (libgomp): `use(threads=N)` limits them with threadpoolctl.
    """

    def __init__(self, path):
        try:
            lib = ctypes.CDLL(path)
        except OSError as error:
            raise PicogptError(f"cannot load oneDNN's library {path} ({error}); reinstall it with: "
                               f"{install_command('onednn')}") from None
        if not hasattr(lib, "dnnl_sgemm") or not hasattr(lib, "dnnl_gemm_u8s8s32"):
            raise PicogptError(f"{path} has no dnnl_sgemm or dnnl_gemm_u8s8s32; give oneDNN's libdnnl (version 3)")
        I, char, p = ctypes.c_int64, ctypes.c_char, c_void_p
        for name, args in (("dnnl_sgemm", [char, char, I, I, I, c_float, p, I, p, I, c_float, p, I]),
                           ("dnnl_gemm_bf16bf16f32", [char, char, I, I, I, c_float, p, I, p, I, c_float, p, I]),
                           ("dnnl_gemm_u8s8s32", [char, char, char, I, I, I, c_float, p, I, ctypes.c_uint8, p, I,
                                                  ctypes.c_int8, c_float, p, I, p])):
            getattr(lib, name).argtypes, getattr(lib, name).restype = args, ctypes.c_int
        self.name, self.library, self._lib, self.int_bits, self._int = "onednn", path, lib, 64, I
        version = getattr(lib, "dnnl_version", None)
        if version is not None:
            class Version(ctypes.Structure):
                _fields_ = [("major", ctypes.c_int), ("minor", ctypes.c_int), ("patch", ctypes.c_int)]
            version.restype = ctypes.POINTER(Version)
            v = version().contents
            self.version = f"oneDNN {v.major}.{v.minor}.{v.patch}"
        else:
            self.version = "oneDNN, version unknown"
        self._gemv = self._batch = None
        self._sgemm = lib.dnnl_sgemm
        self._gemm = self._cblas_sgemm
        self._no_offset = np.zeros(1, np.int32)  # dnnl_gemm_u8s8s32's offset of C, unused ("F", 0)
        self._gemm_bf16 = lib.dnnl_gemm_bf16bf16f32 if self._bf16_works() else None
        self._gemm_int8 = lib.dnnl_gemm_u8s8s32

    def matmul(self, a, b):
        """a @ b: 2-D products (every weight matrix, float32, bfloat16 or int8) through oneDNN; the batched
        [h, m, k] @ [h, k, n] products of attention through NumPy. oneDNN's BLAS-like functions have no
        batched form, and a call per head costs more than the product: on a Zen 3, the 288 per-head calls
        of a 124M decode step took 2-7 ms of its 35-50 ms (`picogpt bench`'s "rest of the step")."""
        if getattr(a, "ndim", 0) == 3 and getattr(b, "ndim", 0) == 3:
            return _fallback(a, b)
        return CBLAS.matmul(self, a, b)

    def _cblas_sgemm(self, order, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc):
        """cblas_sgemm's arguments (row-major flags as CBLAS enums) onto dnnl_sgemm's."""
        status = self._sgemm(_CHAR[ta], _CHAR[tb], m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)
        if status:
            raise PicogptError(f"oneDNN's sgemm failed (status {status}); use --backend numpy")

    def _bf16_works(self):
        """Whether this CPU runs oneDNN's bfloat16 product at all: one 1x1x1 product, 1 x 1 = 1."""
        one = np.array([0x3F80], np.uint16)  # bfloat16 1.0
        out = np.zeros(1, np.float32)
        status = self._lib.dnnl_gemm_bf16bf16f32(b"N", b"N", 1, 1, 1, 1.0, _pointer(one), 1, _pointer(one), 1,
                                                 0.0, _pointer(out), 1)
        return status == 0 and out[0] == 1

    @property
    def threads(self):
        """OpenMP's thread count in libgomp, which oneDNN's products use."""
        from threadpoolctl import threadpool_info
        for info in threadpool_info():
            if info["user_api"] == "openmp" and "gomp" in os.path.basename(info["filepath"]):
                return info["num_threads"]
        return None

    def _matmul_bf16(self, a, b):
        """float32 a [m, k] @ bfloat16 b [k, n]: a rounded to bfloat16, sums in float32."""
        (m, k), n = a.shape, b.shape[1]
        layout = _layout(b.strides, k, n, size=2)
        if layout is None or not m * n * k:
            return _fallback(a, b.widened())
        a16 = round_to_bfloat16(np.ascontiguousarray(a, dtype=_F32))
        (tb, ldb), c = layout, np.empty((m, n), _F32)
        status = self._gemm_bf16(b"N", _CHAR[tb], m, n, k, 1.0, _pointer(a16), k, _pointer(b), ldb, 0.0, _pointer(c), n)
        if status:
            raise PicogptError(f"oneDNN's bfloat16 product failed (status {status}); load the model with bf16='widen'")
        return c

    def _matmul_int8(self, a, b):
        """float32 a [m, k] @ Int8Matrix b [k, n] (units along n): a quantized per row to 0..126, the int8
        sums exact in int32 (dnnl_gemm_u8s8s32), then each output times its row's step and unit's scale."""
        (m, k), n = a.shape, b.shape[1]
        layout = _layout(b.values.strides, k, n, size=1)
        if layout is None or not m * n * k:
            return _fallback(a, b.widened())
        u, step, zero = int8.quantize_activations(np.ascontiguousarray(a, dtype=_F32))
        (tb, ldb), sums = layout, np.empty((m, n), np.int32)
        status = self._gemm_int8(b"N", _CHAR[tb], b"F", m, n, k, 1.0, _pointer(u), k, 0, _pointer(b.values), ldb,
                                 0, 0.0, _pointer(sums), n, _pointer(self._no_offset))
        if status:
            raise PicogptError(f"oneDNN's int8 product failed (status {status}); use --backend numpy (the weights "
                               f"are then widened to float32 at load)")
        sums -= zero[:, None] * b.sums  # (u − zero) · q = u · q − zero · Σq, exactly
        c = sums.astype(_F32)
        c *= step[:, None]
        c *= b.scale
        return c


_CHAR = {_NOTRANS: b"N", _TRANS: b"T"}


def _wheel_library(names, system_name):
    """A shared library a wheel installs under sys.prefix (lib/ on Linux and macOS, Library/bin on Windows),
    the first of names[sys.platform] found, else the system's `system_name` (ctypes.util.find_library), or None."""
    for folder in (os.path.join(sys.prefix, "lib"), os.path.join(sys.prefix, "Library", "bin")):
        for name in names.get(sys.platform, []):
            if os.path.exists(os.path.join(folder, name)):
                return os.path.join(folder, name)
    return ctypes.util.find_library(system_name)


def onednn_library():
    """libdnnl of the `onednn-cpu-gomp` wheel or of the system, or None."""
    return _wheel_library({"linux": ["libdnnl.so.3", "libdnnl.so"], "darwin": ["libdnnl.3.dylib"],
                           "win32": ["dnnl.dll"]}, "dnnl")


def mkl_library():
    """libmkl_rt of the `mkl` wheel or of the system, or None."""
    return _wheel_library({"linux": ["libmkl_rt.so.3", "libmkl_rt.so.2", "libmkl_rt.so"],
                           "darwin": ["libmkl_rt.2.dylib"], "win32": ["mkl_rt.2.dll"]}, "mkl_rt")


def cpu_features():
    """(vendor, flags) of this CPU from Linux's /proc/cpuinfo: ("GenuineIntel", {"avx512_bf16", ...});
    (None, set()) where it cannot be read (macOS, Windows)."""
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        return None, set()
    fields = dict(line.split(":", 1) for line in text.split("\n\n")[0].splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    return fields.get("vendor_id"), set(fields.get("flags", "").split())


def openblas_sources():
    """The OpenBLAS libraries found here, in the order `use("openblas")` tries them: {source: path}."""
    found = {}
    if importlib.util.find_spec("scipy_openblas32"):
        import scipy_openblas32
        lib_dir = scipy_openblas32.get_lib_dir()
        found["scipy-openblas32"] = sorted(glob.glob(os.path.join(lib_dir, "libscipy_openblas*")))
    for package in ("scipy", "numpy"):
        spec = importlib.util.find_spec(package)
        if spec and spec.origin:
            root = os.path.dirname(spec.origin)
            found[package] = sorted(glob.glob(os.path.join(root + ".libs", "lib*openblas*"))
                                    + glob.glob(os.path.join(root, ".dylibs", "lib*openblas*")))
    found["system"] = [ctypes.util.find_library("openblas")] if sys.platform != "win32" else []
    order = ("scipy-openblas32", "scipy", "system", "numpy")
    return {source: found[source][0] for source in order if found.get(source) and found[source][0]}


def _load(backend, lib):
    if backend not in BACKENDS + ("cblas",):
        raise PicogptError(f"unknown BLAS backend {backend!r}; choose one of {', '.join(BACKENDS)} "
                           "(or give lib=PATH for any CBLAS library)")
    if backend == "accelerate":
        if sys.platform != "darwin":
            raise PicogptError("the accelerate backend needs macOS (Apple's Accelerate framework); "
                               "use --backend openblas or numpy")
        return CBLAS("accelerate", lib or ACCELERATE)
    if lib is not None:
        if not os.path.exists(lib) and os.sep in lib:
            raise PicogptError(f"no BLAS library at {lib}; give the path of "
                               + ("oneDNN's libdnnl" if backend == "onednn" else "a CBLAS shared library"))
        if backend == "onednn":  # another build of oneDNN's libdnnl
            return OneDNN(lib)
        return CBLAS(backend if backend in ("openblas", "mkl") else "cblas", lib)
    if backend == "openblas":
        sources = openblas_sources()
        if not sources:
            raise PicogptError(f"no OpenBLAS library found; install one with: {install_command('openblas')}, "
                               "or use --backend numpy")
        return CBLAS("openblas", next(iter(sources.values())))
    if backend == "cblas":
        raise PicogptError("the cblas backend needs lib=PATH, the path of a CBLAS shared library")
    if backend == "mkl":
        path = mkl_library()
        if path is None:
            raise PicogptError(f"no MKL library found; install Intel's oneMKL wheel (x86-64 only) with: "
                               f"{install_command('mkl')}, or use --backend numpy")
        return CBLAS("mkl", path)
    if backend == "onednn":
        path = onednn_library()
        if path is None:
            raise PicogptError(f"no oneDNN library found; install oneDNN's wheel (x86-64 only) with: "
                               f"{install_command('onednn')}, or use --backend numpy")
        return OneDNN(path)
    return Backend()


_current = None
_limits = None  # the threadpoolctl limits in force, kept so they last until the next use()
_auto = None  # the thread count asked for, while the backend is chosen by each model's precision ("auto")
_threads = None  # the thread count use() was given (re-applied by limit_this_thread)
_native = {}  # Int8Matrix / BFloat16Matrix -> the last backend selected that multiplies it (see use())


def use(backend="numpy", lib=None, threads=None):
    """Select the BLAS that `matmul` calls, process-wide, and return it.

    backend: "numpy", "openblas", "accelerate", "mkl", "onednn", or "auto": the fastest backend for the
    precision of each model loaded next (picogpt.precision.pick_backend; NumPy's until then). lib=PATH
    loads that CBLAS library instead of searching (named "openblas" with backend="openblas", else "cblas").
    threads=N sets the thread count with threadpoolctl (the BLAS's; OpenMP's for oneDNN); None leaves the
    libraries' own counts (undoing earlier limits).
    """
    global _current, _matmul, _limits, _auto, _threads
    chosen = _load("numpy" if backend == "auto" else backend, lib)
    if _limits is not None:
        _limits.restore_original_limits()
        _limits = None
    if threads is not None:
        from threadpoolctl import threadpool_limits
        # oneDNN's products run on OpenMP's threads, attention's on the BLAS's (NumPy): limit both for it
        _limits = threadpool_limits(int(threads), user_api=None if chosen.name == "onednn" else "blas")
    _threads = threads
    if chosen._gemm_int8 is not None:
        _native[Int8Matrix] = chosen
    if chosen._gemm_bf16 is not None:
        _native[BFloat16Matrix] = chosen
    _current, _matmul = chosen, chosen.matmul
    _auto = ("auto", threads) if backend == "auto" and lib is None else None
    return chosen


def _routed(chosen):
    """chosen.matmul, except that an int8 or bfloat16 matrix goes to the backend remembered for it."""
    def matmul(a, b):
        native = _native.get(type(b))
        if native is not None and native is not chosen and getattr(chosen, _PRODUCT[type(b)]) is None:
            return native.matmul(a, b)
        return chosen.matmul(a, b)
    return matmul


_PRODUCT = {Int8Matrix: "_gemm_int8", BFloat16Matrix: "_gemm_bf16"}


def limit_this_thread():
    """Apply use()'s thread count in the calling thread too: OpenMP's count (oneDNN's threads) belongs to the
    thread that sets it, so a thread that runs products (the server's engine) takes it from here."""
    if _threads is not None and _current is not None and _current.name == "onednn":
        from threadpoolctl import threadpool_limits
        threadpool_limits(int(_threads), user_api="openmp")


def choosing_automatically():
    """(True, threads) while use("auto") is in force: each loaded model's precision picks the backend."""
    current()  # a process that has not chosen yet is "auto"
    return (True, _auto[1]) if _auto else (False, None)


def use_for_model(backend, threads, why):
    """The automatic choice (picogpt.precision) selects `backend` for a model; auto stays in force."""
    global _auto, _matmul
    chosen = use(backend, threads=threads) if current().name != backend else current()
    chosen.chosen_because = why
    _auto = ("auto", threads)
    if any(native is not chosen for native in _native.values()):
        # Models loaded earlier with int8 or native bfloat16 weights may still be in use (auto switched to
        # NumPy for a float32 model loaded since): their products keep going to the backend that multiplies
        # them. (An explicit use() is obeyed as it is: such a model's products are then widened.)
        _matmul = _routed(chosen)
    return chosen


def current():
    """The selected backend (.name, .library, .version, .threads); NumPy's unless use() chose another."""
    if _current is None:
        use("auto")
    return _current


def describe():
    """One line for -v: which library and version runs the products, and with how many threads."""
    b = current()
    ints = f", {b.int_bits}-bit ints" if b.int_bits else ""
    threads = b.threads
    why = f", chosen automatically: {b.chosen_because}" if _auto and b.chosen_because else ""
    return f"{b.name}: {b.library} ({b.version}{ints}), {threads if threads else '?'} " \
           f"thread{'' if threads == 1 else 's'}{why}"


_matmul = Backend.matmul


def matmul(a, b):
    """a @ b (float32) through the selected backend.

    The model's products are batched: [..., m, k] @ [k, n] runs as one [rows, k] @ [k, n] product with
    every row stacked (one sgemm for a whole batch, not one per sequence), and [b, h, m, k] @
    [b, h, k, n] as h*b products of one batched call. Merging axes is free for the model's arrays.
    """
    if a.ndim > 2 and b.ndim == 2:
        return _matmul(a.reshape(-1, a.shape[-1]), b).reshape(*a.shape[:-1], b.shape[-1])
    if a.ndim > 3 and a.shape[:-2] == b.shape[:-2]:
        lead = a.shape[:-2]
        product = _matmul(a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:]))
        return product.reshape(*lead, *product.shape[-2:])
    return _matmul(a, b)
