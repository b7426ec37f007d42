"""The corpus part of `picogpt bench`: scoring a generated corpus (documents of 20-400 tokens) with
picogpt in one process, with Hugging Face's GPT2LMHeadModel in padded batches at the same thread count,
and with picogpt on a local Ray cluster of single-thread actors; every document's score checked against
Hugging Face's, and the Ray output against the in-process one.

Also measured: each Ray actor's resident and proportional memory (RSS, PSS). The weights are in Ray's
object store once; an actor that reads them counts them in full in its RSS but only its share in its PSS.
"""

import json
import random
import sys
import tempfile
import time
from pathlib import Path

from . import blas
from .corpus import BATCH_TOKENS, CorpusJob, CorpusOutput, Progress, batches_by_length, plan, read_chunk
from .corpus_ray import memory_of_this_process  # (it imports Ray only inside its functions)
from .errors import PicogptError
from .tokenizer import EOT, decode, encode

DOC_TOKENS = (20, 400)  # each document's length, uniform in this range
IN_PROCESS_VS_TORCH, RAY_VS_IN_PROCESS = 1.0, 0.8  # the targets: tokens/s ratios
NLL_TOLERANCE = 1e-4


def generated_corpus(path, n_docs, seed=0):
    """A .jsonl of n_docs documents of 20-400 tokens of English-like text (sampled common tokens)."""
    rng = random.Random(seed)
    words = [w for w in decode(list(range(256, 8000))).split() if w.isalpha()]  # common whole words
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n_docs):
            n = rng.randint(*DOC_TOKENS)
            text = " ".join(rng.choice(words) for _ in range(n))
            f.write(json.dumps({"id": i, "text": decode(encode(text)[:n])}) + "\n")
    return path


def picogpt_in_process(model, corpus_path, threads):
    """Score every chunk here: (seconds, tokens, {id: mean_nll}, output text)."""
    blas.use("numpy", threads=threads)
    job, chunks = CorpusJob(model, "score"), plan([corpus_path])
    texts, n_tokens = [], 0
    started = time.perf_counter()
    for chunk in chunks:
        text, tokens, _ = job.run(read_chunk(chunk))
        texts.append(text)
        n_tokens += tokens
    seconds = time.perf_counter() - started
    records = [json.loads(line) for line in "".join(texts).splitlines()]
    return seconds, n_tokens, {r["id"]: r["mean_nll"] for r in records}, "".join(texts)


def torch_padded_batches(hf, corpus_path, threads, batch_tokens):
    """Hugging Face scoring the same documents in padded batches grouped by length, as picogpt groups them:
    (seconds, tokens, {id: mean_nll})."""
    import torch
    torch.set_num_threads(threads)
    docs = [json.loads(line) for line in open(corpus_path, encoding="utf-8")]
    batches = list(batches_by_length([(d["id"], [EOT] + encode(d["text"])) for d in docs], batch_tokens))
    nll, n_tokens = {}, 0
    started = time.perf_counter()
    with torch.inference_mode():
        for batch in batches:
            longest = max(len(ids) for _, ids in batch)
            ids = torch.tensor([ids + [0] * (longest - len(ids)) for _, ids in batch])  # padded on the right
            mask = torch.tensor([[1] * len(ids) + [0] * (longest - len(ids)) for _, ids in batch])
            log_probs = torch.log_softmax(hf(ids, attention_mask=mask).logits[:, :-1].float(), dim=-1)
            picked = log_probs.gather(-1, ids[:, 1:, None])[..., 0] * mask[:, 1:]
            for row, (doc_id, doc_ids) in enumerate(batch):
                nll[doc_id] = -float(picked[row].sum()) / (len(doc_ids) - 1)
                n_tokens += len(doc_ids)
    return time.perf_counter() - started, n_tokens, nll


def picogpt_on_ray(model_path, corpus_path, workers, threads_per_worker, out_path):
    """Score on a local Ray cluster (started before the clock): (seconds, tokens, output text, memory)."""
    from .corpus_ray import connect, run_on_ray
    ray = connect("local", workers * threads_per_worker)
    try:
        chunks = plan([corpus_path])
        output = CorpusOutput(out_path, {"bench": True})
        remaining = output.open(chunks)
        progress, memory = Progress(sum(c.n_docs for c in chunks), 0, show=False), {}
        started = time.perf_counter()
        run_on_ray("local", model_path, dict(task="score"), remaining, output, progress, workers, threads_per_worker,
                   memory=memory, bf16="widen")  # as the in-process rows: float32 products
        seconds = time.perf_counter() - started
        output.close()
        return seconds, progress.tokens, Path(out_path).read_text(encoding="utf-8"), memory
    finally:
        ray.shutdown()


