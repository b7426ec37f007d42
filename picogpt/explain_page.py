"""The page of `picogpt explain`: one self-contained HTML file drawn from picogpt.explain's data.

    from picogpt.explain_page import write_page
    write_page(explanation, "explain.html")       # atomically; nothing half-written after Ctrl-C

The page is a template with its style and script beside it in picogpt/page/, put together here into one
file that opens from file:// with no server and fetches nothing: the data goes in as JSON inside a
<script type="application/json"> element, with every "<", ">" and "&" written as a \\u escape so that no
text in it (a prompt, a token) can end that element; the script reads it and puts text into the page only
as text. A Content-Security-Policy lets exactly this page's script and style run, and nothing load.

In a notebook the same page shows inline (picogpt.explain.Explanation._repr_html_): `inline_frame` puts it
whole into an iframe's srcdoc, sandboxed.
"""

import base64
import hashlib
import html
import json
import re
from pathlib import Path

from .outputs import write_atomically

PAGE_DIR = Path(__file__).resolve().parent / "page"
_SLOTS = re.compile(r"@(STYLE|SCRIPT|DATA|STYLE_HASH|SCRIPT_HASH)@")
_JSON_ESCAPES = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}


def script_json(data):
    """JSON that is safe inside a <script> element: no "</script", "<!--" or "&..." can appear in it."""
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return re.sub("[<>&\u2028\u2029]", lambda m: _JSON_ESCAPES[m.group()], text)


def csp_hash(text):
    return "sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode("ascii")


def render(data):
    """The page's HTML for the data of Explanation.to_json()."""
    template = (PAGE_DIR / "explain.html").read_text(encoding="utf-8")
    style = (PAGE_DIR / "explain.css").read_text(encoding="utf-8")
    script = (PAGE_DIR / "explain.js").read_text(encoding="utf-8")
    assert "</script" not in script.lower() and "</style" not in style.lower(), "the page's code would end its element"
    slots = {"STYLE": style, "SCRIPT": script, "DATA": script_json(data),
             "STYLE_HASH": csp_hash(style), "SCRIPT_HASH": csp_hash(script)}
    return _SLOTS.sub(lambda m: slots[m.group(1)], template)  # one pass: the data's text is never a slot


FRAME_HEIGHT = 900  # pixels of a notebook's output; the page scrolls inside the frame


def inline_frame(page, height=FRAME_HEIGHT):
    """The page (render's HTML) as an <iframe> for a notebook's output: the whole page is the srcdoc attribute,
    escaped, so it stays one self-contained document that fetches nothing; sandbox="allow-scripts" runs its
    own script in an origin of its own (no allow-same-origin), with no access to the notebook around it."""
    return (f'<iframe srcdoc="{html.escape(page, quote=True)}" sandbox="allow-scripts" title="picogpt explain" '
            f'style="width: 100%; height: {int(height)}px; border: 1px solid #ccc;"></iframe>')


def write_page(explanation, path, json_path=None):
    """Write the page of an Explanation to path, and with json_path its data (Explanation.to_json(), the
    same the page is drawn from) as a JSON file; each atomically. Returns the page's path."""
    data = explanation.to_json()
    if json_path is not None:
        write_atomically(json_path, (json.dumps(data, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8"))
    return write_atomically(path, render(data).encode("utf-8"))
