"""The command line: `python -m tools.demo_model --help` explains every flag."""

import argparse
import sys
from pathlib import Path

from picogpt.tokenizer import N_VOCAB

from .corpus import DOCS_DIR, DOCS_PACKAGE
from .judging import RARE_P, judge
from .prefixes import UL_OPENING, UL_PREFIX
from .run import train
from .sequence_level import BEST_OF_GENERIC, BEST_OF_TEMPERATURE, BEST_OF_TOP_K, UL_CONTINUATION, UL_EVERY, UL_LR
from .training import BATCH_SIZE


def parser():
    p = argparse.ArgumentParser(prog="python -m tools.demo_model",
                                description="Train picogpt's demo model (data/demo/README.md gives the commands that "
                                            "made it), or judge model files' greedy text.")
    run = p.add_argument_group("a training run")
    run.add_argument("--max-steps", type=int, default=20000,
                     help="the most optimizer steps; a run normally stops earlier, on the held-out loss (or, with "
                          "--unlikelihood-from, on the loops)")
    run.add_argument("--out", default="data/demo/model.dat", help="model file to write")
    run.add_argument("--log", default="data/demo/train_log.txt", help="log file (appended to when resuming)")
    run.add_argument("--compare", metavar="MODEL_DAT",
                     help="another model file whose held-out perplexity and loop counts the log gives too")
    run.add_argument("--seed", type=int, default=1234, help="seeds initialisation and batch order")
    run.add_argument("--threads", type=int, default=2, help="PyTorch threads (the result depends on it)")
    run.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                     help="products in bfloat16 autocast or float32 (auto: bf16 where the CPU has it natively)")
    run.add_argument("--docs", default=DOCS_DIR,
                     help=f"the HTML documentation (Debian: apt-get install {DOCS_PACKAGE})")
    run.add_argument("--checkpoint", help="written at every evaluation; the same command resumes from it (default: "
                                          "build/demo_checkpoint.safetensors, or build/demo_unlikelihood.safetensors "
                                          "with --unlikelihood-from)")
    run.add_argument("--fresh", action="store_true", help="start again, ignoring an existing checkpoint")
    run.add_argument("--continue-from", metavar="CHECKPOINT",
                     help="train on from a checkpoint with its decay undone (the .stable.safetensors written when the "
                          "decay began), at the constant rate, until the held-out loss stops improving or --max-steps")
    run.add_argument("--token-unlikelihood", metavar="WEIGHT", type=float,
                     help="add this weight times token-level unlikelihood to the next-token steps: -log(1 - p) of "
                          "each of the window's earlier tokens that is not the next one")

    steps = p.add_argument_group(
        "sequence-level steps", f"One step in {UL_EVERY} of a run from --unlikelihood-from continues {BATCH_SIZE} "
                                f"training prefixes greedily for {UL_CONTINUATION} tokens and trains on what it "
                                f"wrote; these flags shape those steps.")
    steps.add_argument("--unlikelihood-from", metavar="MODEL_DAT",
                       help=f"train a trained model on against its greedy loops, with a fresh AdamW at a constant "
                            f"rate {UL_LR}, until the loops in greedy continuations of training openings stop falling "
                            f"or --max-steps; without --unlikelihood-margin, each token that repeats a four-token "
                            f"phrase is made less likely (-log(1 - p)); the log is appended to")
    steps.add_argument("--unlikelihood-prefixes", choices=["windows", "openings", "sentences"], default="windows",
                       help=f"what the steps continue: windows, random {UL_PREFIX}-token training windows (the "
                            f"default); openings, the first {UL_OPENING} tokens of random training documents, as "
                            f"short as a prompt; sentences, openings alternating with documents' whole first "
                            f"sentences (up to {UL_PREFIX} tokens), as a prompt that is one already")
    steps.add_argument("--unlikelihood-margin", metavar="NATS", type=float,
                       help="instead of -log(1 - p), push each repeating token this many nats below the model's best "
                            "other choice (a hinge on the logits), and no further")
    steps.add_argument("--unlikelihood-reference", metavar="MODEL_DAT",
                       help="the frozen model that --unlikelihood-margin-among, --unlikelihood-nonsense and "
                            "--unlikelihood-best-of consult (default: the starting model, --unlikelihood-from)")
    steps.add_argument("--unlikelihood-margin-among", metavar="K", type=int,
                       help="with --unlikelihood-margin: take the best other choice among the reference's K likeliest "
                            "next tokens only (K >= 2), so that the hinge raises a token that model found plausible")
    steps.add_argument("--unlikelihood-nonsense", metavar="P", type=float,
                       help="with --unlikelihood-margin: also push down each continuation token that the reference "
                            "gives p < P, as a repeating one is (greedy's junk as well as its loops)")
    steps.add_argument("--unlikelihood-early-end", action="store_true",
                       help="with --unlikelihood-margin: also push down an <|endoftext|> that ends a continuation "
                            "holding no complete sentence (empty, or only \"The following functions are:\"), as a "
                            "repeating token is, even where the document does end there")
    steps.add_argument("--unlikelihood-best-of", metavar="K", type=int,
                       help=f"also sample K continuations of each prefix from the reference (temperature "
                            f"{BEST_OF_TEMPERATURE}, top-k {BEST_OF_TOP_K}) and train on the best of those that end "
                            f"after a complete sentence without repeating a phrase (or, with --unlikelihood-nonsense, "
                            f"holding nonsense): the highest mean log-probability the reference gives it after the "
                            f"prefix, less {BEST_OF_GENERIC} times that without")
    steps.add_argument("--keep", choices=["last", "fewest-loops"], default="last",
                       help="write the weights of the last evaluation (the default) or of the one at which the fewest "
                            "training openings looped (kept as the run goes in the checkpoint's .best.safetensors; "
                            "given to a finished run, writes them without training)")

    judging = p.add_argument_group("judging")
    judging.add_argument("--judge", metavar="MODEL_DAT", nargs="+",
                         help="do not train: for each model file, count the greedy continuations of every held-out "
                              "docstring opening that repeat a phrase, that end before completing a sentence, and "
                              "that are distinct")
    judging.add_argument("--reference", metavar="MODEL_DAT",
                         help=f"with --judge: also count the continuations that hold a token this model gives p < "
                              f"{RARE_P:g} (nonsense), and give its mean negative log-likelihood of their tokens")
    return p


