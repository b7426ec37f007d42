"""Command lines: `python -m picogpt` (generate, verify) and tools/convert_tf_checkpoint.py (fetch, convert).

Argument parsing and printing only; the work is done by the package's Python API. A user mistake or a
fault (PicogptError) prints one line on stderr and exits 1, a bad argument one line and exits 2, Ctrl-C
exits 130; --debug shows the traceback instead.
"""

import argparse
import math
import sys
import time

from .blas import BACKENDS
from .errors import PicogptError
from .store import DEFAULT_BASE_URL, DEMO, MODEL_SIZES


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

def number(text):
    """A float from the command line, or argparse's complaint that it is not one."""
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


def probability(text):
    value = number(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{value} is not in (0, 1]")
    return value


def non_negative_float(text):
    value = number(text)
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{value} is not a finite number >= 0")
    return value


def add_model_arguments(p):
    """--model and where models come from: shared by generate, score and attention."""
    p.add_argument("--model", default=None,
                   help=f"{', '.join(MODEL_SIZES)}, {DEMO} (a small model shipped with picogpt) or a path to a "
                        f"model.dat (default: 124M if it has been fetched, else {DEMO})")
    p.add_argument("--models-dir", default=None,
                   help="where model sizes are looked up (default: $PICOGPT_MODELS_DIR or ./models)")
    p.add_argument("--download", action="store_true",
                   help="download and convert the model if it is missing (needs picogpt[convert])")
    p.add_argument("--base-url", default=DEFAULT_BASE_URL, help="mirror of OpenAI's checkpoints, for --download")
    p.add_argument("--backend", default="numpy", choices=BACKENDS,
                   help="which BLAS multiplies the matrices: NumPy's own (default), an OpenBLAS found "
                        "automatically, or Apple's Accelerate (macOS)")
    p.add_argument("--blas-lib", default=None, metavar="PATH",
                   help="use this CBLAS shared library (MKL's libmkl_rt, BLIS, a system OpenBLAS...)")
    p.add_argument("--threads", type=positive_int, default=None, metavar="N",
                   help="BLAS threads (default: the library's own choice, usually one per core)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")


def load_model(args, prog="picogpt"):
    """Select the BLAS backend, then load the model the arguments name (see add_model_arguments)."""
    from . import blas
    from .store import default_model, load

    if args.threads == 0:
        raise PicogptError("--threads must be at least 1")
    blas.use(args.backend, lib=args.blas_lib, threads=args.threads)
    model = args.model
    if model is None and args.download:
        model = "124M"
    if model is None:  # an explicit --model 124M that is missing is an error, never a substitution
        model, notice = default_model(args.models_dir)
        if notice:
            print(f"{prog}: {notice}", file=sys.stderr)
    return load(model, models_dir=args.models_dir, download=args.download, base_url=args.base_url)


def generate_parser():
    p = ArgumentParser(prog="picogpt", description="Generate text with GPT-2, computed in NumPy. Other commands: "
                       "`picogpt score FILE` (log-probability and perplexity of a text), `picogpt attention` "
                       "(pictures of attention weights), `picogpt verify MODEL` (check a model file).")
    p.add_argument("prompt", nargs="?", default=None,
                   help="text to continue (default: read standard input if it is not a terminal; "
                        "an empty prompt starts from <|endoftext|>)")
    p.add_argument("-f", "--prompt-file", default=None, metavar="FILE",
                   help="read the prompt from a UTF-8 text file ('-' for standard input)")
    p.add_argument("--prompts-file", default=None, metavar="FILE",
                   help="continue every line of this UTF-8 file (blank lines skipped), all in one batch")
    p.add_argument("-n", "--n-tokens", type=positive_int, default=20, metavar="N",
                   help="number of tokens to generate at most (default: 20)")
    sampling = p.add_argument_group("sampling (default: greedy, the most likely token every time)")
    sampling.add_argument("--temperature", type=non_negative_float, default=0.0, metavar="T",
                          help="sample from softmax(logits / T); 0 is greedy (default: 0)")
    sampling.add_argument("--top-k", type=positive_int, default=None, metavar="K",
                          help="sample among the K most likely tokens only")
    sampling.add_argument("--top-p", type=probability, default=None, metavar="P",
                          help="sample among the most likely tokens holding probability P (nucleus sampling)")
    sampling.add_argument("--repetition-penalty", type=non_negative_float, default=1.0, metavar="R",
                          help="divide positive logits of tokens already in the text by R, multiply negative "
                               "ones (Hugging Face's semantics; 1 is none, 1.2 is typical)")
    sampling.add_argument("--seed", type=positive_int, default=None,
                          help="seed for sampling: the same seed gives the same text (default: random)")
    sampling.add_argument("--num-samples", type=positive_int, default=1, metavar="N",
                          help="continue the prompt N times, as one batch (default: 1)")
    stopping = p.add_argument_group("stopping")
    stopping.add_argument("--stop", action="append", default=[], metavar="TEXT",
                          help="stop before this text (repeat for several); it is not printed")
    stopping.add_argument("--ignore-eot", action="store_true",
                          help="do not stop at <|endoftext|>: generate all N tokens")
    stopping.add_argument("--sliding-window", action="store_true",
                          help="when prompt and new tokens exceed the model's context, keep only the last "
                               "n_ctx tokens (slower once the window is full) instead of failing")
    p.add_argument("--no-cache", action="store_true",
                   help="recompute the whole sequence for every token instead of using the KV cache")
    add_model_arguments(p)
    p.add_argument("--trace", action="store_true",
                   help="print every step of the prompt's forward pass (shapes, mean, std, max |x|) on stderr")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="report the model, BLAS, tokens and timings on stderr")
    return p


