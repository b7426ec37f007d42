"""The command line: every `picogpt` subcommand (`python -m picogpt`, the `picogpt` console script, and
the thin scripts in tools/), each an argument parser over the package's Python API.

    picogpt "prompt" -n 20        generate (the default subcommand)
    picogpt score FILE            ...  and the others in SUBCOMMANDS; `picogpt --help` lists them

Argument parsing and printing only; the work is done by the package's modules. A user mistake or a
fault (PicogptError) prints one line on stderr and exits 1, a bad argument one line and exits 2, Ctrl-C
exits 130; --debug shows the traceback instead.
"""

import time

IMPORTS_STARTED = time.perf_counter()  # -v reports how long importing picogpt's modules took

import argparse  # noqa: E402
import errno  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import secrets  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

from . import __version__, bench, blas, files, parity  # noqa: E402
from .attention_plot import attention_picture  # noqa: E402
from .convert_hf import convert_hf_checkpoint  # noqa: E402
from .convert_tf import convert_checkpoint, require_tensorflow  # noqa: E402
from .download import DEFAULT_BASE_URL, MODEL_SIZES  # noqa: E402
from .errors import BadArgument, PicogptError, interrupted, one_line, plural  # noqa: E402
from .explain import MAX_TOKENS, check_heads, explain, parse_heads  # noqa: E402
from . import corpus  # noqa: E402
from .explain_page import write_page  # noqa: E402
from .beam import beam_search  # noqa: E402
from .generate import TextBatch, TextStream, prompt_ids  # noqa: E402
from .modelfile import WEIGHT_DTYPES, convert_dtype, open_model_file  # noqa: E402
from .scoring import score  # noqa: E402
from . import store  # noqa: E402
from .store import DEMO, default_model, fetch, load  # noqa: E402
from .tokenizer import EOT, encode  # noqa: E402
from .trace import print_trace  # noqa: E402


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line (argparse's default prints the whole usage first)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {one_line(message)}; see {self.prog} --help\n")


class Terminated(BaseException):
    """SIGTERM (a plain `kill`), raised like Ctrl-C's KeyboardInterrupt so that half-written files are
    deleted on the way out."""


def raise_terminated(signum, frame):
    raise Terminated


class OutputFailed(Exception):
    """Writing the command's output (stdout) failed: a closed pipe, a full disk. Holds the OSError."""


class CheckedOutput:
    """sys.stdout while a command runs, telling a failed write to it (OutputFailed) from other OSErrors."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text):
        try:
            return self.stream.write(text)
        except OSError as e:
            raise OutputFailed(e) from e

    def flush(self):
        try:
            return self.stream.flush()
        except OSError as e:
            raise OutputFailed(e) from e

    def __getattr__(self, name):
        return getattr(self.stream, name)


def say(prog, message):
    """One line on stderr; nothing if stderr itself is gone (a closed pipe), since there is nowhere to say it."""
    try:
        print(f"{prog}: {message}", file=sys.stderr, flush=True)
    except OSError:
        pass


def silence_stdout():
    """Send what stdout still holds to /dev/null, so that Python's flush at exit cannot fail again."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # not a real file (a test's capture)
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


def end_line(args):
    """End a half-printed continuation (so the error is on a line of its own), if stdout still works."""
    if getattr(args, "mid_line", False):
        try:
            print(flush=True)
        except (OSError, OutputFailed):
            pass


def run(prog, command, args):
    """Run command(args), turning failures into one line on stderr and an exit status:

    PicogptError 1 (BadArgument 2, as argparse's own), Ctrl-C 130, a closed output pipe 141 (128 +
    SIGPIPE, as a shell reports any tool that `| head` closed on) and nothing said, a failed write to the
    output (a full disk) 1, memory exhausted 1. --debug shows the traceback instead.
    """
    stdout, sys.stdout = sys.stdout, CheckedOutput(sys.stdout)
    try:
        previous_sigterm = signal.signal(signal.SIGTERM, raise_terminated)
    except ValueError:  # not the main thread
        previous_sigterm = None
    try:
        status = command(args) or 0
        sys.stdout.flush()
        return status
    except OutputFailed as e:
        if args.debug:
            raise
        silence_stdout()
        error = e.args[0]
        if error.errno == errno.EPIPE:
            return 141
        say(prog, f"error: cannot write the output: {error.strerror}; free some space, or send the output "
                  "somewhere else")
        return 1
    except Terminated:
        end_line(args)
        say(prog, "terminated")
        return 143  # 128 + SIGTERM
    except (PicogptError, MemoryError, KeyboardInterrupt, ImportError) as e:  # BadArgument is a PicogptError
        if args.debug or (isinstance(e, ImportError) and not interrupted(e)):
            raise
        end_line(args)
        if interrupted(e):  # a Ctrl-C, or an import it interrupted (TensorFlow's, matplotlib's)
            say(prog, "interrupted")
            return 130
        if isinstance(e, MemoryError):
            say(prog, "error: out of memory; ask for less at once (fewer samples or prompts, fewer tokens, "
                      "a shorter prompt) or use a smaller model")
            return 1
        if isinstance(e, BadArgument):
            say(prog, f"error: {one_line(e)}; see {prog} --help")
            return 2
        say(prog, f"error: {one_line(e)}")
        return 1
    finally:
        sys.stdout = stdout
        if previous_sigterm is not None:
            signal.signal(signal.SIGTERM, previous_sigterm)


# ---------------------------------------------------------------------------------------------------
# Kinds of argument

