"""picogpt "prompt" -n 20 (or picogpt generate ...): continue prompts greedily, by sampling, or by beam
search, and print the text as it comes."""

import argparse
import sys
import time
from pathlib import Path

from .. import __version__, blas
from ..beam import beam_search
from ..errors import BadArgument, PicogptError, one_line, plural
from ..generate import TextBatch, TextStream, check_fits, prompt_ids
from ..tokenizer import EOT
from ..trace import print_trace
from .arguments import (ArgumentParser, add_model_arguments, add_sampling_arguments, finite_float, load_model,
                        non_negative_int, positive_int, read_text, rule_options, sampling_settings, stop_text)


def generate_parser(prog="picogpt"):
    """The default subcommand's parser (picogpt.cli gives it the list of subcommands as its epilog)."""
    p = ArgumentParser(prog=prog, formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Generate text with GPT-2, computed in NumPy.")
    p.add_argument("prompt", nargs="?", default=None,
                   help="text to continue (default: read standard input if it is not a terminal; "
                        "an empty prompt starts from <|endoftext|>)")
    p.add_argument("-f", "--prompt-file", default=None, metavar="FILE",
                   help="read the prompt from a UTF-8 text file ('-' for standard input)")
    p.add_argument("--prompts-file", default=None, metavar="FILE",
                   help="continue every line of this UTF-8 file (blank lines skipped), all in one batch")
    p.add_argument("-n", "--n-tokens", type=non_negative_int, default=20, metavar="N",
                   help="number of tokens to generate at most (default: 20)")
    sampling = add_sampling_arguments(p)
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
    p.add_argument("--version", action="version", version=f"picogpt {__version__} ({Path(__file__).parent.parent})")
    return p


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


def check_lines_fit(model, ids, where, args, remedy=None):
    """A line of --prompts-file too long for the context, with the new tokens, is named by its number (the
    decoding's own check, on the batch's longest row, could not say which it is)."""
    too_long = [row for row, p in enumerate(ids) if len(p) + args.n_tokens > model.hparams["n_ctx"]]
    if too_long and where[too_long[0]]:
        try:
            check_fits(model, len(ids[too_long[0]]), args.n_tokens, remedy)
        except PicogptError as e:
            raise PicogptError(f"{where[too_long[0]]} of {args.prompts_file}: {e}") from None


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
    ids = [prompt_ids(p) for p in prompts]
    if not args.sliding_window:
        check_lines_fit(model, ids, where, args)
    batch = TextBatch(model, ids, args.n_tokens, stop=args.stop, stop_at_eot=not args.ignore_eot,
                      num_samples=args.num_samples, use_cache=not args.no_cache, seed=args.seed,
                      sliding_window=args.sliding_window, temperature=args.temperature, top_k=args.top_k,
                      top_p=args.top_p, **rule_options(args))
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
        print(verbose_report(model, batch, args, step_times, t0 - args.imports_started, t1 - t0, t2 - t1),
              file=sys.stderr)


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
    check_lines_fit(model, ids, where, args, remedy="shorten the prompt or ask for fewer tokens")
    result = beam_search(model, ids, args.n_tokens, args.num_beams, length_penalty=args.length_penalty,
                         eos_token_id=None if args.ignore_eot else EOT, **rule_options(args))
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
    rules = [f"repetition penalty {args.repetition_penalty:g}" if args.repetition_penalty != 1 else "",
             f"no repeated {args.no_repeat_ngram_size}-grams" if args.no_repeat_ngram_size else "",
             f"at least {plural(args.min_new_tokens, 'new token')}" if args.min_new_tokens else ""]
    if any(rules):
        lines.append(f"rules: {', '.join(filter(None, rules))}")
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


COMMANDS = {"generate": (generate_parser, generate_command)}
