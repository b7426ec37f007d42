"""The corpus commands on a Ray cluster: `picogpt score-corpus ... --ray auto` (or --ray ADDRESS, or
--ray local for a cluster of this machine alone). Imported only with --ray; Ray is picogpt's `ray` extra
(`pip install -e '.[ray]'` in the checkout, or `pip install 'ray[data]>=2.10'`).

The plan's chunks (picogpt.corpus.plan: where each chunk's documents are, not the documents) become a Ray
dataset; map_batches runs them on a pool of actors (ChunkWorker), one chunk per call, each actor with
num_cpus=T so that its BLAS gets T threads. The model's arrays go into Ray's object store once, from the
driver: every node then holds one copy, which its actors read in place (zero-copy), so only the driver
needs the model file. Each actor reads its chunks' documents from the input files, which must therefore
be at the same path on every node (on one machine they are). The driver receives the chunks' lines in
plan order and appends them exactly as the in-process path does (picogpt.corpus.CorpusOutput), so the
output, and resuming it, are the same; a chunk whose actor dies is run again by a new actor.
"""

import logging
import os
from types import SimpleNamespace

from . import blas
from .corpus import Chunk, CorpusJob, read_chunk
from .errors import PicogptError
from .hints import install_command
from .model import GPT2
from .modelfile import open_model_file
from .precision import weights_for_backend


def require_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise PicogptError(f"--ray needs Ray, which is not installed: {install_command('ray')}") from None
    return ray


def memory_of_this_process():
    """(resident, proportional) set size in bytes: RSS counts every shared page in full, PSS divides each
    by the processes sharing it, so a weight held once per node shows as a fraction in each actor's PSS."""
    try:
        with open("/proc/self/smaps_rollup") as f:
            fields = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f if line.split()[-1] == "kB"}
        return fields.get("Rss", 0), fields.get("Pss", 0)
    except OSError:  # not Linux
        return 0, 0


class ChunkWorker:
    """A Ray Data actor: makes the model once from the weights in the object store, then runs chunks."""

    def __init__(self, weights, hparams, weight_dtype, job_options, threads, backend="numpy", bf16=None):
        import ray
        if isinstance(weights, ray.ObjectRef):
            weights = ray.get(weights)  # read-only NumPy arrays over the object store's memory: no copy
        blas.use(backend, threads=threads)  # the driver's backend and bfloat16 choice: the driver's numbers
        tensors, precision = weights_for_backend(SimpleNamespace(tensors=weights, weight_dtype=weight_dtype, path=None),
                                                 bf16)
        model = GPT2(hparams, tensors)
        model.precision = precision
        self.job = CorpusJob(model, **job_options)

    def __call__(self, batch):
        out = {key: [] for key in ("number", "text", "n_tokens", "n_errors", "pid", "rss", "pss")}
        for item in batch["chunk"]:
            chunk = Chunk.from_json(item)
            text, n_tokens, n_errors = self.job.run(read_chunk(chunk))
            rss, pss = memory_of_this_process()
            for key, value in zip(out, (chunk.number, text, n_tokens, n_errors, os.getpid(), rss, pss)):
                out[key].append(value)
        return out


def connect(address, n_cpus):
    """Join the cluster at address ("auto": the one this machine belongs to), or start a local one."""
    ray = require_ray()
    if ray.is_initialized():  # a caller (a notebook, the tests) already has a cluster
        return ray
    options = dict(include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    try:
        if address == "local":
            ray.init(num_cpus=n_cpus, **options)
        else:
            ray.init(address=address, **options)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise PicogptError(f"cannot join the Ray cluster at {address}: {str(e).splitlines()[0]}; start one with "
                           f"`ray start --head`, or use --ray local for this machine alone") from None
    return ray


def run_on_ray(address, model_path, job_options, chunks, output, progress, workers, threads, memory=None,
               backend="numpy", bf16=None):
    """Run the chunks on the cluster's actors and append their lines in plan order, the actors computing with
    the given BLAS backend and bfloat16 choice ("native" or "widen", as the driver's model). memory: a dict
    that receives each actor's last (rss, pss) by process id."""
    ray = connect(address, workers * threads)
    model_file = open_model_file(model_path)
    weights = ray.put(dict(model_file.tensors))  # one copy in the object store, whatever the number of actors
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True  # lines come back in plan order
    context.enable_progress_bars = False  # picogpt's own bar counts documents and tokens
    context.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.ERROR)  # its progress notes; errors still show
    workers = max(1, min(workers, len(chunks)))  # no more actors than chunks
    dataset = ray.data.from_items([{"chunk": chunk.to_json()} for chunk in chunks], override_num_blocks=len(chunks))
    # Ray Data restarts an actor that dies and runs its chunk again (max_restarts and max_task_retries -1).
    results = dataset.map_batches(
        ChunkWorker, batch_size=1, compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=threads,
        fn_constructor_kwargs=dict(weights=weights, hparams=model_file.hparams, weight_dtype=model_file.weight_dtype,
                                   job_options=job_options, threads=threads, backend=backend, bf16=bf16))
    expected = iter(chunks)
    for row in results.iter_rows():
        chunk = next(expected)
        if row["number"] != chunk.number:
            raise PicogptError(f"Ray returned chunk {row['number']} where chunk {chunk.number} was due")
        output.write(row["text"], chunk.n_docs)
        progress.update(chunk.n_docs, row["n_tokens"], row["n_errors"])
        if memory is not None:
            memory[row["pid"]] = (row["rss"], row["pss"])