def run_corpus_bench(model, hf, model_path, n_docs, threads, workers=2):
    """The corpus rows, as a dict; prints them too."""
    with tempfile.TemporaryDirectory(prefix="picogpt-corpus-") as tmp:
        corpus_path = generated_corpus(Path(tmp) / "corpus.jsonl", n_docs)
        print(f"corpus: {n_docs} documents of {DOC_TOKENS[0]}-{DOC_TOKENS[1]} tokens", file=sys.stderr, flush=True)
        ours_s, ours_tokens, ours_nll, ours_text = picogpt_in_process(model, corpus_path, threads)
        rss, pss = memory_of_this_process()
        torch_s, torch_tokens, torch_nll = torch_padded_batches(hf, corpus_path, threads, BATCH_TOKENS)
        worst = max(abs(ours_nll[i] - torch_nll[i]) for i in torch_nll)
        if worst > NLL_TOLERANCE or ours_tokens != torch_tokens:
            raise PicogptError(f"corpus bench: picogpt's scores differ from PyTorch's by up to {worst:.2e} nats")
        ray_row = None
        try:
            ray_s, ray_tokens, ray_text, memory = picogpt_on_ray(model_path, corpus_path, workers, 1,
                                                                 Path(tmp) / "ray.jsonl")
            if not same_records(ray_text, ours_text):
                raise PicogptError("corpus bench: the Ray output differs from the in-process output")
            ray_row = dict(seconds=ray_s, tokens_per_s=ray_tokens / ray_s, workers=workers,
                           actors=[dict(pid=pid, rss=m[0], pss=m[1]) for pid, m in sorted(memory.items())])
        except PicogptError as e:
            if "needs Ray" not in str(e):
                raise
            ray_row = dict(skipped=str(e))
    result = dict(docs=n_docs, tokens=ours_tokens, threads=threads, worst_nll_difference=worst,
                  picogpt=dict(seconds=ours_s, tokens_per_s=ours_tokens / ours_s, rss=rss, pss=pss),
                  torch=dict(seconds=torch_s, tokens_per_s=torch_tokens / torch_s), ray=ray_row)
    result["targets"] = list(corpus_targets(result))
    print_corpus(result)
    return result


def same_records(ray_text, ours_text):
    """Whether two score files hold the same documents, in the same order, with the same token counts and
    the same scores up to float rounding. Byte for byte they are the same only at the same BLAS thread
    count: the actors run 1 thread, the in-process row several, and OpenBLAS may then sum a product in
    another order (on an AMD EPYC Zen 3, 1 and 2 threads differ in the last bits)."""
    ray, ours = ([json.loads(line) for line in text.splitlines()] for text in (ray_text, ours_text))
    return len(ray) == len(ours) and all(
        a.keys() == b.keys() and all(abs(a[k] - b[k]) <= 1e-6 * max(1.0, abs(b[k])) if isinstance(b[k], float)
                                     else a[k] == b[k] for k in b)
        for a, b in zip(ray, ours))


def corpus_targets(r):
    x = r["picogpt"]["tokens_per_s"] / r["torch"]["tokens_per_s"]
    yield dict(what=f"corpus scoring, {r['threads']}t: {x:.2f}x PyTorch's tokens/s",
               target=f">= {IN_PROCESS_VS_TORCH}x", passed=x >= IN_PROCESS_VS_TORCH)
    if r["ray"] and "tokens_per_s" in r["ray"]:
        x = r["ray"]["tokens_per_s"] / r["picogpt"]["tokens_per_s"]
        yield dict(what=f"corpus on Ray, {r['ray']['workers']} x 1t: {x:.2f}x in-process {r['threads']}t",
                   target=f">= {RAY_VS_IN_PROCESS}x", passed=x >= RAY_VS_IN_PROCESS)


def print_corpus(r):
    print(f"\n== corpus: {r['docs']} documents, {r['tokens']:,} tokens, scored (scores within "
          f"{r['worst_nll_difference']:.1e} nats of PyTorch's)")
    print(f"{'contestant':<34}{'seconds':>9}{'tokens/s':>10}")
    rows = [(f"picogpt in process, {r['threads']}t", r["picogpt"]),
            (f"PyTorch padded batches, {r['threads']}t", r["torch"])]
    if r["ray"] and "tokens_per_s" in r["ray"]:
        rows.append((f"picogpt on Ray, {r['ray']['workers']} actors x 1t", r["ray"]))
    for name, row in rows:
        print(f"{name:<34}{row['seconds']:>9.1f}{row['tokens_per_s']:>10.0f}")
    print(f"picogpt in process: RSS {r['picogpt']['rss'] / 1e6:.0f} MB, PSS {r['picogpt']['pss'] / 1e6:.0f} MB")
    if r["ray"] and "actors" in r["ray"]:
        for a in r["ray"]["actors"]:
            print(f"Ray actor {a['pid']}: RSS {a['rss'] / 1e6:.0f} MB, PSS {a['pss'] / 1e6:.0f} MB")
    elif r["ray"]:
        print(f"Ray: skipped, {r['ray']['skipped']}")
    for t in r["targets"]:
        print(f"{'PASS' if t['passed'] else 'FAIL'}  {t['what']} (target {t['target']})")

