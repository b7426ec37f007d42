"""Command lines: `python -m picogpt` (generate, verify) and tools/convert_tf_checkpoint.py (fetch, convert).

Argument parsing and printing only; the work is done by the package's Python API. A user mistake or a
fault (PicogptError) prints one line on stderr and exits 1, a bad argument one line and exits 2, Ctrl-C
exits 130; --debug shows the traceback instead.
"""

import argparse
import sys
import time

from .blas import BACKENDS
from .errors import PicogptError
from .store import DEFAULT_BASE_URL, MODEL_SIZES


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line (argparse's default prints the whole usage first)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {one_line(message)}; see {self.prog} --help\n")


def one_line(message):
    """A message that prints as one line even if it quotes user input holding line breaks."""
    return " ".join(str(message).splitlines())


def positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative")
    return value


def run(prog, command, args):
    """Run command(args), turning PicogptError and Ctrl-C into one line on stderr and an exit status."""
    try:
        return command(args) or 0
    except PicogptError as e:
        if args.debug:
            raise
        if getattr(args, "mid_line", False):  # end the half-printed continuation first
            print(flush=True)
        print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if args.debug:
            raise
        if getattr(args, "mid_line", False):
            print(flush=True)
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


# ---------------------------------------------------------------------------------------------------
# python -m picogpt "prompt" -n 20

def generate_parser():
    p = ArgumentParser(prog="picogpt", description="Generate text with GPT-2, computed in NumPy. "
                       "`picogpt verify MODEL` checks a model file instead.")
    p.add_argument("prompt", nargs="?", default=None,
                   help="text to continue (default: read standard input if it is not a terminal; "
                        "an empty prompt starts from <|endoftext|>)")
    p.add_argument("-f", "--prompt-file", default=None, metavar="FILE",
                   help="read the prompt from a UTF-8 text file ('-' for standard input)")
    p.add_argument("-n", "--n-tokens", type=positive_int, default=20, metavar="N",
                   help="number of tokens to generate (default: 20)")
    p.add_argument("--model", default="124M",
                   help=f"{', '.join(MODEL_SIZES)} or a path to a model.dat (default: 124M)")
    p.add_argument("--models-dir", default=None,
                   help="where model sizes are looked up (default: $PICOGPT_MODELS_DIR or ./models)")
    p.add_argument("--download", action="store_true",
                   help="download and convert the model if it is missing (needs picogpt[convert])")
    p.add_argument("--base-url", default=DEFAULT_BASE_URL, help="mirror of OpenAI's checkpoints, for --download")
    p.add_argument("--no-cache", action="store_true",
                   help="recompute the whole sequence for every token instead of using the KV cache")
    p.add_argument("--backend", default="numpy", choices=BACKENDS,
                   help="which BLAS multiplies the matrices: NumPy's own (default), an OpenBLAS found "
                        "automatically, or Apple's Accelerate (macOS)")
    p.add_argument("--blas-lib", default=None, metavar="PATH",
                   help="use this CBLAS shared library (MKL's libmkl_rt, BLIS, a system OpenBLAS...)")
    p.add_argument("--threads", type=positive_int, default=None, metavar="N",
                   help="BLAS threads (default: the library's own choice, usually one per core)")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="report the model, BLAS, tokens and timings on stderr")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def read_prompt(args):
    """The prompt: the argument, else the file (or standard input), decoded as strict UTF-8."""
    if args.prompt is not None:
        if args.prompt_file is not None:
            raise PicogptError("give the prompt as an argument or with --prompt-file, not both")
        return args.prompt
    if args.prompt_file in (None, "-"):
        if args.prompt_file is None and sys.stdin.isatty():
            return ""
        name, data = "standard input", sys.stdin.buffer.read()
    else:
        name = args.prompt_file
        try:
            with open(name, "rb") as f:
                data = f.read()
        except OSError as e:
            raise PicogptError(f"cannot read the prompt file {name}: {e.strerror}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise PicogptError(f"the prompt in {name} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset "
                           f"{e.start}); save it as UTF-8") from None