def number_kind(description, convert, allowed):
    """An argparse type for one kind of number: every kind refuses with the same wording,
    "expected <description>, got '<text>'", and argparse makes that one line with exit status 2."""
    def parse(text):
        try:
            value = convert(text)
        except (ValueError, OverflowError):
            value = None
        if value is None or not allowed(value):
            raise argparse.ArgumentTypeError(f"expected {description}, got {text!r}")
        return value
    parse.__name__ = description  # argparse names the type in some messages
    return parse


# One rule per kind of number the options take:
non_negative_int = number_kind("a whole number >= 0", int, lambda v: v >= 0)  # tokens to generate, a seed, an index
positive_int = number_kind("a whole number >= 1", int, lambda v: v >= 1)  # threads, a stride, top-k, samples
positive_float = number_kind("a number > 0", float, lambda v: 0 < v < math.inf)  # a repetition penalty
non_negative_float = number_kind("a number >= 0", float, lambda v: 0 <= v < math.inf)  # a temperature, a tolerance
probability = number_kind("a number > 0 and <= 1", float, lambda v: 0 < v <= 1)  # top-p
finite_float = number_kind("a number", float, lambda v: -math.inf < v < math.inf)  # a length penalty


def stop_text(text):
    """A --stop string, with backslash escapes (\\n, \\t, \\\\, \\u2615) read as in Python, so a newline can
    be given; empty text is refused (it would stop before the first token)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # an unknown escape such as \q is kept as it is
            stop = text.encode("latin-1", "backslashreplace").decode("unicode_escape")
    except UnicodeDecodeError as e:
        raise argparse.ArgumentTypeError(f"bad escape in {text!r}: {e.reason} (write \\\\ for a backslash)") from None
    if not stop:  # "", or a backslash and a line break
        raise argparse.ArgumentTypeError(f"expected text to stop before, got {text!r} (an empty stop would stop "
                                         f"at once)")
    return stop


def threads_list(text):
    return [positive_int(t) for t in text.split(",") if t]


# ---------------------------------------------------------------------------------------------------
# The model, as every subcommand that runs one selects it

def add_model_arguments(p):
    """--model and where models come from, the BLAS and its threads: shared by the subcommands that run one."""
    p.add_argument("--model", default=None,
                   help=f"{', '.join(MODEL_SIZES)}, {DEMO} (a small model shipped with picogpt) or a path to a "
                        f"model.dat (default: 124M if it has been fetched, else {DEMO})")
    p.add_argument("--models-dir", default=None,
                   help="where model sizes are looked up (default: $PICOGPT_MODELS_DIR, else the per-user "
                        "models folder, where they are fetched to)")
    p.add_argument("--download", action="store_true",
                   help="download and convert the model if it is missing (needs TensorFlow: make fetch installs it)")
    p.add_argument("--base-url", default=None, help="mirror of OpenAI's checkpoints, for --download (default: "
                   "$PICOGPT_BASE_URL, else OpenAI's)")
    p.add_argument("--backend", default="numpy", choices=blas.BACKENDS,
                   help="which BLAS multiplies the matrices: NumPy's own (default), an OpenBLAS found "
                        "automatically, Apple's Accelerate (macOS), or Intel's oneMKL (also bfloat16 weights)")
    p.add_argument("--blas-lib", default=None, metavar="PATH",
                   help="use this CBLAS shared library (MKL's libmkl_rt, BLIS, a system OpenBLAS...)")
    p.add_argument("--threads", type=positive_int, default=None, metavar="N",
                   help="BLAS threads (default: the library's own choice, usually one per core)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")


def load_model(args, prog="picogpt"):
    """Select the BLAS backend, then load the model the arguments name (see add_model_arguments)."""
    blas.use(args.backend, lib=args.blas_lib, threads=args.threads)
    model, download = args.model, getattr(args, "download", None)  # None: the command has no --download
    if model is None and download:
        model = "124M"
    if model is None:  # an explicit --model 124M that is missing is an error, never a substitution
        model, notice = default_model(args.models_dir)
        if notice:
            print(f"{prog}: {notice}", file=sys.stderr)
    try:
        loaded = load(model, models_dir=args.models_dir, download=bool(download),
                      base_url=getattr(args, "base_url", None), quiet=True, bf16=getattr(args, "bf16", None))
    except store.NotFetched as e:
        raise PicogptError(f"{e}" + (" (or add --download)" if download is not None else "")) from None
    if store.widening_worth_saying(loaded):  # a bfloat16 file this backend or CPU cannot multiply natively
        print(f"{prog}: {loaded.precision.note}", file=sys.stderr)
    return loaded


# ---------------------------------------------------------------------------------------------------
# picogpt "prompt" -n 20   (or picogpt generate ...)

def add_sampling_arguments(sampling, seed_help="seed for sampling: the same seed gives the same text (default: "
                                                "random; -v shows it)"):
    """--temperature, --top-k, --top-p, --repetition-penalty and --seed: generate's and complete-corpus's."""
    sampling.add_argument("--temperature", type=non_negative_float, default=None, metavar="T",
                          help="sample from softmax(logits / T); 0 is greedy (default: 0, or 1 with another "
                               "sampling flag)")
    sampling.add_argument("--top-k", type=positive_int, default=None, metavar="K",
                          help="sample among the K most likely tokens only")
    sampling.add_argument("--top-p", type=probability, default=None, metavar="P",
                          help="sample among the most likely tokens holding probability P (nucleus sampling)")
    sampling.add_argument("--repetition-penalty", type=positive_float, default=1.0, metavar="R",
                          help="divide positive logits of tokens already in the text by R, multiply negative "
                               "ones (Hugging Face's semantics; 1 is none, 1.2 is typical)")
    sampling.add_argument("--seed", type=non_negative_int, default=None, help=seed_help)


def generate_parser(prog="picogpt"):
    width = max(map(len, SUBCOMMANDS))
    commands = "\n".join(f"  {name:<{width}}  {summary}" for name, (_, _, summary) in SUBCOMMANDS.items())
    p = ArgumentParser(prog=prog, formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Generate text with GPT-2, computed in NumPy.",
                       epilog=f"commands (picogpt COMMAND --help for each):\n{commands}\n\n"
                              "A prompt that is a command's name is continued with: picogpt generate PROMPT "
                              "(or picogpt [OPTIONS] -- PROMPT)")
    p.add_argument("prompt", nargs="?", default=None,
                   help="text to continue (default: read standard input if it is not a terminal; "
                        "an empty prompt starts from <|endoftext|>)")
    p.add_argument("-f", "--prompt-file", default=None, metavar="FILE",
                   help="read the prompt from a UTF-8 text file ('-' for standard input)")
    p.add_argument("--prompts-file", default=None, metavar="FILE",
                   help="continue every line of this UTF-8 file (blank lines skipped), all in one batch")
    p.add_argument("-n", "--n-tokens", type=non_negative_int, default=20, metavar="N",
                   help="number of tokens to generate at most (default: 20)")
    sampling = p.add_argument_group("sampling (default: greedy, the most likely token every time; --top-k, "
                                    "--top-p, --seed or --num-samples > 1 without --temperature sample at 1)")
    add_sampling_arguments(sampling)
    sampling.add_argument("--num-samples", type=positive_int, default=1, metavar="N",
                          help="continue the prompt N times, as one batch (default: 1)")
    beams = p.add_argument_group("beam search (Hugging Face's rules; instead of greedy or sampling)")
    beams.add_argument("--num-beams", type=positive_int, default=1, metavar="N",
                       help="keep the N most probable continuations at every step and print the best (default: 1, "
                            "greedy)")
    beams.add_argument("--length-penalty", type=finite_float, default=1.0, metavar="L",
                       help="rank finished beams by log-probability / length ** L: above 0 favours longer ones "
                            "(default: 1)")
    stopping = p.add_argument_group("stopping")
    stopping.add_argument("--stop", action="append", default=[], metavar="TEXT", type=stop_text,
                          help="stop before this text (repeat for several); it is not printed. Backslash "
                               "escapes are read as in Python: --stop '\\n' stops at a line break")
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
                   help="report the model, BLAS, sampling settings (the seed), tokens and timings on stderr")
    p.add_argument("--version", action="version", version=f"picogpt {__version__} ({Path(__file__).parent})")
    return p


def read_text(name, what):
    """The contents of a UTF-8 file ('-' is standard input), or a one-line error naming the problem."""
    if name == "-":
        if sys.stdin is None:
            raise PicogptError(f"standard input is closed; give the {what} as a file")
        name, data = "standard input", sys.stdin.buffer.read()
    else:
        try:
            with open(name, "rb") as f:
                data = f.read()
        except OSError as e:
            raise PicogptError(f"cannot read the {what} file {name}: {e.strerror}") from None
    try:
        return data.decode("utf-8").removeprefix("\ufeff")  # a byte-order mark some editors write is no text
    except UnicodeDecodeError as e:
        raise PicogptError(f"the {what} in {name} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset "
                           f"{e.start}); save it as UTF-8") from None


def read_prompts(args):
    """The prompts: the argument, else the file (or standard input); or every line of --prompts-file.

    Returns (prompts, where): where[i] says where prompt i came from ("line 7") for batch headers, or None.
    A prompt read from a file or a pipe loses one final line break, which `echo` and editors add: it
    continues the same text as the argument would (end it with two line breaks to keep one).
    """
    given = [name for name, value in (("a prompt argument", args.prompt), ("--prompt-file", args.prompt_file),
                                      ("--prompts-file", args.prompts_file)) if value is not None]
    if len(given) > 1:
        raise PicogptError(f"give only one of {' and '.join(given)}")
    if args.prompts_file is not None:
        lines = read_text(args.prompts_file, "prompts").splitlines()
        numbered = [(number, line) for number, line in enumerate(lines, 1) if line.strip()]
        if not numbered:
            raise PicogptError(f"{args.prompts_file} holds no prompts (one per line)")
        return [line for _, line in numbered], [f"line {number}" for number, _ in numbered]
    if args.prompt is not None:
        return [args.prompt], [None]
    if args.prompt_file is None and (sys.stdin is None or sys.stdin.isatty()):  # None: stdin closed (<&-)
        return [""], [None]
    text = read_text(args.prompt_file or "-", "prompt")
    return [text.removesuffix("\n").removesuffix("\r") if text.endswith("\n") else text], [None]


def sampling_settings(args):
    """The temperature and seed to run with. Sampling flags without --temperature sample at 1 (they
    would do nothing greedy); with an explicit --temperature 0 they are refused. A run that samples
    without --seed gets a random one, which -v shows, so a good sample can be had again."""
    flags = [flag for flag, given in (("--top-k", args.top_k is not None), ("--top-p", args.top_p is not None),
                                      ("--seed", args.seed is not None),
                                      ("--num-samples", getattr(args, "num_samples", 1) > 1))
             if given]
    temperature = args.temperature
    if temperature is None:
        temperature = 1.0 if flags else 0.0
    elif temperature == 0 and flags:
        raise BadArgument(f"{' and '.join(flags)} only matter{'s' if len(flags) == 1 else ''} when sampling, "
                          f"and --temperature 0 is greedy; "
                          f"drop --temperature 0 (sampling at 1) or give a temperature > 0")
    seed = args.seed
    if temperature > 0 and seed is None:
        seed = secrets.randbelow(2**32)
    return temperature, seed


def header(row, n_prompts, num_samples, prompts, where):
    """The line above one result of a batch: which prompt (its text, and its line in --prompts-file) and sample."""
    prompt, sample = divmod(row, num_samples)
    parts = []
    if n_prompts > 1:
        text = prompts[prompt] if len(prompts[prompt]) <= 40 else prompts[prompt][:37] + "..."
        parts.append(f"prompt {prompt + 1}/{n_prompts}" + (f" ({where[prompt]})" if where[prompt] else "") +
                     f": {one_line(repr(text))}")
    if num_samples > 1:
        parts.append(f"sample {sample + 1}/{num_samples}")
    return f"=== {', '.join(parts)} ==="


def generate_command(args):
    if args.num_beams > 1:
        return beam_command(args)
    if args.length_penalty != 1.0:
        raise BadArgument("--length-penalty ranks the beams of --num-beams; give --num-beams 2 or more, or drop it")
    t0 = time.perf_counter()
    model = load_model(args)
    t1 = time.perf_counter()
    prompts, where = read_prompts(args)
    args.temperature, args.seed = sampling_settings(args)
    batch = TextBatch(model, prompts, args.n_tokens, stop=args.stop, stop_at_eot=not args.ignore_eot,
                      num_samples=args.num_samples, use_cache=not args.no_cache, seed=args.seed,
                      sliding_window=args.sliding_window, temperature=args.temperature, top_k=args.top_k,
                      top_p=args.top_p, repetition_penalty=args.repetition_penalty)
    t2 = time.perf_counter()
    if args.trace:
        print_trace(model, batch.prompt_ids[0], file=sys.stderr)

    # One prompt's text is printed as it comes; several are printed once all have finished.
    streaming = len(batch.prompt_ids) == 1
    step_times, t_step = [], time.perf_counter()
    for pieces in batch:
        step_times.append(time.perf_counter() - t_step)
        if streaming:
            sys.stdout.write(pieces[0])
            sys.stdout.flush()
            args.mid_line = True
        t_step = time.perf_counter()
    rest = batch.finish()
    if streaming:
        sys.stdout.write(rest[0] + "\n")
    else:
        for row, text in enumerate(batch.texts):
            sys.stdout.write(f"{header(row, len(prompts), args.num_samples, prompts, where)}\n{text}\n")
    sys.stdout.flush()
    args.mid_line = False
    if args.verbose:
        print(verbose_report(model, batch, args, step_times, t0 - IMPORTS_STARTED, t1 - t0, t2 - t1), file=sys.stderr)


def beam_command(args):
    """picogpt "prompt" --num-beams N: beam search (picogpt.beam), the best continuation of each prompt."""
    given = [flag for flag, on in (("--temperature", args.temperature is not None), ("--top-k", args.top_k is not None),
                                   ("--top-p", args.top_p is not None), ("--seed", args.seed is not None),
                                   ("--num-samples", args.num_samples > 1), ("--no-cache", args.no_cache),
                                   ("--sliding-window", args.sliding_window), ("--trace", args.trace)) if on]
    if given:
        raise BadArgument(f"--num-beams searches for the most probable text and does not take {', '.join(given)}; "
                          f"drop {'it' if len(given) == 1 else 'them'}, or --num-beams")
    started = time.perf_counter()
    model = load_model(args)
    prompts, where = read_prompts(args)
    ids = [prompt_ids(p) for p in prompts]
    result = beam_search(model, ids, args.n_tokens, args.num_beams, length_penalty=args.length_penalty,
                         eos_token_id=None if args.ignore_eot else EOT,
                         repetition_penalty=args.repetition_penalty)
    for row, (best,) in enumerate(result.sequences):
        stream = TextStream(args.stop, stop_at_eot=not args.ignore_eot)
        text = "".join(stream.push(token) for token in best) + stream.flush()
        head = f"{header(row, len(prompts), 1, prompts, where)}\n" if len(prompts) > 1 else ""
        sys.stdout.write(f"{head}{text}\n")
        if args.verbose:
            print(f"beam search{f' [{row + 1}]' if len(prompts) > 1 else ''}: {args.num_beams} beams, length "
                  f"penalty {args.length_penalty:g}, best score {result.scores[row, 0]:.4f} "
                  f"({plural(len(best), 'token')}: {' '.join(map(str, best))})", file=sys.stderr)
    if args.verbose:
        print(f"model: {model.path}\nblas: {blas.describe()}\nbeam search: {time.perf_counter() - started:.3f} s",
              file=sys.stderr)


def verbose_report(model, batch, args, step_times, imports, load_s, tokenizer_s):
    """What -v prints: the model, the BLAS, every row's tokens, and the time each stage took."""
    h = model.hparams
    n_rows = len(batch.prompt_ids)
    lines = [
        f"model: {model.path} ({model.n_params / 1e6:.1f}M parameters, n_layer {h['n_layer']}, "
        f"n_embd {h['n_embd']}, n_head {h['n_head']}, n_ctx {h['n_ctx']}, n_vocab {h['n_vocab']})",
        f"blas: {blas.describe()}",
        f"weights: {model.precision.note if model.precision else 'float32'}",
        f"sampling: temperature {args.temperature:g}, top-k {args.top_k}, top-p {args.top_p}, seed {args.seed} "
        f"(the same text again: --seed {args.seed})" if args.temperature > 0 else "sampling: none (greedy)",
    ]
    for row, (ids, out) in enumerate(zip(batch.prompt_ids, batch.tokens)):
        which = f" [{row + 1}]" if n_rows > 1 else ""
        lines.append(f"input tokens{which} ({len(ids)}): {' '.join(map(str, ids))}")
        lines.append(f"output tokens{which} ({len(out)}): {' '.join(map(str, out))}")
    lines += [f"imports: {imports:.3f} s", f"load: {load_s:.3f} s", f"tokenizer: {tokenizer_s:.3f} s",
              f"{'prefill' if not args.no_cache else 'first token'}: {step_times[0] if step_times else 0:.3f} s"]
    decode = step_times[1:]
    if decode:
        lines.append(f"decode: {sum(decode):.3f} s for {plural(len(decode), 'step')} of "
                     f"{plural(n_rows, 'sequence')}, {1000 * sum(decode) / len(decode):.1f} ms/step, "
                     f"{len(decode) * n_rows / sum(decode):.1f} tokens/s")
    lines.append(f"total generation: {sum(step_times):.3f} s, {plural(sum(map(len, batch.tokens)), 'new token')}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# picogpt score FILE

def score_parser(prog):
    p = ArgumentParser(prog=prog, description="How probable a text is under the model: its total "
                       "log-probability, the mean negative log-likelihood per token and the perplexity.")
    p.add_argument("file", help="a UTF-8 text file ('-' for standard input)")
    p.add_argument("--no-eot", action="store_true",
                   help="do not put <|endoftext|> before the text; the first token is then context only")
    p.add_argument("--stride", type=positive_int, default=None, metavar="N",
                   help="for a text longer than the context, score it in windows that move N tokens, "
                        "less than the context (default: half the context)")
    add_model_arguments(p)
    return p


def score_command(args):
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

def attention_parser(prog):
    p = ArgumentParser(prog=prog, description="Draw one layer's attention weights over a "
                       "prompt's tokens as a heatmap: one head, or all heads as a grid (needs matplotlib).")
    p.add_argument("prompt", help="the text whose tokens attend to each other")
    p.add_argument("--layer", type=non_negative_int, required=True, metavar="L", help="block number, from 0")
    p.add_argument("--head", type=non_negative_int, default=None, metavar="H",
                   help="one head, from 0 (default: all heads of the layer as a grid)")
    p.add_argument("--out", default="attn.png", metavar="FILE", help="picture to write: .png, .svg or .pdf; "
                   "a folder means attn.png in it (default: attn.png)")
    add_model_arguments(p)
    return p


def attention_command(args):
    picture = attention_picture(load_model(args), args.prompt, args.layer, args.head, args.out)
    print(f"wrote {picture.path}", file=sys.stderr)


# ---------------------------------------------------------------------------------------------------
# picogpt explain "prompt"

def heads_list(text):
    """--ablate's type: "1.0,3.2" -> [(1, 0), (3, 2)]."""
    try:
        return parse_heads(text)
    except BadArgument as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("--ablate ")) from None


