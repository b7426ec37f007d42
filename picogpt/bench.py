"""Benchmark picogpt against PyTorch + Hugging Face transformers on the same weights: `picogpt bench`
(`make bench`), or from Python `picogpt.bench.run(sizes="124M", threads=(1, 2))`.

Workload: GPT-2's shape, the 19-token Alan Turing prompt, 20 greedy tokens (1 prefill + 19 decode steps).
Every contestant runs in this one process, round-robin: one warm-up round, then each repeat runs every
contestant once, so drift on a noisy machine hits all of them alike and ratios come from the same run.
Every contestant's tokens must equal PyTorch's, or the benchmark stops: timing wrong output is worthless.

Also measured in the same rounds: read bandwidth (the best of three BLAS kernels that read a large float32
matrix once: sgemv in either orientation and sdot, NumPy's BLAS), hence the floor of a decode step (it
reads every weight once); the step's matrix products alone; and whole processes (`python -m picogpt`
vs the same job in a PyTorch script: imports, loading, tokenizing, generating).
"""

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from . import blas, precision
from .errors import PicogptError
from .explain import explain
from .explain_page import write_page
from .bench_corpus import run_corpus_bench
from .beam import beam_search
from .generate import generate, generate_batch
from .model import GPT2
from .modelfile import ModelFileWriter, convert_dtype, open_model_file
from .parity import PROMPT  # the 19-token Alan Turing prompt
from .reference import hf_greedy
from .reference import hf_model as reference_model
from .outputs import output_file, write_atomically
from .store import load, models_dir
from .tensors import gpt2_tensor_specs
from .tokenizer import EOT, decode, encode

PROMPT_IDS = [  # encode(PROMPT), written out so that importing this module loads no tokenizer
    36235, 39141, 18765, 1143, 326, 9061, 561, 530, 1110, 1716, 845, 3665, 11, 475, 772, 339, 714, 407, 5967]
SHAPES = {"124M": dict(n_embd=768, n_head=12, n_layer=12), "355M": dict(n_embd=1024, n_head=16, n_layer=24),
          "tiny": dict(n_embd=64, n_head=4, n_layer=2)}  # tiny: --quick, the smoke test
SEEDS = {"124M": 124, "355M": 355, "tiny": 1}
LOOP, STEP, PROCESS, PROCESS_S, MEMORY, BEAM = 0.65, 1.15, 0.2, 1.2, 1.25, 0.6  # the targets, see targets()
BATCH_SIZE, BATCH = 8, 5.0  # a batch of 8 gives at least 5x the tokens/s of one prompt
EXPLAIN_TOKENS, EXPLAIN_FIXED_S = (16, 64), 1.0  # explain's page: at most 2 forward passes + EXPLAIN_FIXED_S
BF16_STEP, BF16_FLOOR, BF16_VS_TORCH_BF16, BF16_VS_TORCH, BF16_MEMORY = 0.7, 1.5, 0.5, 0.7, 0.55  # reduced_targets()
# int8: ggml's q8_0 decode step was 2.0x / 2.4x its floor at 1 / 2 threads on the Xeon of the shared notes
INT8_FLOOR, INT8_MEMORY = {1: 2.0, 2: 2.4}, 0.4
LAUNCHER = """import os, sys, time
t = time.perf_counter()
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
print(time.perf_counter() - t, usage.ru_maxrss, os.waitstatus_to_exitcode(status), file=open(sys.argv[1], "w"))"""
TORCH_CHILD = "from picogpt.bench import torch_job; torch_job({path!r}, {n}, {threads})"


# --- models ----------------------------------------------------------------------------------------

def random_model(path, hparams, seed):
    """Write a model.dat of random weights at GPT-2's scale (gains near 1, std 0.02), one tensor at a time."""
    rng = np.random.default_rng(seed)
    with ModelFileWriter(path, hparams) as out:
        for name, (shape, _) in gpt2_tensor_specs(hparams).items():
            x = rng.standard_normal(shape, dtype=np.float32) * np.float32(0.01 if name == "wpe" else 0.02)
            out.write(name, x * np.float32(5) + np.float32(1) if name.endswith("/g") else x)
    return path


def find_model(size, args, tmp):
    """(model.dat path, where its weights come from): the real model if there is one, else random weights."""
    if args.model:
        return Path(args.model), f"weights from {args.model}"
    real = Path(args.models_dir) / size / "model.dat"
    if real.exists():
        return real, f"real GPT-2 {size} weights ({real})"
    hparams = dict(n_vocab=50257, n_ctx=1024, **SHAPES[size])
    path = random_model(Path(tmp) / size / "model.dat", hparams, SEEDS[size])
    return path, f"random weights, seed {SEEDS[size]} (no {real}), in a temporary model.dat"


def hf_model(model_file):
    """GPT2LMHeadModel (eval mode, float32) holding a copy of the model file's weights, with transformers'
    default attention (the fused one: the fastest PyTorch has, which is what picogpt is timed against)."""
    return reference_model(model_file.hparams, model_file.tensors, attn_implementation=None)


def hf_generate(model, ids, n, use_cache):
    """Hugging Face greedy generate of exactly n tokens; the new token ids."""
    return hf_greedy(model, ids, n, use_cache=use_cache)


def torch_job(path, n, threads):
    """The PyTorch side of the whole-process row, run in a child: import, load, tokenize, generate, print."""
    import torch
    import transformers
    # decode, encode: the same tokenizer as picogpt's (no GPT-2 vocab.json here)
    torch.set_num_threads(threads)
    transformers.logging.set_verbosity_error()
    model = hf_model(open_model_file(path))
    print(decode(hf_generate(model, encode(PROMPT), n, use_cache=True)))