def generate_command(args, started=None):
    from . import blas
    from .generate import check_fits, generate
    from .store import load
    from .tokenizer import EOT, StreamDecoder, load_tokenizer

    if args.threads == 0:
        raise PicogptError("--threads must be at least 1")
    blas.use(args.backend, lib=args.blas_lib, threads=args.threads)
    t0 = time.perf_counter()
    model = load(args.model, models_dir=args.models_dir, download=args.download, base_url=args.base_url)
    t1 = time.perf_counter()
    tokenizer = load_tokenizer()
    ids = tokenizer.encode(read_prompt(args), allowed_special={"<|endoftext|>"}) or [EOT]
    check_fits(model, len(ids), args.n_tokens)
    t2 = time.perf_counter()

    stream = StreamDecoder(tokenizer)
    new_ids, step_times = [], []
    t_step = time.perf_counter()
    for token in generate(model, ids, args.n_tokens, use_cache=not args.no_cache):
        step_times.append(time.perf_counter() - t_step)
        new_ids.append(token)
        sys.stdout.write(stream.push(token))
        sys.stdout.flush()
        args.mid_line = True
        t_step = time.perf_counter()
    sys.stdout.write(stream.flush() + "\n")
    sys.stdout.flush()

    if args.verbose:
        h = model.hparams
        decode = step_times[1:]
        lines = [
            f"model: {model.path} ({model.n_params / 1e6:.1f}M parameters, n_layer {h['n_layer']}, "
            f"n_embd {h['n_embd']}, n_head {h['n_head']}, n_ctx {h['n_ctx']}, n_vocab {h['n_vocab']})",
            f"blas: {blas.describe()}",
            f"input tokens ({len(ids)}): {' '.join(map(str, ids))}",
            f"output tokens ({len(new_ids)}): {' '.join(map(str, new_ids))}",
        ]
        if started is not None:
            lines.append(f"imports: {t0 - started:.3f} s")
        lines += [
            f"load: {t1 - t0:.3f} s",
            f"tokenizer: {t2 - t1:.3f} s",
            f"{'prefill' if not args.no_cache else 'first token'}: {step_times[0] if step_times else 0:.3f} s",
        ]
        if decode:
            lines.append(f"decode: {sum(decode):.3f} s for {len(decode)} tokens, "
                         f"{1000 * sum(decode) / len(decode):.1f} ms/token, {len(decode) / sum(decode):.1f} tokens/s")
        lines.append(f"total generation: {sum(step_times):.3f} s")
        print("\n".join(lines), file=sys.stderr)


# ---------------------------------------------------------------------------------------------------
# picogpt verify MODEL

def verify_parser():
    p = ArgumentParser(prog="picogpt verify",
                       description="Check a model.dat: structure, SHA-256 checksum, and no NaN or infinite weights.")
    p.add_argument("model", help="a size name (looked up under --models-dir) or a path to a model.dat")
    p.add_argument("--models-dir", default=None, help="where model sizes are looked up")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def verify_command(args):
    from .modelfile import open_model_file
    from .store import model_path

    model_file = open_model_file(model_path(args.model, args.models_dir))
    model_file.verify()
    n_params = sum(t.size for t in model_file.tensors.values())
    print(f"{model_file.path}: OK ({len(model_file.tensors)} tensors, {n_params / 1e6:.1f}M parameters, "
          f"sha256 {model_file.sha256.hex()})")


SUBCOMMANDS = {"verify": (verify_parser, verify_command)}