def explain_parser(prog):
    p = ArgumentParser(prog=prog, description="Write one self-contained web page of a forward pass over the "
                       "prompt: its tokens, every head's attention, the logit lens, the next token under sampling "
                       "settings, and what switching heads off changes. It opens offline in any browser.")
    p.add_argument("prompt", help=f"the text to look inside (at most {MAX_TOKENS} tokens)")
    p.add_argument("--out", default="explain.html", metavar="FILE",
                   help="the page to write; a folder means explain.html in it (default: explain.html)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the page's data as JSON")
    p.add_argument("--ablate", type=heads_list, default=[], metavar="L.H[,L.H...]",
                   help="zero these heads' outputs (layer.head, from 0) and show the next token without them")
    add_model_arguments(p)
    return p


def explain_command(args):
    out = files.output_file(args.out, "explain.html")
    json_out = files.output_file(args.json, "explain.json") if args.json else None
    model = load_model(args, args.prog)
    check_heads(model.hparams, args.ablate)  # before the work
    started = time.perf_counter()
    seen = explain(model, args.prompt, ablate=args.ablate, model_name=args.model or model_label(model),
                   command=command_line(args.prog, args.argv))
    write_page(seen, out, json_out)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB, {plural(len(seen.ids), 'token')}, "
          f"{time.perf_counter() - started:.1f} s)" + (f" and {json_out}" if json_out else "")
          + "; open it in a browser", file=sys.stderr)


