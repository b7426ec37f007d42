"""picogpt score FILE: how probable a text is under the model."""

import math

from ..scoring import score
from ..tokenizer import EOT, encode
from .arguments import ArgumentParser, add_model_arguments, load_model, positive_int, read_text


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


COMMANDS = {"score": (score_parser, score_command)}