def main(argv=None, started=None):
    """`picogpt [generate] ...` or `picogpt verify ...`; `started` is when the imports began, for -v."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in SUBCOMMANDS:
        make_parser, command = SUBCOMMANDS[argv[0]]
        return run(f"picogpt {argv[0]}", command, make_parser().parse_args(argv[1:]))
    if argv and argv[0] == "generate":  # explicit, for a prompt that is itself "verify"
        argv = argv[1:]
    return run("picogpt", lambda args: generate_command(args, started), generate_parser().parse_args(argv))


# ---------------------------------------------------------------------------------------------------
# python tools/convert_tf_checkpoint.py --model-size 124M

def convert_parser():
    p = ArgumentParser(
        prog="convert_tf_checkpoint",
        description="Download OpenAI's TensorFlow GPT-2 checkpoint and convert it to picogpt's model.dat.")
    p.add_argument("--model-size", default="124M", help=f"one of {', '.join(MODEL_SIZES)} (default: 124M)")
    p.add_argument("--models-dir", default=None,
                   help="checkpoints go to MODELS_DIR/SIZE/, model.dat beside them "
                        "(default: $PICOGPT_MODELS_DIR or ./models)")
    p.add_argument("--base-url", default=DEFAULT_BASE_URL, help=f"where to download from (default: {DEFAULT_BASE_URL})")
    p.add_argument("--checkpoint-dir", default=None,
                   help="convert the checkpoint already in this folder, with no network at all")
    p.add_argument("--out", default=None, help="where to write model.dat (default: next to the checkpoint)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def convert_command(args):
    from pathlib import Path

    from .convert_tf import convert_checkpoint, require_tensorflow
    from .download import download_checkpoint
    from .store import check_model_size, default_models_dir

    require_tensorflow()  # before a download of hundreds of megabytes that could not be converted
    started = time.perf_counter()
    if args.checkpoint_dir is not None:
        checkpoint_dir = Path(args.checkpoint_dir)
        if not checkpoint_dir.is_dir():
            raise PicogptError(f"checkpoint folder {checkpoint_dir} does not exist")
    else:
        size = check_model_size(args.model_size)
        models_dir = Path(args.models_dir) if args.models_dir is not None else default_models_dir()
        checkpoint_dir = models_dir / size
        download_checkpoint(size, checkpoint_dir, args.base_url, progress=not args.no_progress)
        print(f"checkpoint: {checkpoint_dir}/ ({time.perf_counter() - started:.1f} s)", file=sys.stderr)
    out = Path(args.out) if args.out is not None else checkpoint_dir / "model.dat"
    t = time.perf_counter()
    hparams = convert_checkpoint(checkpoint_dir, out)
    report_written(out, hparams, time.perf_counter() - t)


def report_written(out, hparams, seconds):
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB: n_layer {hparams['n_layer']}, n_embd "
          f"{hparams['n_embd']}, n_head {hparams['n_head']}, n_ctx {hparams['n_ctx']}, n_vocab "
          f"{hparams['n_vocab']}) in {seconds:.1f} s", file=sys.stderr)


def convert_main(argv=None):
    return run("convert_tf_checkpoint", convert_command, convert_parser().parse_args(argv))


# ---------------------------------------------------------------------------------------------------
# python tools/convert_hf_checkpoint.py DIR

def convert_hf_parser():
    p = ArgumentParser(prog="convert_hf_checkpoint", description="Convert a Hugging Face GPT-2 model folder "
                       "(config.json and model.safetensors, or shards with model.safetensors.index.json) to "
                       "picogpt's model.dat. Needs safetensors only: no PyTorch, no TensorFlow.")
    p.add_argument("folder", metavar="DIR", help="the model folder, e.g. one filled by "
                   "`hf download openai-community/gpt2 config.json model.safetensors --local-dir DIR`")
    p.add_argument("--out", default=None, help="where to write model.dat (default: DIR/model.dat)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def convert_hf_command(args):
    from pathlib import Path

    from .convert_hf import convert_hf_checkpoint

    out = Path(args.out) if args.out is not None else Path(args.folder) / "model.dat"
    t = time.perf_counter()
    hparams = convert_hf_checkpoint(args.folder, out)
    report_written(out, hparams, time.perf_counter() - t)


def convert_hf_main(argv=None):
    return run("convert_hf_checkpoint", convert_hf_command, convert_hf_parser().parse_args(argv))
