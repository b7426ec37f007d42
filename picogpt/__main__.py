"""`python -m picogpt` and the `picogpt` console script: the command line of picogpt.cli.

Importing the command line loads NumPy and the rest, a noticeable fraction of a second: a Ctrl-C in
that time ends quietly, as it does later (picogpt.cli.run), instead of with an import's traceback.
"""

import sys

from picogpt.errors import interrupted  # a module of plain Python: importing it is instant


def main(argv=None, prog=None):
    try:
        from picogpt.cli import main as cli_main
    except BaseException as e:
        if not interrupted(e):
            raise
        print(f"{prog or 'picogpt'}: interrupted", file=sys.stderr)
        return 130
    return cli_main(argv, prog=prog)


if __name__ == "__main__":
    sys.exit(main())