# --- contestants: setup() untimed, then run() timed, returning what it produced --------------------

def contestant(name, threads, setup, run, repeats, **tags):
    return dict(name=name, threads=threads, setup=setup, run=run, repeats=repeats, runs=[], **tags)


def picogpt_generate(model, n, use_cache):
    """picogpt.generate, timing each yielded token: steps[0] is the prefill, the rest single-token steps."""
    tokens, steps, t = [], [], time.perf_counter()
    for token in generate(model, PROMPT_IDS, n, use_cache=use_cache, stop_at_eot=False):
        now = time.perf_counter()
        tokens.append(token)
        steps.append(now - t)
        t = now
    return dict(tokens=tokens, steps=steps)


BEAMS = 4  # the beam-search rows: 4 beams, the prompt, n new tokens, <|endoftext|> ending a beam


def picogpt_beams(model, n):
    """picogpt's beam search: the best sequence's new tokens."""
    return dict(tokens=beam_search(model, [PROMPT_IDS], n, BEAMS, eos_token_id=EOT).sequences[0][0])


def hf_beams(model, n):
    """Hugging Face's generate with the same beam search: the best sequence's new tokens."""
    import torch
    prompt = torch.tensor([PROMPT_IDS])
    with torch.inference_mode():
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, num_beams=BEAMS,
                             max_new_tokens=n, eos_token_id=EOT, pad_token_id=EOT)
    new = out[0, len(PROMPT_IDS):].tolist()
    return dict(tokens=new[:new.index(EOT) + 1] if EOT in new else new)


def explain_prompt(n_tokens):
    """A text of about n_tokens tokens (the Alan Turing prompt, repeated and cut) and its token count."""
    text = decode(encode(" ".join([PROMPT] * 8))[:n_tokens])
    return text, len(encode(text))


def picogpt_explain(model, text):
    """Everything `picogpt explain` does after loading: gather the data, draw the page, write the file."""
    with tempfile.TemporaryDirectory(prefix="picogpt-explain-") as tmp:
        path = write_page(explain(model, text), Path(tmp) / "explain.html")
        return dict(bytes=path.stat().st_size)


def batch_prompts(size):
    """`size` prompts of different lengths: the Alan Turing prompt cut to 19, 18, 17, 16, 15, 19, ... tokens."""
    return [PROMPT_IDS[:len(PROMPT_IDS) - i % 5] for i in range(size)]


def picogpt_batch(model, prompts, n, together):
    """n greedy tokens after each prompt: as one batch, or one prompt after the other."""
    if together:
        return dict(batch_tokens=generate_batch(model, prompts, n, stop_at_eot=False))
    return dict(batch_tokens=[list(generate(model, p, n, stop_at_eot=False)) for p in prompts])