def model_label(model):
    """A loaded model's name for the page: the folder its model.dat is in (124M, demo), else the file."""
    return Path(model.path).parent.name if model.path else "in memory"


def command_line(prog, argv):
    """The command as given, for the page's footer: prog and the arguments, shell-quoted."""
    import shlex
    return " ".join([prog] + [shlex.quote(w) for w in argv])


# ---------------------------------------------------------------------------------------------------
# picogpt score-corpus INPUT... --out FILE, picogpt complete-corpus INPUT... --out FILE -n N

def corpus_parser(prog, task):
    what = "Score every document" if task == "score" else "Continue every document"
    p = ArgumentParser(prog=prog, description=f"{what} of a corpus: .jsonl files (the text in a field), .txt files "
                       "(one document each, or one per line), folders and glob patterns, streamed, batched by length. "
                       "Writes one JSON line per document, in input order, appended as it goes: the same command "
                       "run again after a crash skips what is done and finishes the rest.")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help=".jsonl or .txt files, folders of them, glob patterns")
    p.add_argument("--out", required=True, metavar="FILE", help="the JSON-lines output (resumed if it exists)")
    p.add_argument("--text-field", default="text", metavar="NAME", help="the field of a .jsonl record that holds "
                   "the text (default: text); an \"id\" field is carried over when present")
    p.add_argument("--lines", action="store_true", help=".txt files hold one document per line (default: one per file)")
    if task == "score":
        p.add_argument("--stride", type=positive_int, default=None, metavar="N",
                       help="a document longer than the context is scored in windows that move N tokens "
                            "(default: half the context)")
    else:
        p.add_argument("-n", "--n-tokens", type=positive_int, default=20, metavar="N",
                       help="new tokens per document at most; a document ends early at <|endoftext|> (default: 20)")
        sampling = p.add_argument_group("sampling (default: greedy; --top-k, --top-p or --seed without "
                                        "--temperature sample at 1; each document has its own random stream)")
        add_sampling_arguments(sampling, seed_help="seed for sampling, with each document's place (default: random, "
                               "recorded in OUT.run.json and reused when the run is resumed)")
        p.add_argument("--ids", action="store_true", help="also write the new tokens' ids")
    p.add_argument("--batch-tokens", type=positive_int, default=corpus.BATCH_TOKENS, metavar="N",
                   help=f"padded tokens per batch at most (default: {corpus.BATCH_TOKENS})")
    ray = p.add_argument_group("Ray (picogpt's ray extra: Ray Data)")
    ray.add_argument("--ray", default=None, metavar="ADDRESS",
                     help="run on the Ray cluster at ADDRESS (auto: the one this machine is in; local: start one "
                          "on this machine); the model file is needed on this machine only")
    ray.add_argument("--workers", type=positive_int, default=None, metavar="N", help="Ray actors (default: 2)")
    ray.add_argument("--threads-per-worker", type=positive_int, default=None, metavar="T",
                     help="BLAS threads (and CPUs reserved) per actor (default: 1)")
    add_model_arguments(p)
    return p


