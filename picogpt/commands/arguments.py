"""What the subcommands share: the parser that fails in one line, the kinds of argument (one wording per
kind of number), the model options and loading, the sampling options and how they resolve, and reading
a text file. Each subcommand's own options are in its module beside it.
"""

import argparse
import math
import os
import secrets
import sys
import warnings

from .. import blas, store
from ..download import MODEL_SIZES
from ..errors import BadArgument, PicogptError, one_line
from ..shipped import DEMO
from ..store import default_model, load


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line (argparse's default prints the whole usage first)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {one_line(message)}; see {self.prog} --help\n")


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
    p.add_argument("--backend", default="auto", choices=("auto",) + blas.BACKENDS,
                   help="which library multiplies the matrices: auto (default: the fastest for the model file's "
                        "weights on this CPU; -v says which and why), NumPy's own BLAS, an OpenBLAS found "
                        "automatically, Apple's Accelerate (macOS), Intel's oneMKL (also bfloat16 weights), or "
                        "oneDNN (also bfloat16 and int8 weights)")
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
        # (a command that takes --download says so; not `make run`, which cannot pass it: the Makefile says
        # when it runs picogpt, in $PICOGPT_MAKE_TARGET)
        can_download = download is not None and not os.environ.get("PICOGPT_MAKE_TARGET")
        raise PicogptError(f"{e}" + (" (or add --download)" if can_download else "")) from None
    if store.widening_worth_saying(loaded):  # a bfloat16 file this backend or CPU cannot multiply natively
        print(f"{prog}: {loaded.precision.note}", file=sys.stderr)
    return loaded


# ---------------------------------------------------------------------------------------------------
# Sampling and the rules of what may come next: generate's and complete-corpus's

def add_sampling_arguments(parser, seed_help="seed for sampling: the same seed gives the same text (default: "
                                              "random; -v shows it)",
                           title="sampling (default: greedy, the most likely token every time; --top-k, --top-p, "
                                 "--seed or --num-samples > 1 without --temperature sample at 1)"):
    """Two argument groups: sampling (--temperature, --top-k, --top-p, --seed) and the rules every decoding
    follows, greedy, sampled or by beams (--repetition-penalty, --no-repeat-ngram-size, --min-new-tokens).
    Returns the sampling group, for a subcommand's own sampling options."""
    sampling = parser.add_argument_group(title)
    sampling.add_argument("--temperature", type=non_negative_float, default=None, metavar="T",
                          help="sample from softmax(logits / T); 0 is greedy (default: 0, or 1 with another "
                               "sampling flag)")
    sampling.add_argument("--top-k", type=positive_int, default=None, metavar="K",
                          help="sample among the K most likely tokens only")
    sampling.add_argument("--top-p", type=probability, default=None, metavar="P",
                          help="sample among the most likely tokens holding probability P (nucleus sampling)")
    sampling.add_argument("--seed", type=non_negative_int, default=None, help=seed_help)
    rules = parser.add_argument_group("rules of what may come next (greedy, sampling and beams alike; Hugging "
                                      "Face's semantics)")
    rules.add_argument("--repetition-penalty", type=positive_float, default=1.0, metavar="R",
                       help="divide positive logits of tokens already in the text by R, multiply negative ones "
                            "(1 is none, 1.2 is typical)")
    rules.add_argument("--no-repeat-ngram-size", type=non_negative_int, default=0, metavar="N",
                       help="never repeat an N-token sequence of the text, prompt included (0 is none)")
    rules.add_argument("--min-new-tokens", type=non_negative_int, default=0, metavar="N",
                       help="<|endoftext|> cannot end the text before N new tokens (0 is none)")
    return sampling


def rule_options(args):
    """The rules' keyword arguments (picogpt.sampling.logits_processors') from the parsed arguments."""
    return dict(repetition_penalty=args.repetition_penalty, no_repeat_ngram_size=args.no_repeat_ngram_size,
                min_new_tokens=args.min_new_tokens)


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



# ---------------------------------------------------------------------------------------------------
# Text files

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
