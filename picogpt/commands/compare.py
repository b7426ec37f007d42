"""picogpt against PyTorch: picogpt parity (layer by layer, on a model) and picogpt bench (timings).
PyTorch and transformers are imported when these run, never by the other subcommands."""

import json
import time

from .. import bench, blas, parity
from ..outputs import output_file, write_atomically
from .arguments import (ArgumentParser, load_model, non_negative_float, non_negative_int, positive_int,
                        threads_list)


# ---------------------------------------------------------------------------------------------------
# picogpt parity   (tools/parity.py, make parity)

def parity_parser(prog):
    p = ArgumentParser(prog=prog, description="Check picogpt against PyTorch (Hugging Face's GPT2LMHeadModel, "
                       "CPU, float32) on the same model.dat, layer by layer. Exit status 0 when everything is "
                       "within tolerance, 1 otherwise.")
    p.add_argument("--model", default=None,
                   help="124M, 355M, 774M, 1558M (looked up under --models-dir), demo, or a path to a model.dat "
                        "(default: 124M if it has been fetched, else demo)")
    p.add_argument("--models-dir", default=None,
                   help="where model sizes are looked up (default: $PICOGPT_MODELS_DIR, else the per-user "
                        "models folder)")
    p.add_argument("--prompt", default=parity.PROMPT, help="text to run through both (default: the 19-token Alan "
                   "Turing prompt; an empty prompt is <|endoftext|>)")
    p.add_argument("-n", "--n-tokens", type=non_negative_int, default=20, metavar="N",
                   help="greedy tokens to generate with each (default: 20)")
    p.add_argument("--backend", default="auto", choices=("auto",) + blas.BACKENDS,
                   help="picogpt's BLAS (default: auto, as generate's; an int8 file's products are then int8)")
    p.add_argument("--blas-lib", default=None, metavar="PATH", help="picogpt's BLAS: this CBLAS shared library")
    p.add_argument("--threads", type=positive_int, default=None, metavar="N",
                   help="threads for picogpt's BLAS and for PyTorch (default: each library's own choice)")
    p.add_argument("--reference-model", default=None, metavar="PATH",
                   help="give PyTorch the weights of this model.dat instead of --model's (same shape): "
                        "compare two conversions, or see where a changed weight shows")
    p.add_argument("--atol", type=non_negative_float, default=None,
                   help=f"absolute tolerance (default: {parity.ATOL:g}; {parity.INT8_ATOL:g} for int8 products)")
    p.add_argument("--rtol", type=non_negative_float, default=None,
                   help=f"tolerance relative to the reference's largest magnitude at each position "
                        f"(default: {parity.RTOL:g}; {parity.INT8_RTOL:g} for int8 products)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write every number to FILE as JSON")
    p.set_defaults(bf16="widen")  # a bfloat16 file: the float32 model of its rounded weights, at float32's tolerance
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def parity_command(args):
    torch, _ = parity.require_torch()  # before loading gigabytes that could not be compared
    if args.json:  # and before minutes of work whose numbers could not be written
        args.json = output_file(args.json, default_name="parity.json")
    started = time.perf_counter()
    model = load_model(args, prog=args.prog)  # the BLAS backend and threads, and the default model, as generate
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    loaded = time.perf_counter() - started
    atol, rtol = parity.tolerances(model)
    result = parity.check(model, args.prompt, args.n_tokens, atol if args.atol is None else args.atol,
                          rtol if args.rtol is None else args.rtol, args.reference_model)
    result["seconds"]["load"] += loaded
    parity.write_report(result)
    if args.json:
        write_atomically(args.json, (json.dumps(result, indent=1) + "\n").encode())
    return 0 if result["ok"] else 1


# ---------------------------------------------------------------------------------------------------
# picogpt bench   (make bench)

def bench_parser(prog):
    d = bench.DEFAULTS
    p = ArgumentParser(prog=prog, description=bench.__doc__.split("\n\n")[0].replace("\n", " "), epilog=(
        "Defaults: the 124M shape only, 5 repeats (3 for the no-cache loops, which take seconds each) after one "
        "warm-up round: about 3 minutes on an idle 2-core machine. --sizes 124M,355M adds the 355M shape, about "
        "2.3x the 124M section's time (10 minutes for both; far longer on a machine other jobs keep busy)."))
    p.add_argument("--sizes", default=d["sizes"], help="GPT-2 shapes to run: 124M, 355M or 124M,355M (default: 124M)")
    p.add_argument("--model", help="benchmark this model.dat alone instead of --sizes")
    p.add_argument("--models-dir", default=None,
                   help="where real models are found as SIZE/model.dat (default: $PICOGPT_MODELS_DIR, else the "
                        "per-user models folder); "
                        "missing ones get random weights")
    p.add_argument("--threads", type=threads_list, default=d["threads"],
                   help="thread counts for the loops (default 1,2)")
    p.add_argument("--process-threads", type=threads_list, default=d["process_threads"],
                   help="thread counts for the whole-process rows (default 2)")
    p.add_argument("--repeats", type=positive_int, default=d["repeats"], help="timed runs per contestant (default 5)")
    p.add_argument("--no-cache-repeats", type=positive_int, default=d["no_cache_repeats"],
                   help="timed runs of the no-cache loops (default 3)")
    p.add_argument("--process-repeats", type=positive_int, default=d["process_repeats"],
                   help="timed whole-process runs (default 5)")
    p.add_argument("--tokens", type=positive_int, default=d["tokens"], help="tokens to generate (default 20)")
    p.add_argument("--batch-sizes", type=threads_list, default=d["batch_sizes"],
                   help="batch sizes for the batch rows, at the most threads (default 1,4,8,16; '' for none)")
    p.add_argument("--corpus-docs", type=non_negative_int, default=d["corpus_docs"], metavar="N",
                   help="documents of the corpus-scoring rows: picogpt, PyTorch in padded batches, Ray (default "
                        "%(default)s; 0 skips them)")
    p.add_argument("--only-corpus", action="store_true", help="run the corpus rows alone")
    p.add_argument("--json", default=d["json"], help="where to write every timing (default %(default)s)")
    p.add_argument("--check", action="store_true", help="exit 1 if a target is missed (default: informational)")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: a tiny random model, 4 tokens, 1 repeat, no warm-up, 1 process run")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def bench_command(args):
    return bench.run(**{k: v for k, v in vars(args).items() if k in bench.DEFAULTS})


COMMANDS = {"parity": (parity_parser, parity_command), "bench": (bench_parser, bench_command)}