def corpus_command(args, task):
    if not args.ray and (args.workers is not None or args.threads_per_worker is not None):
        raise BadArgument("--workers and --threads-per-worker choose Ray's actors; they need --ray")
    out = files.output_file(args.out)  # a folder or a link is sorted out before anything else
    model = load_model(args, args.prog)
    output = corpus.CorpusOutput(out)
    job_options = dict(task=task, batch_tokens=args.batch_tokens)
    if task == "score":
        job_options["stride"] = args.stride
    else:
        temperature, seed = sampling_settings(args)
        recorded = output.recorded_settings()
        if args.seed is None and temperature > 0 and recorded and "sampling" in recorded:
            seed = recorded["sampling"].get("seed", seed)  # resuming a sampled run: its own seed
        sampling = dict(temperature=temperature, top_k=args.top_k, top_p=args.top_p,
                        repetition_penalty=args.repetition_penalty, seed=seed if temperature > 0 else None)
        job_options.update(n_tokens=args.n_tokens, sampling=sampling, ids=args.ids)
    job = corpus.CorpusJob(model, **job_options)  # the settings are checked before anything is written
    chunks, input_files = corpus.plan(args.inputs, lines=args.lines, text_field=args.text_field,
                                      exclude=[out, output.run_path], with_files=True)
    bf16_native = bool(model.precision and model.precision.native)
    # What made the output, recorded beside it: resuming with any of it changed is refused.
    output.settings = dict(job_options, model=str(Path(model.path).resolve()),
                           model_sha256=open_model_file(model.path).sha256.hex(), backend=args.backend,
                           bf16_native=bf16_native, inputs=[str(p) for p in args.inputs],
                           input_files=[[str(f), f.stat().st_size] for f in input_files],  # an edited input
                           text_field=args.text_field, lines=args.lines, chunk_docs=corpus.CHUNK_DOCS)
    if args.ray:
        from .corpus_ray import require_ray  # Ray is imported only with --ray
        require_ray()
    if not chunks:
        raise PicogptError(f"the inputs hold no documents: {' '.join(args.inputs)}")
    remaining = output.open(chunks)
    total = sum(c.n_docs for c in chunks)
    if not remaining:
        print(f"{args.prog}: {output.path} is complete: all {plural(total, 'document')} are in it", file=sys.stderr)
        output.close()
        return
    if output.done:
        print(f"{args.prog}: resuming {output.path}: {plural(output.done, 'document')} of {total} done",
              file=sys.stderr)
    progress = corpus.Progress(total, output.done)
    try:
        if args.ray:
            from .corpus_ray import run_on_ray
            run_on_ray(args.ray, model.path, job_options, remaining, output, progress, args.workers or 2,
                       args.threads_per_worker or 1, backend=args.backend, bf16="native" if bf16_native else "widen")
        else:
            corpus.run_in_process(job, remaining, output, progress)
    finally:
        progress.close()
        output.close()
    seconds = progress.seconds
    verb = "scored" if task == "score" else "continued"
    rate = max(seconds, 1e-9)
    print(f"{args.prog}: {verb} {plural(progress.docs, 'document')} ({progress.tokens:,} tokens) in {seconds:.1f} s: "
          f"{progress.docs / rate:.1f} documents/s, {progress.tokens / rate:,.0f} tokens/s; "
          f"{plural(progress.errors, 'document')} with an error field; {output.path} holds all {total}",
          file=sys.stderr)