def check(args):
    """Exit with a one-line error for flags that cannot go together or name nothing."""
    if args.reference and not args.judge:
        sys.exit("error: --reference judges models; give --judge MODEL_DAT ... as well")
    if args.unlikelihood_from and args.continue_from:
        sys.exit("error: --unlikelihood-from and --continue-from start from different places; give one")
    unlikelihood_only = [  # flags that mean nothing without sequence-level steps, and what each does to them
        (args.unlikelihood_prefixes != "windows", "--unlikelihood-prefixes chooses what unlikelihood steps continue"),
        (args.keep != "last", "--keep chooses among the evaluations of unlikelihood steps"),
        (args.unlikelihood_margin is not None, "--unlikelihood-margin shapes unlikelihood steps"),
        (args.unlikelihood_margin_among is not None, "--unlikelihood-margin-among shapes unlikelihood steps"),
        (args.unlikelihood_nonsense is not None, "--unlikelihood-nonsense shapes unlikelihood steps"),
        (args.unlikelihood_early_end, "--unlikelihood-early-end shapes unlikelihood steps"),
        (args.unlikelihood_best_of is not None, "--unlikelihood-best-of adds to unlikelihood steps"),
        (args.unlikelihood_reference is not None, "--unlikelihood-reference holds unlikelihood steps")]
    for given, what in unlikelihood_only:
        if given and not args.unlikelihood_from:
            sys.exit(f"error: {what}; give --unlikelihood-from MODEL_DAT as well")
    margin_only = [  # flags that mean nothing without the margin, and what each does with it
        (args.unlikelihood_margin_among is not None, "--unlikelihood-margin-among chooses the margin's other token"),
        (args.unlikelihood_nonsense is not None, "--unlikelihood-nonsense pushes tokens down with the margin"),
        (args.unlikelihood_early_end, "--unlikelihood-early-end pushes <|endoftext|> down with the margin")]
    for given, what in margin_only:
        if given and args.unlikelihood_margin is None:
            sys.exit(f"error: {what}; give --unlikelihood-margin NATS as well")
    if args.unlikelihood_nonsense is not None and not 0 < args.unlikelihood_nonsense < 1:
        sys.exit("error: --unlikelihood-nonsense needs a probability P between 0 and 1 (the shipped model used 1e-4)")
    if args.unlikelihood_reference is not None and not Path(args.unlikelihood_reference).is_file():
        sys.exit(f"error: no model file {args.unlikelihood_reference} to hold unlikelihood steps to")
    if args.unlikelihood_margin_among is not None and not 2 <= args.unlikelihood_margin_among <= N_VOCAB:
        sys.exit(f"error: --unlikelihood-margin-among needs K from 2 (the repeating token may be one of them) to "
                 f"{N_VOCAB} (the vocabulary)")
    if args.unlikelihood_best_of is not None and args.unlikelihood_best_of < 1:
        sys.exit("error: --unlikelihood-best-of needs K of 1 or more samples a prefix (the shipped model used 4)")
    if args.unlikelihood_from and not Path(args.unlikelihood_from).is_file():
        sys.exit(f"error: no model file {args.unlikelihood_from} to train on with unlikelihood steps")
    if not Path(args.docs, "index.html").is_file():
        sys.exit(f"error: no Python documentation in {args.docs}; install it with `apt-get install {DOCS_PACKAGE}` "
                 f"or name its HTML folder with --docs")


def main(argv=None):
    args = parser().parse_args(argv)
    if args.judge:
        named = args.judge + ([args.reference] if args.reference else [])
        missing = [path for path in named if not Path(path).is_file()]
        if missing:
            sys.exit(f"error: no model file {missing[0]}; name a model.dat (such as data/demo/model.dat)")
        return judge(args.judge, args.reference)
    check(args)
    if args.checkpoint is None:  # the sequence-level steps keep their own, so as not to resume (or replace) the other
        args.checkpoint = f"build/demo_{'unlikelihood' if args.unlikelihood_from else 'checkpoint'}.safetensors"
    train(args)


if __name__ == "__main__":
    main()