def read_text(name, what):
    """The contents of a UTF-8 file ('-' is standard input), or a one-line error naming the problem."""
    if name == "-":
        name, data = "standard input", sys.stdin.buffer.read()
    else:
        try:
            with open(name, "rb") as f:
                data = f.read()
        except OSError as e:
            raise PicogptError(f"cannot read the {what} file {name}: {e.strerror}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise PicogptError(f"the {what} in {name} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset "
                           f"{e.start}); save it as UTF-8") from None


def read_prompts(args):
    """The prompts: the argument, else the file (or standard input); or every line of --prompts-file."""
    given = [name for name, value in (("a prompt argument", args.prompt), ("--prompt-file", args.prompt_file),
                                      ("--prompts-file", args.prompts_file)) if value is not None]
    if len(given) > 1:
        raise PicogptError(f"give only one of {' and '.join(given)}")
    if args.prompts_file is not None:
        prompts = [line for line in read_text(args.prompts_file, "prompts").splitlines() if line.strip()]
        if not prompts:
            raise PicogptError(f"{args.prompts_file} holds no prompts (one per line)")
        return prompts
    if args.prompt is not None:
        return [args.prompt]
    if args.prompt_file is None and sys.stdin.isatty():
        return [""]
    return [read_text(args.prompt_file or "-", "prompt")]