# ---------------------------------------------------------------------------------------------------
# picogpt verify MODEL

def verify_parser(prog):
    p = ArgumentParser(prog=prog,
                       description="Check a model.dat: structure, SHA-256 checksum, and no NaN or infinite weights; "
                       "remove the temporary files that killed conversions left beside it.")
    p.add_argument("model", help="a size name (looked up under --models-dir) or a path to a model.dat")
    p.add_argument("--models-dir", default=None, help="where model sizes are looked up")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def verify_command(args):
    for stale in files.remove_stale_partials(store.model_path(args.model, args.models_dir)):
        print(f"{args.prog}: removed {stale}, left by a conversion that was killed", file=sys.stderr)
    model_file = store.model_file(args.model, args.models_dir)
    model_file.verify()
    n_params = sum(t.size for t in model_file.tensors.values())
    print(f"{model_file.path}: OK ({len(model_file.tensors)} tensors, {n_params / 1e6:.1f}M parameters, "
          f"sha256 {model_file.sha256.hex()})")


# ---------------------------------------------------------------------------------------------------
# picogpt convert-tf --model-size 124M   (tools/convert_tf_checkpoint.py)

def convert_tf_parser(prog):
    p = ArgumentParser(prog=prog, description="Download OpenAI's TensorFlow GPT-2 checkpoint and convert it "
                       "to picogpt's model.dat (or convert one already on disk with --checkpoint-dir).")
    p.add_argument("--model-size", default="124M", help=f"one of {', '.join(MODEL_SIZES)} (default: 124M)")
    p.add_argument("--models-dir", default=None,
                   help="checkpoints go to MODELS_DIR/SIZE/, model.dat beside them (default: $PICOGPT_MODELS_DIR, "
                        "else the per-user models folder; created if missing)")
    p.add_argument("--base-url", default=None, help=f"where to download from (default: $PICOGPT_BASE_URL, else "
                   f"{DEFAULT_BASE_URL})")
    p.add_argument("--checkpoint-dir", default=None,
                   help="convert the checkpoint already in this folder, with no network at all")
    p.add_argument("--out", default=None, help="where to write model.dat (default: next to the checkpoint)")
    add_dtype_argument(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def convert_tf_command(args):
    started = time.perf_counter()
    if args.checkpoint_dir is None:  # fetch: download (resuming) + convert
        out = args.out and files.output_file(args.out, "model.dat", create_folder=True)
        out = fetch(args.model_size, args.models_dir, base_url=args.base_url, progress=not args.no_progress, out=out,
                    weight_dtype=args.dtype)
        hparams = open_model_file(out).hparams
    else:
        require_tensorflow()
        checkpoint_dir = Path(args.checkpoint_dir)
        if not checkpoint_dir.is_dir():
            raise PicogptError(f"checkpoint folder {checkpoint_dir} does not exist")
        out = files.output_file(args.out if args.out is not None else checkpoint_dir / "model.dat", "model.dat",
                                create_folder=True)
        hparams = convert_checkpoint(checkpoint_dir, out, args.dtype)
    report_written(out, hparams, time.perf_counter() - started)


def add_dtype_argument(p):
    p.add_argument("--dtype", choices=WEIGHT_DTYPES, default="f32",
                   help="how to store the weight matrices: f32 (default) or bf16, bfloat16 rounded to nearest even "
                        "(half the file; multiplied natively by --backend mkl on Intel CPUs with bfloat16 "
                        "instructions, widened to float32 at load elsewhere)")


# ---------------------------------------------------------------------------------------------------
# picogpt convert-dtype MODEL --to bf16

def convert_dtype_parser(prog):
    p = ArgumentParser(prog=prog, description="Rewrite a model.dat with its weight matrices in another type: "
                       "bf16 (bfloat16, rounded to nearest even: half the bytes) or f32 (exact).")
    p.add_argument("model", help="a size name (looked up under --models-dir), demo, or a path to a model.dat")
    p.add_argument("--to", required=True, choices=WEIGHT_DTYPES, help="the weight type to write: f32 or bf16")
    p.add_argument("--out", default=None, metavar="FILE",
                   help="where to write (default: model-bf16.dat or model-f32.dat beside the input)")
    p.add_argument("--models-dir", default=None, help="where model sizes are looked up")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def convert_dtype_command(args):
    source = store.model_path(args.model, args.models_dir)
    out = Path(args.out) if args.out is not None else source.with_name(f"model-{args.to}.dat")
    out = files.output_file(out, f"model-{args.to}.dat", create_folder=True)
    started = time.perf_counter()
    hparams = convert_dtype(source, out, args.to)
    report_written(out, hparams, time.perf_counter() - started)


def report_written(out, hparams, seconds):
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB: n_layer {hparams['n_layer']}, n_embd "
          f"{hparams['n_embd']}, n_head {hparams['n_head']}, n_ctx {hparams['n_ctx']}, n_vocab "
          f"{hparams['n_vocab']}) in {seconds:.1f} s", file=sys.stderr)


