"""picogpt bench runs end to end (--quick: a tiny random model, 4 tokens, one repeat) and writes its JSON.

No timing is asserted here; this checks the script works, its output has the promised structure, and
every contestant generated the same tokens as PyTorch (the benchmark refuses to time wrong output).
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


from picogpt import blas  # noqa: E402

HAS_MKL = blas.mkl_library() is not None
HAS_ONEDNN = blas.onednn_library() is not None


def ratio_in(line):
    """The x of "...: 0.59x ..." in a target line."""
    return float(re.search(r": ([\d.]+)x ", line).group(1))


def check_target_ratios(section):
    """Every ratio a target line prints, computed again from the rows it names: the cached loops against
    PyTorch's cached loop (never its uncached one, which shares its system and threads), beams against
    PyTorch's beams, batches against their own batch of 1, processes' memory against float32's."""
    seconds = {(r["name"], r["threads"]): r["median_s"] for r in section["rows"]}
    names = [(r["name"], r["threads"]) for r in section["rows"]]
    assert len(names) == len(set(names))  # rows cannot collide
    checked = 0
    for t in section["targets"]:
        what = t["what"]
        m = re.match(r"cached loop, (\w+), (\d)t: ", what)
        if m:
            want = seconds[f"picogpt {m[1]}, cache", int(m[2])] / seconds["PyTorch, cache", int(m[2])]
        elif m := re.match(r"beam search \(4 beams\), (\d)t: ", what):
            want = seconds["picogpt beam 4", int(m[1])] / seconds["PyTorch beam 4", int(m[1])]
        elif m := re.match(r"(\S+ \S+) loop, (\d)t: [\d.]+x (PyTorch(?: bf16)?)'s", what):
            want = seconds[f"picogpt {m[1]}, cache", int(m[2])] / seconds[f"{m[3]}, cache", int(m[2])]
        elif m := re.match(r"batch of (\d+), (.+), (\d)t: ", what):
            batches = {b["batch"]: b for b in section["batches"]}
            one, many = batches[1], batches[int(m[1])]
            kind = m[2]
            pick = (lambda b: b["tokens_per_s"]) if kind == "numpy" else (lambda b: b["mkl_tokens_per_s"]) \
                if kind == "mkl" else (lambda b: b["reduced"][kind]["tokens_per_s"])
            want = pick(many) / pick(one)
        elif m := re.match(r"(\S+ \S+) process peak memory: ", what):
            rss = {r["name"]: r["peak_rss_bytes"] for r in section["rows"] if "peak_rss_bytes" in r}
            want = rss[f"picogpt {m[1]} process"] / rss["picogpt process"]
        else:
            continue
        assert ratio_in(what) == pytest.approx(want, abs=0.006), what
        checked += 1
    assert checked >= 3


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
            if r["system"] in ("picogpt", "PyTorch") and r.get("backend") in blas.BACKENDS + (None,):
                assert run["tokens"] == section["tokens"], r["name"]  # (bf16 and int8 may round their way)
    assert any(r["system"] == "picogpt" and r["backend"] == "numpy" and r["cache"] for r in rows)
    assert {(r["system"], r["cache"]) for r in rows if "cache" in r} - {("PyTorch bf16", True)} == {
        ("picogpt", True), ("picogpt", False), ("PyTorch", True), ("PyTorch", False)}
    # bfloat16: rows where it runs natively (forced here by PICOGPT_BF16=native), else a note saying why not
    bf16_rows = [r for r in rows if r.get("backend") == "mkl bf16"]
    if bf16 == "native":
        assert {r["threads"] for r in bf16_rows} == {1, 2} and any(r["system"] == "PyTorch bf16" for r in rows)
        assert any(r["system"] == "picogpt bf16 process" for r in rows)
        assert sum("bf16" in t["what"] for t in section["targets"]) >= 6
        assert section["reduced_step_bytes"]["mkl bf16"] < 0.6 * section["decode_step_bytes"]
    else:
        assert bf16_rows or any(n.startswith("picogpt mkl bf16: skipped, ") for n in section["notes"])
    # The whole-process rows printed the same text, and measured the child's own memory.
    procs = [r for r in rows if r["system"].endswith("process")]
    assert len({run["text"] for r in procs if r["name"] in ("picogpt process", "PyTorch process")
                for run in r["runs"]}) == 1
    assert all(r["peak_rss_bytes"] > 0 for r in procs)

    assert all(b > 0 for b in section["bandwidth"].values())
    for threads, kernels in section["bandwidth_by_kernel"].items():  # the floor uses the fastest read
        assert set(kernels) == {"x @ A", "A @ y", "sdot"} and section["bandwidth"][threads] == max(kernels.values())
    for step in section["decode_steps"]:
        assert {"backend", "threads", "decode_step_s", "prefill_s", "floor_s"} <= set(step)
        assert step["products_s"] > 0  # the same step's matrix products alone, timed on the same backend
    assert all({"what", "target", "passed"} <= set(t) for t in section["targets"])
    check_target_ratios(section)
    # int8 through oneDNN: its rows, with a quarter of the bytes, or the note saying why not
    int8_rows = [r for r in rows if r.get("backend") == "onednn int8"]
    if HAS_ONEDNN:
        assert {r["system"] for r in int8_rows} == {"picogpt", "picogpt int8 process"}
        assert section["reduced_step_bytes"]["onednn int8"] < 0.3 * section["decode_step_bytes"]
        assert sum("int8" in t["what"] for t in section["targets"]) == 4  # 2 floors, memory, batch of 8
    else:
        assert any(n.startswith("picogpt onednn int8: skipped, ") for n in section["notes"])
    # Batches (--quick: sizes 1 and 8), timed together and one by one, their tokens checked alike.
    assert [b["batch"] for b in section["batches"]] == [1, 8]
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
