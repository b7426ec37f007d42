"""Looking inside: picogpt explain "prompt" (a web page of one forward pass) and picogpt attention
"prompt" --layer L (pictures of attention weights)."""

import argparse
import shlex
import sys
import time

from ..attention_plot import attention_picture
from ..errors import BadArgument, plural, shown
from ..explain import MAX_TOKENS, check_heads, explain, parse_heads
from ..explain_page import write_page
from ..outputs import not_a_file, output_file
from .arguments import ArgumentParser, add_model_arguments, load_model, non_negative_int


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
    out = output_file(args.out, "explain.html")
    json_out = output_file(args.json, "explain.json") if args.json else None
    if json_out is not None and not_a_file(out) is None and out.resolve() == json_out.resolve():
        raise BadArgument(f"--json and --out both name {out}: the page would replace the JSON; give two files")
    model = load_model(args, args.prog)
    check_heads(model.hparams, args.ablate)  # before the work
    started = time.perf_counter()
    seen = explain(model, args.prompt, ablate=args.ablate, model_name=args.model,
                   command=command_line(args.prog, args.argv))
    write_page(seen, out, json_out)
    size = "" if not_a_file(out) else f"{out.stat().st_size / 1e6:.1f} MB, "  # (a device has no size to give)
    print(f"wrote {out} ({size}{plural(len(seen.ids), 'token')}, {time.perf_counter() - started:.1f} s)"
          + (f" and {json_out}" if json_out else "") + "; open it in a browser", file=sys.stderr)


def command_line(prog, argv):
    """The command as given, for the page's footer: prog and the arguments, shell-quoted (bytes that are not
    UTF-8, in a file name, as \\xNN: the page is UTF-8)."""
    return " ".join([prog] + [shlex.quote(shown(w)) for w in argv])


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


COMMANDS = {"explain": (explain_parser, explain_command), "attention": (attention_parser, attention_command)}