# Three ways to read a row-major [k, n] matrix once, front to back. Which is fastest depends on the CPU
# and the BLAS (the model multiplies as "x @ A"), so the bandwidth, and the floor, are the best of them.
READS = {"x @ A": lambda a, x, y: x @ a,  # sgemv, accumulating scaled rows of A
         "A @ y": lambda a, x, y: a @ y,  # sgemv, a dot product per row of A
         "sdot": lambda a, x, y: np.dot(a[:len(a) // 2].ravel(), a[len(a) // 2:].ravel())}  # one half by the other


def timed_calls(work, calls):
    """Time `calls` calls of work(): dict(steps=[seconds of each])."""
    steps = []
    for _ in range(calls):
        t = time.perf_counter()
        work()
        steps.append(time.perf_counter() - t)
    return dict(steps=steps)


def matrix_reads(a, kernel, calls):
    """Time `calls` reads of the whole matrix a by one of READS."""
    read, x, y = READS[kernel], np.ones(a.shape[0], a.dtype), np.ones(a.shape[1], a.dtype)
    return timed_calls(lambda: read(a, x, y), calls)


def decode_products(tensors, calls):
    """Time `calls` passes of a decode step's matrix products alone, back to back, through the selected
    backend: each weight matrix (every "/w", in file order, i.e. the model's) times one row, then wte.T
    for the logits, with none of the step's other work."""
    weights = [w for name, w in tensors.items() if name.endswith("/w")] + [tensors["wte"].T]
    rows = {w.shape[0]: np.ones((1, w.shape[0]), np.float32) for w in weights}
    return timed_calls(lambda: [blas.matmul(rows[w.shape[0]], w) for w in weights], calls)


def child_process(cmd, threads):
    """Run a command to completion: its stdout, wall time and peak resident memory.

    A lean launcher process forks it and reads wait4's ru_maxrss: Linux carries the peak of the process
    that forked a child into the child's, so forking it from this big process would report our size.
    """
    env = dict(os.environ, OPENBLAS_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads),
               MKL_NUM_THREADS=str(threads))
    with tempfile.NamedTemporaryFile("r") as report, tempfile.TemporaryFile() as err:
        p = subprocess.run([sys.executable, "-c", LAUNCHER, report.name] + cmd, stdout=subprocess.PIPE, stderr=err,
                           env=env)
        seconds, peak, status = report.read().split() or (0, 0, p.returncode)
        if p.returncode or int(status):
            err.seek(0)
            sys.exit(f"bench: {' '.join(cmd[:3])}... failed:\n{err.read().decode()}")
    kib = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is in bytes on macOS, KiB on Linux
    return dict(text=p.stdout.decode(), peak_rss=int(peak) * kib, wall=float(seconds))


def reduced_contestants(hf, path, folder, args, n):
    """The reduced-precision rows: picogpt on the same weights rounded to bfloat16, or quantized to int8
    (written to `folder` as model.dat files), multiplied natively (bfloat16 by MKL or oneDNN, int8 by oneDNN),
    its products alone, its whole process and its batches; PyTorch in bfloat16. Each is skipped, with the
    reason, where this CPU or its libraries cannot run it natively. Rounding may lead a reduced precision to
    other tokens than float32's: each kind's rows must all give the tokens of one run of it made first;
    PyTorch's bfloat16 rounds differently and is recorded only."""
    import copy

    import torch
    rows, notes = [], []
    for backend, dtype in (("mkl", "bf16"), ("onednn", "bf16"), ("onednn", "int8")):
        try:
            blas.use(backend)
            native, why = precision.bf16_support() if dtype == "bf16" else (
                blas.current()._gemm_int8 is not None, "the backend has no int8 product")
        except PicogptError as e:
            native, why = False, str(e)
        if not native:
            notes.append(f"picogpt {backend} {dtype}: skipped, {why}")
            continue
        kind, reduced_path = f"{backend} {dtype}", Path(folder) / f"{dtype}.dat"
        if not reduced_path.exists():
            convert_dtype(path, reduced_path, dtype)  # the same weights, rounded or quantized
        model = load(reduced_path, quiet=True)  # the backend selected: the matrices stay bfloat16 or int8
        assert model.precision.native, model.precision.note
        tokens = picogpt_generate(model, n, True)["tokens"]
        stored = open_model_file(reduced_path)
        layers = (("attn", "c_attn"), ("attn", "c_proj"), ("mlp", "c_fc"), ("mlp", "c_proj"))
        matrices = {"wte": model.params["wte"]}  # as loaded: bfloat16 or int8 matrices, in the model's order
        matrices.update({f"h{i}/{part}/{layer}/w": block[part][layer]["w"]
                         for i, block in enumerate(model.params["blocks"]) for part, layer in layers})
        rows += [contestant(f"picogpt {kind}, cache", t, partial(blas.use, backend, threads=t),
                            partial(picogpt_generate, model, n, True), args.repeats, system="picogpt",
                            backend=kind, cache=True, expect=tokens, step_bytes=decode_step_bytes(stored.tensors))
                 for t in args.threads]
        rows += [contestant(f"{kind} products alone", t, partial(blas.use, backend, threads=t),
                            partial(decode_products, matrices, 3), args.repeats, system="products",
                            backend=kind) for t in args.threads]
        for t in args.process_threads:
            cmd = [sys.executable, "-m", "picogpt", PROMPT, "-n", str(n), "--model", str(reduced_path), "--threads",
                   str(t), "--backend", backend]
            rows.append(contestant(f"picogpt {kind} process", t, lambda: None, partial(child_process, cmd, t),
                                   args.process_repeats, system=f"picogpt {dtype} process", backend=kind,
                                   expect=decode(tokens) + "\n"))
        t = max(args.threads)
        for size in args.batch_sizes:  # each prompt as it comes out alone from this precision, or rounded its way
            alone = picogpt_batch(model, batch_prompts(size), n, together=False)["batch_tokens"]
            rows.append(contestant(f"batch of {size}, together, {kind}", t, partial(blas.use, backend, threads=t),
                                   partial(picogpt_batch, model, batch_prompts(size), n, True), args.no_cache_repeats,
                                   system="batch reduced", backend=kind, batch=size, together=True, alone=alone,
                                   check=False))
    blas.use("numpy")
    _, flags = blas.cpu_features()
    if {"avx512_bf16", "amx_bf16"} & flags or os.environ.get(precision.BF16_ENV) == "native":
        hf_bf16 = copy.deepcopy(hf).to(torch.bfloat16)
        rows += [contestant("PyTorch bf16, cache", t, partial(torch.set_num_threads, t),
                            partial(hf_generate, hf_bf16, PROMPT_IDS, n, True), args.repeats, system="PyTorch bf16",
                            cache=True, check=False) for t in args.threads]
    else:
        notes.append("PyTorch bf16: skipped, this CPU has no bfloat16 instructions (avx512_bf16 or amx_bf16)")
    return rows, notes


def decode_step_bytes(tensors):
    """Bytes a decode step reads: every weight once, except wpe, of which one row."""
    return sum(t.nbytes for t in tensors.values()) - tensors["wpe"].nbytes + tensors["wpe"][0].nbytes


def contestants(model, hf, path, mf, args, n, reduced_folder=None):
    """Every contestant of one section, in the order each round runs them; and notes (backends skipped, why)."""
    import torch
    rows, notes, available = [], [], []
    for backend in blas.BACKENDS:
        try:
            blas.use(backend)
        except PicogptError as e:
            notes.append(f"picogpt {backend}: skipped, {e}")
            continue
        available.append(backend)
        for cache in (True, False):
            rows += [contestant(f"picogpt {backend}, {'cache' if cache else 'no cache'}", t,
                                partial(blas.use, backend, threads=t), partial(picogpt_generate, model, n, cache),
                                args.repeats if cache else args.no_cache_repeats, system="picogpt", backend=backend,
                                cache=cache) for t in args.threads]
        rows += [contestant(f"{backend} products alone", t, partial(blas.use, backend, threads=t),
                            partial(decode_products, mf.tensors, 3),
                            args.repeats, system="products", backend=backend) for t in args.threads]
    for cache in (True, False):
        rows += [contestant(f"PyTorch, {'cache' if cache else 'no cache'}", t, partial(torch.set_num_threads, t),
                            partial(hf_generate, hf, PROMPT_IDS, n, cache),
                            args.repeats if cache else args.no_cache_repeats, system="PyTorch", cache=cache)
                 for t in args.threads]
    a = np.full((256 if args.quick else 8192, 16384), 0.5, np.float32)  # 512 MiB, far beyond any cache
    rows += [contestant(f"read bandwidth, {kernel}", t, partial(blas.use, "numpy", threads=t),
                        partial(matrix_reads, a, kernel, 3), args.repeats, system="bandwidth", kernel=kernel,
                        bytes=a.nbytes) for kernel in READS for t in args.threads]
    for t in args.process_threads:
        pico = [sys.executable, "-m", "picogpt", PROMPT, "-n", str(n), "--model", str(path), "--threads", str(t)]
        torch_cmd = [sys.executable, "-c", TORCH_CHILD.format(path=str(path), n=n, threads=t)]
        rows += [contestant(f"{system} process", t, lambda: None, partial(child_process, cmd, t),
                            args.process_repeats, system=f"{system} process")
                 for system, cmd in (("picogpt", pico), ("PyTorch", torch_cmd))]
    beam_tokens = hf_beams(hf, n)["tokens"]  # what both beam searches must find
    for t in args.threads:
        rows += [contestant(f"picogpt beam {BEAMS}", t, partial(blas.use, "numpy", threads=t),
                            partial(picogpt_beams, model, n), args.repeats, system="beam", expect=beam_tokens),
                 contestant(f"PyTorch beam {BEAMS}", t, partial(torch.set_num_threads, t), partial(hf_beams, hf, n),
                            args.repeats, system="PyTorch beam", expect=beam_tokens)]
    t = max(args.threads)
    for k in EXPLAIN_TOKENS:  # the page against the plain forward pass it is made from, over the same prompt
        text, n_prompt = explain_prompt(k)
        ids = encode(text)
        rows += [contestant(f"explain page, {n_prompt} tokens", t, partial(blas.use, "numpy", threads=t),
                            partial(picogpt_explain, model, text), args.repeats, system="explain", n_prompt=n_prompt),
                 contestant(f"forward pass, {n_prompt} tokens", t, partial(blas.use, "numpy", threads=t),
                            partial(timed_calls, partial(model, ids), 1), args.repeats, system="forward",
                            n_prompt=n_prompt)]
    for size in args.batch_sizes:  # each batch's tokens must equal the prompts' run one by one (see main)
        rows += [contestant(f"batch of {size}, {'together' if together else 'one by one'}", t,
                            partial(blas.use, "numpy", threads=t),
                            partial(picogpt_batch, model, batch_prompts(size), n, together), args.no_cache_repeats,
                            system="batch", batch=size, together=together) for together in (True, False)]
        if "mkl" in available:  # MKL's small products cost less per row than OpenBLAS's: a column of its own
            rows.append(contestant(f"batch of {size}, together, mkl", t, partial(blas.use, "mkl", threads=t),
                                   partial(picogpt_batch, model, batch_prompts(size), n, True), args.no_cache_repeats,
                                   system="batch mkl", batch=size, together=True))
    if reduced_folder is not None:
        more_rows, more_notes = reduced_contestants(hf, path, reduced_folder, args, n)
        rows, notes = rows + more_rows, notes + more_notes
    blas.use("numpy")
    return rows, notes


def run_rounds(rows, warmup, settle, expected_tokens, expected_text, expected_batches):
    """Round-robin: each round runs every contestant once (those with repeats left), checking its output."""
    rounds = max(c["repeats"] for c in rows)
    for r in range(-warmup, rounds):
        print(f"round {r + 1}/{rounds}" if r >= 0 else "warm-up round", file=sys.stderr, flush=True)
        for c in rows:
            if r >= c["repeats"]:
                continue
            c["setup"]()
            time.sleep(settle)  # idle BLAS and OpenMP threads spin a while after a job: let the last one's stop
            t = time.perf_counter()
            out = c["run"]()
            elapsed = time.perf_counter() - t
            if not isinstance(out, dict):  # hf_generate returns the token list itself
                out = dict(tokens=out)
            got, want = (out["tokens"], expected_tokens) if "tokens" in out else \
                (out["batch_tokens"], expected_batches[c["batch"]]) if "batch_tokens" in out else \
                (out.get("text"), expected_text)
            want = c.get("expect", want)
            if c.get("check", True) and got is not None and got != want:
                sys.exit(f"bench: {c['name']} ({c['threads']} threads) produced {got!r}, PyTorch {want!r}")
            if r >= 0:  # a process's own wall time excludes starting the launcher
                c["runs"].append(dict(seconds=out.pop("wall", elapsed), **out))


# --- summary ---------------------------------------------------------------------------------------

def median(values):
    return statistics.median(values) if values else None


def summarize(rows, mf, n):
    """Medians, ratios, bandwidth, the decode-step floor and memory of one section, as a dict."""
    h, tensors = mf.hparams, mf.tensors
    model_bytes = sum(t.nbytes for t in tensors.values())
    s = dict(model_bytes=model_bytes, bandwidth_by_kernel={}, rows=[], decode_steps=[],
             # a decode step reads every weight once, except wpe: one row of it
             decode_step_bytes=decode_step_bytes(tensors),
             kv_cache_bytes=2 * h["n_layer"] * (len(PROMPT_IDS) + n) * h["n_embd"] * 4)  # the positions filled
    seconds = {id(c): median([run["seconds"] for run in c["runs"]]) for c in rows}
    by_name = {}  # (name, threads): seconds; a name says everything that sets a row apart (cache, backend...)
    for c in rows:
        if (c["name"], c["threads"]) in by_name:  # a ratio must never come from the wrong row
            raise AssertionError(f"two benchmark rows are named {c['name']!r} at {c['threads']} threads")
        by_name[c["name"], c["threads"]] = seconds[id(c)]
    s["reduced_step_bytes"] = {c["backend"]: c["step_bytes"] for c in rows if "step_bytes" in c}
    products = {}  # (backend, threads): seconds of a decode step's matrix products alone
    for c in rows:
        if c["system"] in ("bandwidth", "products"):
            each = median([x for run in c["runs"] for x in run["steps"]])
            if c["system"] == "bandwidth":
                s["bandwidth_by_kernel"].setdefault(c["threads"], {})[c["kernel"]] = c["bytes"] / each
                s["bandwidth_matrix_bytes"] = c["bytes"]
            else:
                products[c["backend"], c["threads"]] = each
    s["bandwidth"] = {t: max(kernels.values()) for t, kernels in s["bandwidth_by_kernel"].items()}
    s["batches"] = []
    for size in sorted({c["batch"] for c in rows if c["system"] == "batch"}):
        together, alone = (next(c for c in rows if c["system"] == "batch" and c["batch"] == size
                                and c["together"] == t) for t in (True, False))
        s["batches"].append(dict(batch=size, threads=together["threads"], together_s=seconds[id(together)],
                                 one_by_one_s=seconds[id(alone)], tokens_per_s=size * n / seconds[id(together)],
                                 one_by_one_tokens_per_s=size * n / seconds[id(alone)],
                                 speedup=seconds[id(alone)] / seconds[id(together)],
                                 runs=[r["seconds"] for r in together["runs"]],
                                 one_by_one_runs=[r["seconds"] for r in alone["runs"]]))
        mkl = next((c for c in rows if c["system"] == "batch mkl" and c["batch"] == size), None)
        if mkl is not None:
            s["batches"][-1].update(mkl_together_s=seconds[id(mkl)], mkl_tokens_per_s=size * n / seconds[id(mkl)],
                                    mkl_runs=[r["seconds"] for r in mkl["runs"]])
        for c in (c for c in rows if c["system"] == "batch reduced" and c["batch"] == size):
            # Rounding may tip a near tie another way in a batch than alone (the activations' levels are per row,
            # but attention's float32 sums are not the same): how many of the prompts' texts agree, said
            agree = sum(a == b for a, b in zip(c["runs"][0]["batch_tokens"], c["alone"]))
            s["batches"][-1].setdefault("reduced", {})[c["backend"]] = dict(
                together_s=seconds[id(c)], tokens_per_s=size * n / seconds[id(c)],
                runs=[r["seconds"] for r in c["runs"]], same_as_alone=f"{agree} of {size}")
    s["explain"] = []
    for c in (c for c in rows if c["system"] == "explain"):
        forward = next(f for f in rows if f["system"] == "forward" and f["n_prompt"] == c["n_prompt"])
        s["explain"].append(dict(tokens=c["n_prompt"], threads=c["threads"], explain_s=seconds[id(c)],
                                 forward_s=seconds[id(forward)], bytes=c["runs"][0]["bytes"],
                                 runs=[r["seconds"] for r in c["runs"]], forward_runs=[r["seconds"] for r in forward["runs"]]))
    for c in (c for c in rows if c["system"] not in ("bandwidth", "products", "batch", "batch mkl", "batch reduced",
                                                     "explain", "forward")):
        ref = by_name.get((reference_row(c), c["threads"]))
        row = {k: v for k, v in c.items() if k not in ("setup", "run")}
        row.update(median_s=seconds[id(c)], ratio=ref and seconds[id(c)] / ref, tokens_per_s=n / seconds[id(c)])
        if c["system"].endswith("process"):
            row["peak_rss_bytes"] = median([run["peak_rss"] for run in c["runs"]])
        if c["system"] == "picogpt" and c["cache"]:
            step = median([x for run in c["runs"] for x in run["steps"][1:]])
            s["decode_steps"].append(dict(backend=c["backend"], threads=c["threads"], loop_s=row["median_s"],
                                          ratio=row["ratio"], prefill_s=median([run["steps"][0] for run in c["runs"]]),
                                          decode_step_s=step, products_s=products[c["backend"], c["threads"]],
                                          floor_s=c.get("step_bytes", s["decode_step_bytes"])
                                          / s["bandwidth"][c["threads"]]))
        s["rows"].append(row)
    s["targets"] = [dict(what=w, target=t, passed=bool(ok)) for w, t, ok in targets(s, h)]
    return s


def reference_row(c):
    """The name of the PyTorch row a row's ratio is taken against: the process, the beam search, or the
    cached loop (never the uncached one), at the same thread count."""
    if c["system"].endswith("process"):
        return "PyTorch process"
    if c["system"] in ("beam", "PyTorch beam"):
        return f"PyTorch beam {BEAMS}"
    return "PyTorch, cache"


def targets(s, h):
    """(what, target, passed) for the issue's targets; the loop and step ones for the best backend."""
    yield from reduced_targets(s)
    for e in s["explain"]:
        fixed = e["explain_s"] - 2 * e["forward_s"]
        yield f"explain page, {e['tokens']} tokens, {e['threads']}t: {e['explain_s']:.2f} s = 2 x the forward pass " \
              f"({e['forward_s']:.3f} s) + {fixed:.2f} s", f"+ < {EXPLAIN_FIXED_S} s", fixed < EXPLAIN_FIXED_S
    for r in (r for r in s["rows"] if r["system"] == "beam" and r["ratio"] is not None):
        yield f"beam search ({BEAMS} beams), {r['threads']}t: {r['ratio']:.2f}x Hugging Face's generate", \
            f"<= {BEAM}x", r["ratio"] <= BEAM
    sizes = {b["batch"]: b for b in s["batches"]}
    if 1 in sizes and BATCH_SIZE in sizes:  # each way of running the batch against its own batch of 1
        one, many = sizes[1], sizes[BATCH_SIZE]
        kinds = [("numpy", one["tokens_per_s"], many["tokens_per_s"])]
        if "mkl_tokens_per_s" in many:
            kinds.append(("mkl", one["mkl_tokens_per_s"], many["mkl_tokens_per_s"]))
        kinds += [(kind, one["reduced"][kind]["tokens_per_s"], x["tokens_per_s"])
                  for kind, x in many.get("reduced", {}).items()]
        for kind, single, batched in kinds:
            yield f"batch of {BATCH_SIZE}, {kind}, {many['threads']}t: {batched / single:.2f}x batch 1's tokens/s", \
                f">= {BATCH}x", batched / single >= BATCH
    for t in sorted({d["threads"] for d in s["decode_steps"]}):
        steps = [d for d in s["decode_steps"] if d["threads"] == t and d["backend"] in blas.BACKENDS]  # float32
        best = min(steps, key=lambda d: d["loop_s"])
        if best["ratio"] is not None:
            yield f"cached loop, {best['backend']}, {t}t: {best['ratio']:.2f}x PyTorch's", f"<= {LOOP}x", \
                best["ratio"] <= LOOP
        best = min(steps, key=lambda d: d["decode_step_s"])
        x = best["decode_step_s"] / best["floor_s"]
        yield f"decode step, {best['backend']}, {t}t: {x:.2f}x the floor", f"<= {STEP}x", x <= STEP
    procs = {r["system"]: r for r in s["rows"] if r["system"].endswith("process")}  # the last: most threads
    if "picogpt process" in procs:
        p = procs["picogpt process"]
        if p["ratio"] is not None:
            yield f"whole process, {p['threads']}t: {p['ratio']:.2f}x PyTorch's", f"<= {PROCESS}x", p["ratio"] <= PROCESS
        if (h["n_layer"], h["n_embd"]) == (12, 768):
            yield f"whole process, {p['threads']}t: {p['median_s']:.2f} s", f"< {PROCESS_S} s", p["median_s"] < PROCESS_S
        x = p["peak_rss_bytes"] / (s["model_bytes"] + s["kv_cache_bytes"])
        yield f"peak memory {p['peak_rss_bytes'] / 1e6:.0f} MB: {x:.2f}x model + KV cache", f"<= {MEMORY}x", x <= MEMORY


def reduced_targets(s):
    """The reduced-precision targets, where their rows ran: each decode step against float32 picogpt's and its
    own floor, bfloat16 loops against PyTorch's (cached) loops, and each process's peak memory against the
    float32 process's."""
    loops = {(r["name"], r["threads"]): r["median_s"] for r in s["rows"]}
    for d in [d for d in s["decode_steps"] if d["backend"] not in blas.BACKENDS]:  # "mkl bf16", "onednn int8"
        t, dtype = d["threads"], d["backend"].split()[-1]
        f32 = min((x for x in s["decode_steps"] if x["threads"] == t and x["backend"] in blas.BACKENDS),
                  key=lambda x: x["decode_step_s"])
        x = d["decode_step_s"] / f32["decode_step_s"]
        if dtype == "bf16":
            yield f"{d['backend']} decode step, {t}t: {x:.2f}x picogpt {f32['backend']} float32's", \
                f"<= {BF16_STEP}x", x <= BF16_STEP
        floor_target = BF16_FLOOR if dtype == "bf16" else INT8_FLOOR[min(t, 2)]
        x = d["decode_step_s"] / d["floor_s"]
        yield f"{d['backend']} decode step, {t}t: {x:.2f}x the {dtype} floor", f"<= {floor_target}x", x <= floor_target
        if dtype == "bf16":
            for ref, target in (("PyTorch bf16, cache", BF16_VS_TORCH_BF16), ("PyTorch, cache", BF16_VS_TORCH)):
                if (ref, t) in loops:
                    x = d["loop_s"] / loops[ref, t]
                    yield f"{d['backend']} loop, {t}t: {x:.2f}x {ref.split(',')[0]}'s", f"<= {target}x", x <= target
    f32 = next((r for r in s["rows"] if r["name"] == "picogpt process"), None)
    for r in (r for r in s["rows"] if r["system"] in ("picogpt bf16 process", "picogpt int8 process") and f32):
        target = BF16_MEMORY if "bf16" in r["system"] else INT8_MEMORY
        x = r["peak_rss_bytes"] / f32["peak_rss_bytes"]
        yield f"{r['backend']} process peak memory: {x:.2f}x float32's", f"<= {target}x", x <= target


def print_section(title, s, notes, n):
    print(f"\n== {title}")
    print(f"{'contestant':<26}{'threads':>8}{'median s':>10}{'vs PyTorch':>12}{'tokens/s':>10}{'runs':>6}")
    for r in s["rows"]:
        ratio = f"{r['ratio']:.2f}x" if r["ratio"] is not None else "-"
        print(f"{r['name']:<26}{r['threads']:>8}{r['median_s']:>10.3f}{ratio:>12}{r['tokens_per_s']:>10.1f}"
              f"{len(r['runs']):>6}" + (f"   peak {r['peak_rss_bytes'] / 1e6:.0f} MB" if "peak_rss_bytes" in r else ""))
    print("\n".join(notes))
    print(f"(vs PyTorch: loops against PyTorch's cached loop, processes against the PyTorch process, at the "
          f"same thread count; tokens/s = {n} / median)")
    for t, kernels in s["bandwidth_by_kernel"].items():
        each = ", ".join(f"{k} {b / 1e9:.1f}" for k, b in kernels.items())
        print(f"read bandwidth, {t}t: {s['bandwidth'][t] / 1e9:.1f} GB/s, the best of NumPy's BLAS reading a "
              f"{s['bandwidth_matrix_bytes'] / 2**20:.0f} MiB float32 matrix once ({each} GB/s)")
    print(f"a decode step reads {s['decode_step_bytes'] / 1e6:.1f} MB of weights (all but wpe's unused rows)"
          + "".join(f"; {b / 1e6:.1f} MB {kind.split()[-1]}" for kind, b in s["reduced_step_bytes"].items()) + ":")
    for d in s["decode_steps"]:
        floor = d["floor_s"]
        print(f"  picogpt {d['backend']}, {d['threads']}t: floor {1e3 * floor:.1f} ms; decode step "
              f"{1e3 * d['decode_step_s']:.1f} ms ({d['decode_step_s'] / floor:.2f}x the floor, "
              f"{floor / d['decode_step_s']:.0%} of bandwidth); its matrix products alone "
              f"{1e3 * d['products_s']:.1f} ms ({d['products_s'] / floor:.2f}x), the rest of the step "
              f"{1e3 * (d['decode_step_s'] - d['products_s']):.1f} ms; prefill {1e3 * d['prefill_s']:.0f} ms")
    print("  (matrix products alone: the same weights times one row, back to back, with nothing else between)")
    print(f"model {s['model_bytes'] / 1e6:.1f} MB + KV cache {s['kv_cache_bytes'] / 1e6:.1f} MB "
          f"({len(PROMPT_IDS)} + {n} positions)")
    if s["batches"]:
        print(f"batches: prompts of 15-19 tokens, {n} greedy tokens each, picogpt numpy with the cache, "
              f"{s['batches'][0]['threads']} threads")
        mkl = "mkl_tokens_per_s" in s["batches"][0]
        print(f"{'batch':>7}{'together s':>12}{'tokens/s':>10}{'one by one s':>14}{'tokens/s':>10}{'speed-up':>10}"
              + (f"{'mkl tokens/s':>14}{'vs batch 1':>12}" if mkl else ""))
        for b in s["batches"]:
            print(f"{b['batch']:>7}{b['together_s']:>12.3f}{b['tokens_per_s']:>10.1f}{b['one_by_one_s']:>14.3f}"
                  f"{b['one_by_one_tokens_per_s']:>10.1f}{b['speedup']:>9.2f}x"
                  + (f"{b['mkl_tokens_per_s']:>14.1f}"
                     f"{b['mkl_tokens_per_s'] / s['batches'][0]['mkl_tokens_per_s']:>11.2f}x" if mkl else ""))
        if mkl:
            print("  (mkl: the same batches through --backend mkl; vs batch 1: its tokens/s over batch 1's)")
        for kind in s["batches"][0].get("reduced", {}):
            one = s["batches"][0]["reduced"][kind]["tokens_per_s"]
            print(f"  {kind}: " + ", ".join(f"batch {b['batch']} {b['reduced'][kind]['tokens_per_s']:.1f} tokens/s "
                                           f"({b['reduced'][kind]['tokens_per_s'] / one:.2f}x; "
                                           f"{b['reduced'][kind]['same_as_alone']} texts as alone)"
                                           for b in s["batches"]))
    for e in s["explain"]:
        print(f"explain page, {e['tokens']} tokens, {e['threads']}t: {e['explain_s']:.3f} s, {e['bytes'] / 1e6:.2f} MB "
              f"({e['explain_s'] / e['forward_s']:.1f}x the plain forward pass of the prompt, {e['forward_s']:.3f} s)")
    for t in s["targets"]:
        print(f"{'PASS' if t['passed'] else 'FAIL'}  {t['what']} (target {t['target']})")
    print(f"(this section took {s['seconds']:.0f} s)")


def cpu_name():
    """The CPU's model name; on Linux also its family/model numbers and widest vector extension (virtual
    machines often show a bare "AMD EPYC", and the vector width decides how fast a product can be)."""
    if not os.path.exists("/proc/cpuinfo"):
        return platform.processor() or platform.machine()
    info = {}
    for line in open("/proc/cpuinfo"):
        key, _, value = line.partition(":")
        info.setdefault(key.strip(), value.strip())
    flags = info.get("flags", "").split()
    vector = next((f.upper() for f in ("avx512f", "avx2", "avx", "sse2") if f in flags), "")
    return ", ".join(x for x in (info.get("model name", platform.processor()),
                                 "family {} model {}".format(info["cpu family"], info["model"])
                                 if "cpu family" in info and "model" in info else "", vector) if x)


def machine():
    import threadpoolctl
    import torch
    import transformers
    libs = [f"{i['internal_api']} {i['version']} ({os.path.basename(i['filepath'])}, {i.get('architecture')})"
            for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return dict(cpu=cpu_name(), cores=cores,
                platform=platform.platform(), python=platform.python_version(), numpy=np.__version__,
                blas=libs, picogpt_blas=blas.describe(), torch=torch.__version__, transformers=transformers.__version__,
                load_average=round(os.getloadavg()[0], 2),
                # settings that change which BLAS kernels run (OPENBLAS_CORETYPE picks OpenBLAS's CPU kernels)
                blas_environment={k: v for k, v in sorted(os.environ.items())
                                  if k.startswith(("OPENBLAS_", "OMP_", "MKL_", "VECLIB_", "GOTO"))})


# The options of `run`, with their defaults (picogpt.cli's `bench` parser documents each).
DEFAULTS = dict(sizes="124M", model=None, models_dir=None, threads=[1, 2], process_threads=[2], repeats=5,
                no_cache_repeats=3, process_repeats=5, tokens=20, batch_sizes=[1, 4, 8, 16],
                json="bench-results.json", check=False, quick=False, corpus_docs=2000, only_corpus=False)


def run(**options):
    """Run the benchmark, printing each section as it completes; every timing is written to the JSON
    file options["json"]. Returns 1 if options["check"] and a target is missed, else 0."""
    unknown = set(options) - set(DEFAULTS)
    if unknown:
        raise TypeError(f"unknown benchmark option {sorted(unknown)[0]!r}; the options are {', '.join(DEFAULTS)}")
    args = SimpleNamespace(**{**DEFAULTS, **options})
    args.models_dir = str(models_dir(args.models_dir))  # a folder named but missing is an error
    args.json = output_file(args.json, default_name="bench-results.json")  # before minutes of timing
    warmup = 1
    if args.quick:
        args.sizes, args.tokens, args.repeats, args.no_cache_repeats, args.process_repeats = "tiny", 4, 1, 1, 1
        args.process_threads, args.batch_sizes, warmup = args.process_threads[-1:], [1, BATCH_SIZE], 0
        args.corpus_docs = min(args.corpus_docs, 40)
    import transformers
    transformers.logging.set_verbosity_error()
    started, n = time.perf_counter(), args.tokens
    results = dict(machine=machine(), prompt_ids=PROMPT_IDS, n_tokens=n, warmup_rounds=warmup, sections={},
                   settings={k: v for k, v in vars(args).items() if k not in ("json", "check")})
    print("\n".join(f"{k}: {v}" for k, v in results["machine"].items()))
    print(f"workload: {len(PROMPT_IDS)}-token prompt, {n} greedy tokens; median of {args.repeats} runs "
          f"({args.no_cache_repeats} without cache, {args.process_repeats} whole processes) after {warmup} "
          f"warm-up round, all contestants interleaved; the PyTorch process tokenizes with picogpt's tokenizer")
    if results["machine"]["load_average"] > 0.5:
        print("warning: other processes are using the CPU (load average above); timings suffer, 2-thread ones most")
    with tempfile.TemporaryDirectory(prefix="picogpt-bench-") as tmp:
        for size in [args.model] if args.model else args.sizes.split(","):
            section_started = time.perf_counter()
            path, source = find_model(size, args, tmp)
            mf = open_model_file(path)
            tensors, _ = precision.weights_for_backend(mf, "widen")  # float32 rows: bfloat16 weights widened
            mf = SimpleNamespace(hparams=mf.hparams, tensors=tensors, path=mf.path)
            model, hf = GPT2(mf.hparams, mf.tensors, path=mf.path), hf_model(mf)
            if args.corpus_docs and "corpus" not in results:  # the first size's model scores the corpus
                results["corpus"] = run_corpus_bench(model, hf, path, args.corpus_docs, max(args.threads))
            if args.only_corpus:
                continue
            expected = hf_generate(hf, PROMPT_IDS, n, use_cache=True)
            reduced_folder = Path(tmp) / f"{size}-reduced"
            reduced_folder.mkdir()
            rows, notes = contestants(model, hf, path, mf, args, n, reduced_folder=reduced_folder)
            # A batch must give each prompt what it gets alone, which for the full prompt is PyTorch's.
            batches = {size: picogpt_batch(model, batch_prompts(size), n, together=False)["batch_tokens"]
                       for size in args.batch_sizes}
            if any(b[0] != expected for b in batches.values()):
                sys.exit(f"bench: picogpt produced {batches[args.batch_sizes[0]][0]!r}, PyTorch {expected!r}")
            run_rounds(rows, warmup, 0 if args.quick else 0.2, expected, decode(expected) + "\n", batches)
            s = summarize(rows, mf, n)
            title = f"{size}: {source}; n_layer {mf.hparams['n_layer']}, n_embd {mf.hparams['n_embd']}"
            s["seconds"] = time.perf_counter() - section_started
            print_section(title, s, notes, n)
            results["sections"][size] = dict(source=source, hparams=mf.hparams, tokens=expected, notes=notes, **s)
            del model, hf, mf, rows
    results["seconds"], results["load_average_at_end"] = time.perf_counter() - started, round(os.getloadavg()[0], 2)
    write_atomically(args.json, (json.dumps(results, indent=1, default=str) + "\n").encode())
    print(f"\ntook {results['seconds']:.0f} s; every timing in {args.json}")
    failed = [t for s in [*results["sections"].values(), results.get("corpus", {"targets": []})]
              for t in s["targets"] if not t["passed"]]
    return 1 if args.check and failed else 0