# ---------------------------------------------------------------------------------------------------
# picogpt convert-hf DIR   (tools/convert_hf_checkpoint.py)

def convert_hf_parser(prog):
    p = ArgumentParser(prog=prog, description="Convert a Hugging Face GPT-2 model folder "
                       "(config.json and model.safetensors, or shards with model.safetensors.index.json) to "
                       "picogpt's model.dat. Needs safetensors only: no PyTorch, no TensorFlow.")
    p.add_argument("folder", metavar="DIR", help="the model folder, e.g. one filled by "
                   "`hf download openai-community/gpt2 config.json model.safetensors --local-dir DIR`")
    p.add_argument("--out", default=None, help="where to write model.dat (default: DIR/model.dat)")
    add_dtype_argument(p)
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def convert_hf_command(args):
    out = Path(args.out) if args.out is not None else Path(args.folder) / "model.dat"
    if args.out is not None or Path(args.folder).is_dir():  # (a missing folder is convert_hf's to explain)
        out = files.output_file(out, "model.dat", create_folder=True)
    t = time.perf_counter()
    hparams = convert_hf_checkpoint(args.folder, out, args.dtype)
    report_written(out, hparams, time.perf_counter() - t)


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
    p.add_argument("--backend", default="numpy", choices=blas.BACKENDS, help="picogpt's BLAS (default: numpy)")
    p.add_argument("--blas-lib", default=None, metavar="PATH", help="picogpt's BLAS: this CBLAS shared library")
    p.add_argument("--threads", type=positive_int, default=None, metavar="N",
                   help="threads for picogpt's BLAS and for PyTorch (default: each library's own choice)")
    p.add_argument("--reference-model", default=None, metavar="PATH",
                   help="give PyTorch the weights of this model.dat instead of --model's (same shape): "
                        "compare two conversions, or see where a changed weight shows")
    p.add_argument("--atol", type=non_negative_float, default=parity.ATOL,
                   help=f"absolute tolerance (default: {parity.ATOL:g})")
    p.add_argument("--rtol", type=non_negative_float, default=parity.RTOL,
                   help=f"tolerance relative to the reference's largest magnitude at each position "
                        f"(default: {parity.RTOL:g})")
    p.add_argument("--json", default=None, metavar="FILE", help="also write every number to FILE as JSON")
    p.set_defaults(bf16="widen")  # a bfloat16 file: the float32 model of its rounded weights, at float32's tolerance
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def parity_command(args):
    torch, _ = parity.require_torch()  # before loading gigabytes that could not be compared
    if args.json:  # and before minutes of work whose numbers could not be written
        args.json = files.output_file(args.json, default_name="parity.json")
    started = time.perf_counter()
    model = load_model(args, prog=args.prog)  # the BLAS backend and threads, and the default model, as generate
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    loaded = time.perf_counter() - started
    result = parity.check(model, args.prompt, args.n_tokens, args.atol, args.rtol, args.reference_model)
    result["seconds"]["load"] += loaded
    parity.write_report(result)
    if args.json:
        files.write_atomically(args.json, (json.dumps(result, indent=1) + "\n").encode())
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


