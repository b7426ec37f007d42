"""picogpt serve: an OpenAI-compatible completion server (picogpt.serve, on Ray Serve with --ray:
picogpt.serve_ray); picogpt serve-bench: its concurrency benchmark (picogpt.bench_serve)."""

import os
import sys
from pathlib import Path

from ..errors import BadArgument, PicogptError
from ..hints import install_command
from ..shipped import DEMO
from .arguments import (ArgumentParser, add_model_arguments, load_model, non_negative_float, number_kind, positive_int,
                        threads_list)

DEFAULT_PORT = 8000
port_number = number_kind("a port number from 0 to 65535", int, lambda v: 0 <= v <= 65535)  # 0: a free one


def serve_parser(prog):
    p = ArgumentParser(prog=prog, description="Serve the model over HTTP with OpenAI's completions API "
                       "(POST /v1/completions, GET /v1/models, GET /health), decoding concurrent requests in one "
                       "batch. See docs/serve.md.")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: 127.0.0.1, this machine only; 0.0.0.0 for every network)")
    p.add_argument("--port", type=port_number, default=DEFAULT_PORT,
                   help=f"port (default: {DEFAULT_PORT}; 0: a free one)")
    p.add_argument("--api-key", default=None, metavar="KEY",
                   help="require Authorization: Bearer KEY on /v1/ (default: $PICOGPT_API_KEY; none if unset)")
    p.add_argument("--model-name", default=None, metavar="NAME",
                   help="the model's id in the API (default: the --model given, or its folder's name)")
    p.add_argument("--max-batch", type=positive_int, default=16, metavar="N",
                   help="most choices decoded at once; more wait for a free slot (default: 16)")
    p.add_argument("--grace", type=non_negative_float, default=10.0, metavar="S",
                   help="on SIGTERM or Ctrl-C, seconds requests in flight have to finish before they are ended "
                        "(default: 10)")
    p.add_argument("--ray", default=None, metavar="ADDRESS",
                   help="serve as a Ray Serve deployment on the cluster at ADDRESS (auto, local, or HOST:PORT)")
    p.add_argument("--replicas", type=positive_int, default=None, metavar="N",
                   help="with --ray: how many copies of the server (default: 2)")
    p.add_argument("-v", "--verbose", action="store_true", help="log every request (never its key)")
    add_model_arguments(p)
    return p


def model_id(args, model):
    """The name clients give as `model`: --model-name, else --model's size or name, else the file's folder."""
    if args.model_name:
        return args.model_name
    if args.model and not Path(args.model).suffix and os.sep not in args.model:
        return args.model
    return Path(model.path).parent.name if model.path else DEMO


def require_serve_libraries():
    """FastAPI and uvicorn are there (found, not imported: only picogpt.serve imports them), or one line."""
    import importlib.util
    if not all(importlib.util.find_spec(name) for name in ("fastapi", "uvicorn")):
        raise PicogptError(f"picogpt serve needs FastAPI and uvicorn, which are not installed: "
                           f"{install_command('serve')}")


def serve_command(args):
    if args.replicas is not None and not args.ray:
        raise BadArgument("--replicas sets how many copies Ray Serve runs; it needs --ray")
    if not 0 <= args.port <= 65535:
        raise BadArgument(f"--port must be from 0 to 65535, not {args.port}")
    if not 0 <= args.grace <= 3600:
        raise BadArgument(f"--grace must be a number of seconds from 0 to 3600, not {args.grace}")
    api_key = args.api_key if args.api_key is not None else os.environ.get("PICOGPT_API_KEY") or None
    require_serve_libraries()
    from .. import serve
    from ..memory import check_memory
    from ..scheduler import Engine

    model = load_model(args, args.prog)
    name = model_id(args, model)
    check_memory(model.hparams, args.max_batch, 1, model.hparams["n_ctx"],
                 remedy="give a smaller --max-batch")  # the slot cache when every slot holds a whole context
    if args.ray:
        from .. import serve_ray
        return serve_ray.run(args.ray, model, name, args.replicas or 2, host=args.host, port=args.port,
                             api_key=api_key, max_rows=args.max_batch, threads=args.threads or 1,
                             backend=args.backend, say=lambda line: print(f"{args.prog}: {line}", flush=True))
    engine = Engine(model, max_rows=args.max_batch).start()
    try:
        serve.run_server(engine, name, args.host, args.port, api_key, args.grace, access_log=args.verbose,
                         say=lambda line: print(f"{args.prog}: {line}", flush=True))
    finally:
        engine.stop()
    print(f"{args.prog}: stopped", file=sys.stderr, flush=True)
    return 0


def serve_bench_parser(prog):
    p = ArgumentParser(prog=prog, description="Time concurrent completion streams through the scheduler: aggregate "
                       "tokens/s and time to first token at 1, 2, 4, 8 and 16 streams, with same-run ratios to one "
                       "stream. Random weights of GPT-2 124M's shape unless --model names a model.")
    p.add_argument("--streams", type=threads_list, default=[1, 2, 4, 8, 16], metavar="N,N,..",
                   help="concurrent stream counts (default: 1,2,4,8,16)")
    p.add_argument("-n", "--n-tokens", type=positive_int, default=64, metavar="N",
                   help="tokens per stream (default: 64)")
    p.add_argument("--prompt-tokens", type=positive_int, default=16, metavar="N",
                   help="tokens of each stream's prompt (default: 16)")
    p.add_argument("--repeats", type=positive_int, default=1, metavar="N",
                   help="runs of each row; the best is kept (default: 1)")
    p.add_argument("--http", action="store_true",
                   help="go through the HTTP server on 127.0.0.1 (streaming requests) instead of the scheduler alone")
    add_model_arguments(p)
    p.set_defaults(threads=None)
    return p


def serve_bench_command(args):
    import tempfile

    from .. import blas
    from ..bench_serve import SEED, random_124m, run_serve_bench
    if args.http:
        require_serve_libraries()
    with tempfile.TemporaryDirectory() as folder:
        if args.model:
            model, weights = load_model(args, args.prog), f"the model {args.model}"
        else:
            blas.use(args.backend, lib=args.blas_lib, threads=args.threads)
            model, weights = random_124m(folder), f"random weights of GPT-2 124M's shape (seed {SEED})"
        return run_serve_bench(model, weights, args.streams, args.n_tokens, args.prompt_tokens, args.repeats,
                               args.http)


COMMANDS = {"serve": (serve_parser, serve_command), "serve-bench": (serve_bench_parser, serve_bench_command)}