def generate_command(args, started=None):
    from . import blas
    from .generate import TextStream, check_fits, check_options, prompt_ids, text_steps

    options = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                   repetition_penalty=args.repetition_penalty)
    check_options(**options)
    t0 = time.perf_counter()
    model = load_model(args)
    t1 = time.perf_counter()
    prompts = read_prompts(args)
    rows = [prompt_ids(p) for p in prompts for _ in range(args.num_samples)]
    if not args.sliding_window:
        check_fits(model, max(map(len, rows)), args.n_tokens)
    t2 = time.perf_counter()
    if args.trace:
        from .trace import print_trace
        print_trace(model, rows[0], file=sys.stderr)

    # One prompt's text is printed as it comes; several are printed once all have finished.
    streams = [TextStream(args.stop, stop_at_eot=not args.ignore_eot) for _ in rows]
    texts, streaming = [""] * len(rows), len(rows) == 1
    step_times, t_step = [], time.perf_counter()
    steps = text_steps(model, rows, streams, args.n_tokens, use_cache=not args.no_cache, seed=args.seed,
                       sliding_window=args.sliding_window, **options)
    for pieces in steps:
        step_times.append(time.perf_counter() - t_step)
        if streaming:
            sys.stdout.write(pieces[0])
            sys.stdout.flush()
            args.mid_line = True
        else:
            texts = [text + piece for text, piece in zip(texts, pieces)]
        t_step = time.perf_counter()
    texts = [text + stream.flush() for text, stream in zip(texts, streams)]
    if streaming:
        sys.stdout.write(texts[0] + "\n")
    else:
        for row, text in enumerate(texts):
            prompt, sample = divmod(row, args.num_samples)
            label = ", ".join(([f"prompt {prompt + 1}/{len(prompts)}"] if len(prompts) > 1 else []) +
                              ([f"sample {sample + 1}/{args.num_samples}"] if args.num_samples > 1 else []))
            sys.stdout.write(f"=== {label} ===\n{text}\n")
    sys.stdout.flush()
    args.mid_line = False
    new_ids = [stream.tokens for stream in streams]

    if args.verbose:
        h = model.hparams
        decode = step_times[1:]
        n_new = sum(map(len, new_ids))
        lines = [
            f"model: {model.path} ({model.n_params / 1e6:.1f}M parameters, n_layer {h['n_layer']}, "
            f"n_embd {h['n_embd']}, n_head {h['n_head']}, n_ctx {h['n_ctx']}, n_vocab {h['n_vocab']})",
            f"blas: {blas.describe()}",
        ]
        for row, (ids, out) in enumerate(zip(rows, new_ids)):
            which = f" [{row + 1}]" if len(rows) > 1 else ""
            lines.append(f"input tokens{which} ({len(ids)}): {' '.join(map(str, ids))}")
            lines.append(f"output tokens{which} ({len(out)}): {' '.join(map(str, out))}")
        if started is not None:
            lines.append(f"imports: {t0 - started:.3f} s")
        lines += [
            f"load: {t1 - t0:.3f} s",
            f"tokenizer: {t2 - t1:.3f} s",
            f"{'prefill' if not args.no_cache else 'first token'}: {step_times[0] if step_times else 0:.3f} s",
        ]
        if decode:
            lines.append(f"decode: {sum(decode):.3f} s for {len(decode)} steps of {len(rows)} "
                         f"sequence{'s' if len(rows) > 1 else ''}, {1000 * sum(decode) / len(decode):.1f} ms/step, "
                         f"{len(decode) * len(rows) / sum(decode):.1f} tokens/s")
        lines.append(f"total generation: {sum(step_times):.3f} s, {n_new} new tokens")
        print("\n".join(lines), file=sys.stderr)


# ---------------------------------------------------------------------------------------------------
# picogpt score FILE

def score_parser():
    p = ArgumentParser(prog="picogpt score", description="How probable a text is under the model: its total "
                       "log-probability, the mean negative log-likelihood per token and the perplexity.")
    p.add_argument("file", help="a UTF-8 text file ('-' for standard input)")
    p.add_argument("--no-eot", action="store_true",
                   help="do not put <|endoftext|> before the text; the first token is then context only")
    p.add_argument("--stride", type=positive_int, default=None, metavar="N",
                   help="for a text longer than the context, score it in windows that move N tokens "
                        "(default: half the context)")
    add_model_arguments(p)
    return p


def score_command(args):
    from .generate import score
    from .tokenizer import EOT, encode

    if args.stride == 0:
        raise PicogptError("--stride must be at least 1")
    text = read_text(args.file, "text")
    model = load_model(args)
    ids = ([] if args.no_eot else [EOT]) + encode(text)
    result = score(model, ids, stride=args.stride)
    print(f"tokens scored: {result.n_tokens}")
    print(f"log-probability: {result.log_prob:.4f} nats ({result.log_prob / math.log(2):.4f} bits)")
    print(f"mean negative log-likelihood: {result.mean_nll:.4f} nats per token")
    print(f"perplexity: {result.perplexity:.4f}")


# ---------------------------------------------------------------------------------------------------
# picogpt attention "prompt" --layer L [--head H] --out attn.png

def attention_parser():
    p = ArgumentParser(prog="picogpt attention", description="Draw one layer's attention weights over a "
                       "prompt's tokens as a heatmap: one head, or all heads as a grid (needs picogpt[plot]).")
    p.add_argument("prompt", help="the text whose tokens attend to each other")
    p.add_argument("--layer", type=positive_int, required=True, metavar="L", help="block number, from 0")
    p.add_argument("--head", type=positive_int, default=None, metavar="H",
                   help="one head, from 0 (default: all heads of the layer as a grid)")
    p.add_argument("--out", default="attn.png", metavar="FILE", help="picture to write: .png, .svg or .pdf "
                   "(default: attn.png)")
    add_model_arguments(p)
    return p


def attention_command(args):
    from .attention_plot import attention_picture

    picture = attention_picture(load_model(args), args.prompt, args.layer, args.head, args.out)
    print(f"wrote {picture.path}", file=sys.stderr)


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


SUBCOMMANDS = {"verify": (verify_parser, verify_command), "score": (score_parser, score_command),
               "attention": (attention_parser, attention_command)}


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
