"""Every ```python block of README.md and docs/*.md runs as written (each on its own, in a fresh
namespace, in a temporary working folder), so that the documentation cannot drift from the code.

New blocks are picked up automatically. A block that genuinely cannot run here (downloads, hours of
work) is marked by an HTML comment on the line just before its fence, and the test reports why:

    <!-- skip-test: needs the SD-1.5 weights from the hub -->

A block whose data set is not on this machine (``FileNotFoundError: ... data not found``) is
skipped with that message.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([\w+-]*)")
SKIP = re.compile(r"<!--\s*skip-test:\s*(.*?)\s*-->")


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    source: str
    skip: str | None  # the reason given in a skip-test comment

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def python_blocks(path: Path) -> list[Block]:
    """The ```python (or ```py) blocks of a Markdown file, with the skip reason of each."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, lang = m.groups()
        end = i + 1
        while end < len(lines) and not lines[end].strip().startswith(fence):
            end += 1
        if lang.lower() in ("python", "py", "python3"):
            before = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
            reason = SKIP.search(before)
            body = [ln[len(indent):] if ln.startswith(indent) else ln for ln in lines[i + 1:end]]
            blocks.append(Block(path, i + 1, "\n".join(body) + "\n", reason.group(1) if reason else None))
        i = end + 1
    return blocks


BLOCKS = [b for doc in DOCS for b in python_blocks(doc)]


def test_the_docs_have_python_blocks_and_the_parser_finds_them(tmp_path):
    assert len([b for b in BLOCKS if b.path.name == "README.md"]) >= 4
    doc = tmp_path / "x.md"
    doc.write_text("text\n\n<!-- skip-test: needs weights -->\n```python\nx = 1\n```\n\n```bash\nls\n```\n"
                   "1. item\n\n   ```python\n   y = 2\n   ```\n")
    found = python_blocks(doc)
    assert [(b.line, b.source, b.skip) for b in found] == [(4, "x = 1\n", "needs weights"), (13, "y = 2\n", None)]


@pytest.mark.parametrize("block", BLOCKS, ids=[b.where for b in BLOCKS])
def test_code_block_runs_as_written(block: Block, tmp_path, monkeypatch):
    if block.skip is not None:
        pytest.skip(f"{block.where}: {block.skip}")
    monkeypatch.chdir(tmp_path)  # relative outputs (outputs/...) land in a temporary folder
    code = compile(block.source, block.where, "exec")
    try:
        exec(code, {"__name__": "__docs__"})
    except FileNotFoundError as err:  # a data set missing on this machine, named by the loader
        if any(hint in str(err) for hint in ("data not found", "FEWSHOT_CCD_DATA", "CMC_REC_DATA")):
            pytest.skip(f"{block.where}: {err}")
        raise
