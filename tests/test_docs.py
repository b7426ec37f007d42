"""The README and the pages of docs/: every relative link leads to a file that exists and every #anchor to a
heading of its page (GitHub's rules), every page is linked from another, and the README stays short."""

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "data" / "demo" / "README.md"]
README_MAX_LINES = 250

FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,}).*?^ {0,3}\1[`~]*[ \t]*$", re.M | re.S)
CODE_SPAN = re.compile(r"(`+)(?!`).+?(?<!`)\1(?!`)", re.S)
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+[\"'(][^)]*)?\)")
REFERENCE = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s.*)?$", re.M)
HTML_TARGET = re.compile(r"<(?:a|img)\s[^>]*?(?:href|src)=[\"']([^\"']+)[\"']", re.I)
HTML_ANCHOR = re.compile(r"<a\s[^>]*?(?:id|name)=[\"']([^\"']+)[\"']", re.I)
HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.*?)(?:[ \t]+#+)?[ \t]*$", re.M)


def without_code(text):
    """The text with fenced blocks and code spans blanked out, so that what they show is not read as links."""
    text = FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    return CODE_SPAN.sub(lambda m: "CODE" + "\n" * m.group(0).count("\n"), text)


def slug(heading):
    """GitHub's anchor for a heading: its text as rendered (links by their text, code without backquotes,
    no emphasis marks), lowercased, punctuation removed except '-' and '_', each space a '-'."""
    text = re.sub(r"!?\[((?:[^\[\]]|\[[^\[\]]*\])*)\]\([^)]*\)", r"\1", heading)  # [text](url) -> text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "")
    text = re.sub(r"(\*+|\b_+|_+\b)(?=\S)(.+?)(?<=\S)\1", r"\2", text)  # *emphasis*, __strong__
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(page):
    """The anchors a page's headings (and explicit <a id/name>) give, duplicates numbered as GitHub does."""
    text = page.read_text(encoding="utf-8")
    found, seen = set(HTML_ANCHOR.findall(text)), {}
    blanked = FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    for _, heading in HEADING.findall(blanked):
        base = slug(heading)
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def links(page):
    """The link targets a page holds outside code: inline links and images, references, HTML links."""
    text = without_code(page.read_text(encoding="utf-8"))
    return LINK.findall(text) + REFERENCE.findall(text) + HTML_TARGET.findall(text)


def broken_links(page, root=REPO):
    """Each relative link of a page that leads nowhere, with the reason."""
    problems = []
    for target in links(page):
        if re.match(r"[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("//"):
            continue  # https:, mailto: ... : not this repository's
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if root.resolve() not in resolved.parents and resolved != root.resolve():
            problems.append(f"{target}: outside the repository")
        elif not resolved.exists():
            problems.append(f"{target}: no such file {resolved.relative_to(root.resolve())}")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            problems.append(f"{target}: no heading gives #{anchor} in {resolved.name}")
    return problems


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_and_anchor_resolves(page):
    assert links(page) or page.name != "README.md" or page.parent != REPO, "the README links to nothing"
    problems = broken_links(page)
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_every_page_of_docs_is_linked_from_the_readme_or_another_page():
    linked = set()
    for page in PAGES:
        for target in links(page):
            path = target.partition("#")[0]
            if path and not re.match(r"[a-z][a-z0-9+.-]*:", path, re.I):
                linked.add((page.parent / path).resolve())
    orphans = [p.name for p in sorted((REPO / "docs").glob("*.md")) if p.resolve() not in linked]
    assert not orphans, f"pages of docs/ that nothing links to: {orphans}"


def test_the_readme_is_short():
    lines = (REPO / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move the depth into docs/"


def test_github_anchor_rules():
    assert slug("Getting GPT-2") == "getting-gpt-2"
    assert slug("The explain page: `picogpt explain`") == "the-explain-page-picogpt-explain"
    assert slug("The tokenizer's files") == "the-tokenizers-files"
    assert slug("The model's code: picogpt/model.py") == "the-models-code-picogptmodelpy"
    assert slug("score_corpus and *Ray*") == "score_corpus-and-ray"
    assert slug("[Linked](other.md) heading") == "linked-heading"


def test_the_checker_finds_broken_links_and_anchors(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "other.md").write_text("# Other page\n\n## A section\n\n## A section\n")
    page = tmp_path / "README.md"
    page.write_text("# Top\n\n"
                    "[fine](docs/other.md) [fine](docs/other.md#a-section) [fine](docs/other.md#a-section-1) "
                    "[fine](#top) [external](https://example.com/x#y) `[in code](missing.md)`\n\n"
                    "```\n[in a block](missing.md)\n```\n\n"
                    "[no file](docs/missing.md) [no anchor](docs/other.md#nowhere) [no anchor here](#nowhere) "
                    "![no picture](docs/missing.png) [outside](../../elsewhere.md)\n")
    problems = broken_links(page, root=tmp_path)
    assert [p.split(":")[0] for p in problems] == ["docs/missing.md", "docs/other.md#nowhere", "#nowhere",
                                                    "docs/missing.png", "../../elsewhere.md"]
