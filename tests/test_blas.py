"""picogpt.blas: every backend found here gives np.matmul's products, for every product the model makes.

OpenBLAS comes from several places; each is a parameter, skipped (with the reason) where absent:
SciPy's bundled copy (always here: scipy is a dependency), NumPy's bundled 64-bit-int copy, the
scipy-openblas32 wheel, the system's libopenblas. PICOGPT_TEST_CBLAS=PATH[:PATH...] adds any other
CBLAS library (MKL's libmkl_rt, BLIS...) as "cblas".
"""

import ctypes.util
import os
import sys

import numpy as np
import pytest
from threadpoolctl import threadpool_info

from picogpt import blas
from picogpt.blas import matmul  # imported once, as the model does: must follow use()
from picogpt.errors import PicogptError

SOURCES = blas.openblas_sources()
MISSING = {
    "scipy": "SciPy's bundled OpenBLAS not found (pip install scipy)",
    "numpy": "NumPy's bundled OpenBLAS not found (NumPy built against another BLAS)",
    "scipy-openblas32": "the scipy-openblas32 wheel is not installed (pip install scipy-openblas32)",
    "system": "no system libopenblas (e.g. apt install libopenblas0-pthread)",
}
EXTRA = [path for path in os.environ.get("PICOGPT_TEST_CBLAS", "").split(os.pathsep) if path]
CASES = (["numpy", "accelerate", "mkl"] + [f"openblas:{source}" for source in MISSING]
         + [f"cblas:{path}" for path in EXTRA])


@pytest.fixture(autouse=True)
def restore_numpy():
    """Whatever a test selects, the next one (in any file) starts from NumPy's matmul at default threads."""
    yield
    blas.use("numpy")


class Counter:
    """Stands in for a ctypes function and counts the calls that reach it."""

    def __init__(self, function):
        self.function, self.calls = function, 0

    def __call__(self, *args):
        self.calls += 1
        return self.function(*args)


def select(case, variant="default"):
    """use() the backend `case` names (skipping if it is absent here), with its ctypes calls counted."""
    kind, _, where = case.partition(":")
    if kind == "accelerate" and sys.platform != "darwin":
        pytest.skip("Apple's Accelerate exists on macOS only")
    if kind == "openblas" and where not in SOURCES:
        pytest.skip(MISSING[where])
    if kind == "mkl" and blas.mkl_library() is None:
        pytest.skip("Intel's oneMKL wheel is not installed (pip install mkl; x86-64 only)")
    backend = blas.use(kind, lib=SOURCES.get(where) or where or None)
    if kind != "numpy":
        for name in ("_gemm", "_gemv", "_batch"):
            if getattr(backend, name) is not None:
                setattr(backend, name, Counter(getattr(backend, name)))
        if variant == "loop":  # products one at a time, as where sgemm_batch_strided is missing
            backend._batch = None
        if variant == "gemm-only":  # single rows through sgemm, as where sgemv is missing
            backend._gemv = None
    return backend


def calls(backend):
    return sum(getattr(backend, name).calls for name in ("_gemm", "_gemv", "_batch")
               if isinstance(getattr(backend, name, None), Counter))