# ---------------------------------------------------------------------------------------------------
# Dispatch

# name: (parser(prog), command(args), one line for `picogpt --help`)
SUBCOMMANDS = {
    "generate": (generate_parser, generate_command, "continue a prompt (the default: `picogpt \"prompt\" -n 20`)"),
    "score": (score_parser, score_command, "log-probability and perplexity of a text"),
    "attention": (attention_parser, attention_command, "pictures of a layer's attention weights"),
    "explain": (explain_parser, explain_command, "a web page of what the model computes over a prompt"),
    "score-corpus": (lambda prog: corpus_parser(prog, "score"), lambda args: corpus_command(args, "score"),
                     "score every document of .jsonl/.txt files, resumably (on Ray with --ray)"),
    "complete-corpus": (lambda prog: corpus_parser(prog, "complete"), lambda args: corpus_command(args, "complete"),
                        "continue every document of .jsonl/.txt files, resumably (on Ray with --ray)"),
    "verify": (verify_parser, verify_command, "check a model file's checksum and weights"),
    "convert-tf": (convert_tf_parser, convert_tf_command, "download OpenAI's checkpoint and convert it to model.dat"),
    "convert-hf": (convert_hf_parser, convert_hf_command, "convert a Hugging Face model folder to model.dat"),
    "convert-dtype": (convert_dtype_parser, convert_dtype_command,
                      "rewrite a model.dat with bfloat16 (or float32) weight matrices"),
    "parity": (parity_parser, parity_command, "compare picogpt with PyTorch layer by layer on a model"),
    "bench": (bench_parser, bench_command, "time picogpt against PyTorch on the same weights"),
}


def main(argv=None, prog=None):
    """`picogpt [SUBCOMMAND] ...`: the first argument names a subcommand, else it is generate's prompt.

    prog names the program in messages (default "picogpt SUBCOMMAND", "picogpt" for generate); the
    scripts in tools/ give their own file's name.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    name = argv[0] if argv and argv[0] in SUBCOMMANDS else "generate"
    if argv and argv[0] == name:
        argv = argv[1:]
    make_parser, command, _ = SUBCOMMANDS[name]
    prog = prog or ("picogpt" if name == "generate" else f"picogpt {name}")
    args = make_parser(prog).parse_args(argv)
    args.prog, args.argv = prog, argv
    return run(prog, command, args)
