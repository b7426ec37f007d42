"""picogpt bench runs end to end (--quick: a tiny random model, 4 tokens, one repeat) and writes its JSON.

No timing is asserted here; this checks the script works, its output has the promised structure, and
every contestant generated the same tokens as PyTorch (the benchmark refuses to time wrong output).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


HAS_MKL = __import__("picogpt.blas").blas.mkl_library() is not None


@pytest.mark.parametrize("bf16", ["as this CPU allows", "native"])
def test_quick_bench_writes_consistent_results(tmp_path, bf16):
    if bf16 == "native" and not HAS_MKL:
        pytest.skip("Intel's oneMKL wheel is not installed (pip install mkl; x86-64 only)")
    out = tmp_path / "x.json"
    env = dict(os.environ, PICOGPT_BF16="native") if bf16 == "native" else \
        {k: v for k, v in os.environ.items() if k != "PICOGPT_BF16"}
    corpus_docs = ["--corpus-docs", "0"] if bf16 == "native" else []  # the corpus rows once is enough
    p = subprocess.run([sys.executable, "-m", "picogpt", "bench", "--quick", "--json", str(out), *corpus_docs],
                       capture_output=True, text=True, cwd=REPO, timeout=600, env=env)
    assert p.returncode == 0, p.stderr
    results = json.loads(out.read_text())
    assert {"machine", "prompt_ids", "n_tokens", "sections", "seconds"} <= set(results)
    assert {"cpu", "cores", "numpy", "blas", "torch"} <= set(results["machine"])
    (section,) = results["sections"].values()
    assert {"source", "hparams", "tokens", "rows", "bandwidth", "decode_steps", "targets", "model_bytes",
            "decode_step_bytes", "kv_cache_bytes", "notes"} <= set(section)
    assert len(section["tokens"]) == results["n_tokens"] == 4

    rows = section["rows"]
    systems = {r["system"] for r in rows}
    assert {"picogpt", "PyTorch", "picogpt process", "PyTorch process"} <= systems
    for r in rows:
        assert r["runs"] and r["median_s"] > 0 and r["tokens_per_s"] > 0 and "threads" in r
        for run in r["runs"]:
            if r["system"] in ("picogpt", "PyTorch") and "bf16" not in r["name"]:  # bf16 may round its way
                assert run["tokens"] == section["tokens"], r["name"]
    assert any(r["system"] == "picogpt" and r["backend"] == "numpy" and r["cache"] for r in rows)
    assert {(r["system"], r["cache"]) for r in rows if "cache" in r} - {("PyTorch bf16", True)} == {
        ("picogpt", True), ("picogpt", False), ("PyTorch", True), ("PyTorch", False)}
    # bfloat16: rows where it runs natively (forced here by PICOGPT_BF16=native), else a note saying why not
    bf16_rows = [r for r in rows if r.get("backend") == "mkl bf16"]
    if bf16 == "native":
        assert {r["threads"] for r in bf16_rows} == {1, 2} and any(r["system"] == "PyTorch bf16" for r in rows)
        assert any(r["system"] == "picogpt bf16 process" for r in rows)
        assert sum("bf16" in t["what"] for t in section["targets"]) >= 6
        assert section["bf16_decode_step_bytes"] < 0.6 * section["decode_step_bytes"]
    else:
        assert bf16_rows or any(n.startswith("picogpt mkl bf16: skipped, ") for n in section["notes"])
    # The whole-process rows printed the same text, and measured the child's own memory.
    procs = [r for r in rows if r["system"].endswith("process")]
    assert len({run["text"] for r in procs if "bf16" not in r["system"] for run in r["runs"]}) == 1
    assert all(r["peak_rss_bytes"] > 0 for r in procs)

    assert all(b > 0 for b in section["bandwidth"].values())
    for threads, kernels in section["bandwidth_by_kernel"].items():  # the floor uses the fastest read
        assert set(kernels) == {"x @ A", "A @ y", "sdot"} and section["bandwidth"][threads] == max(kernels.values())
    for step in section["decode_steps"]:
        assert {"backend", "threads", "decode_step_s", "prefill_s", "floor_s"} <= set(step)
        assert step["products_s"] > 0  # the same step's matrix products alone, timed on the same backend
    assert all({"what", "target", "passed"} <= set(t) for t in section["targets"])
    # Batches (--quick: sizes 1 and 3), timed together and one by one, their tokens checked alike.
    assert [b["batch"] for b in section["batches"]] == [1, 3]
    for b in section["batches"]:
        assert b["together_s"] > 0 and b["one_by_one_s"] > 0 and b["speedup"] > 0 and b["runs"]
        assert ("mkl_tokens_per_s" in b) == HAS_MKL  # the MKL column
        assert b["tokens_per_s"] == pytest.approx(b["batch"] * 4 / b["together_s"])
    # explain's page against the plain forward pass over the same prompt
    assert [e["tokens"] for e in section["explain"]] == [16, 64]
    for e in section["explain"]:
        assert e["explain_s"] > 0 and e["forward_s"] > 0 and e["bytes"] > 10_000 and e["runs"] and e["forward_runs"]
    assert sum(t["what"].startswith("explain page, ") for t in section["targets"]) == 2
    # the corpus rows: picogpt in process, PyTorch in padded batches, Ray (or why it was skipped)
    if bf16 == "native":
        assert "corpus" not in results
        return
    c = results["corpus"]
    assert c["docs"] == 40 and c["tokens"] > 40 * 20 and c["worst_nll_difference"] < 1e-4
    assert c["picogpt"]["tokens_per_s"] > 0 and c["torch"]["tokens_per_s"] > 0 and c["picogpt"]["rss"] >= 0
    assert ("tokens_per_s" in c["ray"] and c["ray"]["actors"]) or "needs Ray" in c["ray"]["skipped"]
    assert any(t["what"].startswith("corpus scoring") for t in c["targets"])
    assert "PASS" in p.stdout or "FAIL" in p.stdout