def model_products(m, length, n_batch=1, seed=0, n_embd=768, n_head=12, n_ctx=64, n_vocab=1031):
    """(name, a, b) for each product GPT-2 makes on m new tokens of n_batch sequences with `length`
    positions cached, with the model's shapes and memory layouts."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n_batch, m, n_embd), dtype=np.float32)
    w = rng.standard_normal((n_embd, 3 * n_embd), dtype=np.float32) * 0.02
    wte = np.asfortranarray(rng.standard_normal((n_vocab, n_embd), dtype=np.float32) * 0.02)
    qkv = rng.standard_normal((n_batch, m, 3 * n_embd), dtype=np.float32)
    x_columns = rng.standard_normal((n_embd, m + 2), dtype=np.float32)
    q = qkv[..., :n_embd].reshape(n_batch, m, n_head, -1).transpose(0, 2, 1, 3)  # [b, h, m, hd], strided
    keys, values = (rng.standard_normal((n_batch, n_head, n_ctx, n_embd // n_head), dtype=np.float32) for _ in "kv")
    probs = rng.random((n_batch, n_head, m, length), dtype=np.float32)
    return [
        ("x @ w", x, w),
        ("x[-1:] @ w", x[:, -1:], w),
        ("x as 2-D @ w", x[0], w),
        ("qkv columns @ w[:, :n_embd]", qkv[..., :n_embd], w[:, :n_embd]),
        ("x @ wte.T, wte F-order", x, wte.T),
        ("x @ wte.T, wte C-order", x, np.ascontiguousarray(wte).T),
        ("columns as rows (TransA) @ w", x_columns[:, :m].T, w),
        ("q @ k^T, cache slice", q, keys[:, :, :length].swapaxes(-1, -2)),
        ("probs @ v, cache slice", probs, values[:, :, :length]),
        ("contiguous batch", np.ascontiguousarray(q), np.ascontiguousarray(keys[:, :, :length].swapaxes(-1, -2))),
        ("3-D batch", q[0], keys[0, :, :length].swapaxes(-1, -2)),
    ]


def assert_matches(got, a, b):
    want = np.matmul(a, b)
    assert got.shape == want.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("m, length", [(1, 20), (19, 19), (1, 1)], ids=["decode", "prefill", "first"])
@pytest.mark.parametrize("case, variant", [("numpy", "default")] + [
    (case, variant) for case in CASES[1:] for variant in ("default", "loop", "gemm-only")])
@pytest.mark.parametrize("n_batch", [1, 3])
def test_model_products_match_numpy(case, variant, m, length, n_batch, monkeypatch):
    backend = select(case, variant)
    if case != "numpy":  # every model product must reach the library, not np.matmul
        def fallback(a, b):
            pytest.fail(f"fell back to np.matmul: {a.shape} @ {b.shape}")
        monkeypatch.setattr(blas, "_fallback", fallback)
    for name, a, b in model_products(m, length, n_batch):
        before = calls(backend)
        assert_matches(matmul(a, b), a, b)
        assert case == "numpy" or calls(backend) > before, name


@pytest.mark.parametrize("case", CASES[1:])
def test_other_products_fall_back_to_numpy(case):
    backend = select(case)
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((2, 3, 5)), rng.standard_normal((2, 5, 4))
    c = rng.standard_normal((3, 5), dtype=np.float32)
    for x, y in [(a, b), (c, c.T.astype(np.float64)), (c, c[0]),
                 (c[:, ::-1], c.T), (c[:, :0], c[:0]), (a.astype(np.float32), b[:1].astype(np.float32))]:
        np.testing.assert_allclose(matmul(x, y), np.matmul(x, y), rtol=1e-6)
    assert calls(backend) == 0
    rows_2_apart = c[::2]  # fits BLAS: lda = 10
    np.testing.assert_allclose(matmul(rows_2_apart, c.T[:, ::2]), rows_2_apart @ c.T[:, ::2], rtol=1e-5)
    assert calls(backend) == 1


def test_default_environment_has_openblas():
    assert "scipy" in SOURCES, "SciPy's bundled OpenBLAS must be found: the openblas tests need it"
    assert blas.use("openblas").name == "openblas"
    assert blas.current().library == next(iter(SOURCES.values()))


@pytest.mark.parametrize("source", list(MISSING))
def test_the_library_asked_for_is_the_one_that_ran(source):
    backend = select(f"openblas:{source}")
    loaded = [os.path.realpath(info["filepath"]) for info in threadpool_info()]
    assert os.path.realpath(backend.library) in loaded
    line = blas.describe()
    assert line.startswith(f"openblas: {backend.library} (OpenBLAS ") and "\n" not in line
    assert blas.current() is backend and backend.version.startswith("OpenBLAS 0.")
    expected_bits = 64 if source == "numpy" else 32  # NumPy's copy is ILP64 (scipy_cblas_sgemm64_)
    assert backend.int_bits == expected_bits and f"{expected_bits}-bit ints" in line
    before = calls(backend)
    matmul(np.ones((2, 3), np.float32), np.ones((3, 4), np.float32))
    assert calls(backend) == before + 1


@pytest.mark.parametrize("case", ["numpy", "openblas:scipy"])
def test_threads_are_set_reported_and_restored(case):
    kind, _, source = case.partition(":")
    lib = SOURCES.get(source)
    default = blas.use(kind, lib=lib).threads
    if default is None:
        pytest.skip("threadpoolctl does not see NumPy's BLAS here (e.g. Accelerate on macOS)")
    assert blas.use(kind, lib=lib, threads=1).threads == 1
    assert blas.describe().endswith(", 1 thread")
    assert blas.use(kind, lib=lib, threads=2).threads == 2
    assert blas.describe().endswith(", 2 threads")
    assert blas.use(kind, lib=lib).threads == default  # no threads= undoes the limit


def one_line_error(**kwargs):
    with pytest.raises(PicogptError) as error:
        blas.use(**kwargs)
    message = str(error.value)
    assert message and "\n" not in message
    return message


@pytest.mark.skipif(sys.platform == "darwin", reason="Accelerate exists on macOS")
def test_accelerate_off_macos_is_a_clear_error():
    message = one_line_error(backend="accelerate")
    assert "macOS" in message and "openblas" in message and "numpy" in message


def test_bad_choices_are_clear_errors(tmp_path):
    message = one_line_error(backend="nope")
    assert "'nope'" in message and all(name in message for name in blas.BACKENDS)
    assert "no BLAS library at /nonexistent/libblas.so" in one_line_error(lib="/nonexistent/libblas.so")
    not_a_library = tmp_path / "libfake.so"
    not_a_library.write_text("not ELF")
    assert "cannot load" in one_line_error(lib=str(not_a_library))
    assert "lib=PATH" in one_line_error(backend="cblas")
    assert blas.current().name == "numpy"  # a failed use() leaves the selection alone


@pytest.mark.skipif(not ctypes.util.find_library("m"), reason="no libm to load")
def test_a_library_without_cblas_is_a_clear_error():
    assert "has no CBLAS sgemm" in one_line_error(lib=ctypes.util.find_library("m"))
