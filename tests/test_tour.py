"""docs/tour.md runs as written: its ```python blocks in order, in one namespace, from the repository's root, and
each block prints exactly the ```text block under it, numbers within the relative tolerance the document states.

After a change in behaviour the document must show, rewrite its outputs from a fresh run and read the diff:

    .venv-test/bin/python tests/test_tour.py
"""
import contextlib
import io
import math
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOUR = ROOT / "docs" / "tour.md"
BLOCK = re.compile(r"```python\n(.*?)```\n(\n?```text\n(.*?)```\n)?", re.S)
NUMBER = re.compile(r"[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?")


def run_blocks(text: str) -> list[tuple[re.Match, str]]:
    """Each python block's match and what it printed, run in order in one namespace."""
    sys.path.insert(0, str(ROOT))
    namespace, results, cwd = {"__name__": "__tour__"}, [], os.getcwd()
    os.chdir(ROOT)
    try:
        for match in BLOCK.finditer(text):
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                exec(compile(match.group(1), f"{TOUR.name}, block {len(results) + 1}", "exec"), namespace)
            results.append((match, out.getvalue()))
    finally:
        os.chdir(cwd)
    return results


def tolerance(text: str) -> float:
    found = re.search(r"relative tolerance of ([0-9.e-]+)", text)
    assert found, f"{TOUR}: states no tolerance ('relative tolerance of X')"
    return float(found.group(1))


def same(expected: str, printed: str, rel: float) -> bool:
    """Equal text, and numbers equal within `rel` (integers exactly)."""
    if NUMBER.sub("#", expected) != NUMBER.sub("#", printed):
        return False
    for a, b in zip(NUMBER.findall(expected), NUMBER.findall(printed)):
        if a != b and not (any(c in a + b for c in ".eE") and math.isclose(float(a), float(b), rel_tol=rel,
                                                                           abs_tol=1e-12)):
            return False
    return True


def test_the_tour_prints_what_it_shows():
    text = TOUR.read_text(encoding="utf-8")
    results = run_blocks(text)
    assert len(results) >= 8, "the tour lost its blocks"
    rel = tolerance(text)
    for i, (match, printed) in enumerate(results, 1):
        expected = match.group(3) or ""
        assert same(expected, printed, rel), f"block {i} printed:\n{printed}\nthe tour shows:\n{expected}"


def anchors(markdown: str) -> set[str]:
    """GitHub's anchors of a document's headings: lower case, punctuation dropped, spaces as hyphens."""
    return {re.sub(r"[^a-z0-9 -]", "", h.strip().lower()).replace(" ", "-")
            for h in re.findall(r"^#+ (.*)$", markdown, re.M)}


def test_links_between_the_tour_and_paper_vs_code_resolve():
    docs = {p.name: p.read_text(encoding="utf-8") for p in (TOUR, ROOT / "docs" / "paper-vs-code.md")}
    links = [(name, target, anchor) for name, text in docs.items()
             for target, anchor in re.findall(r"\]\(([\w-]+\.md)#([\w-]+)\)", text)]
    assert {target for _, target, _ in links} == set(docs)  # each links the other
    for name, target, anchor in links:
        assert anchor in anchors(docs[target]), f"{name} links {target}#{anchor}, which has no such heading"


def test_the_comparison_catches_a_changed_number():
    assert same("ratio 1.9997 at rank 1\n", "ratio 1.99975 at rank 1\n", 1e-3)
    assert not same("ratio 1.9997 at rank 1\n", "ratio 1.9 at rank 1\n", 1e-3)
    assert not same("128 layers\n", "127 layers\n", 1e-3)  # integers exactly
    assert not same("expanded\n", "not expanded\n", 1e-3)


if __name__ == "__main__":  # rewrite the outputs
    text = TOUR.read_text(encoding="utf-8")
    pieces, last = [], 0
    for match, printed in run_blocks(text):
        pieces += [text[last:match.start()], f"```python\n{match.group(1)}```\n"]
        if printed:
            pieces.append(f"```text\n{printed}```\n")
        last = match.end()
    TOUR.write_text("".join(pieces) + text[last:], encoding="utf-8")
    print(f"rewrote the outputs in {TOUR}")
