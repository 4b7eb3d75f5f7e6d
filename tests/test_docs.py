"""Every snippet of README.md and docs/*.md runs as written on a CPU machine (issue 15 item 18).

What runs, per document, in a fresh temporary working directory, in document order:

- each ```python block, all blocks of one document sharing one namespace (as a reader pastes
  them one after the other into one session);
- each line of a ```sh / ```bash block that starts with ``quantoracle`` or
  ``python -m quantoracle``: the command runs in this process (``quantoracle.cli.main``) and must
  exit 0. Other shell lines (``pip install``, ``python3 -m venv``, ``torchrun``) are shown, not run;
- each ```json block must parse.

Other fences (plain ```, ```text, ```toml) are output or data and are not run.

A snippet that cannot run on a CPU machine says so where readers see it: a ```python or ```sh
block whose first line is a comment ``# needs a CUDA GPU``, ``# needs CUDA GPUs`` or
``# needs a downloaded model`` (free text may follow), or one shell line ending in such a
comment, is skipped. Nothing else is skipped: an unmarked snippet that needs ``cuda``, a
variable it does not define, or a file no earlier snippet of its document wrote fails here with
the document's own file name and line in the traceback.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import shlex
import traceback
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]  # not docs/examples/**

FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})(?P<info>[^`]*)$")
NEEDS = re.compile(r"#\s*needs (a CUDA GPU|CUDA GPUs|a downloaded model)\b")
"""The marks of a snippet a CPU machine cannot run (see the module docstring)."""
SHELL_LANGUAGES = {"sh", "bash", "shell", "console"}
COMMAND = re.compile(r"^(?:\$\s+)?(?:quantoracle|python3? -m quantoracle)(?:\s|$)")


@dataclass(frozen=True)
class Block:
    """One fenced block: its language (first word of the info string), first content line
    (1-based, in the document) and text."""

    language: str
    line: int
    text: str

    @property
    def marked(self) -> bool:
        first = self.text.lstrip().splitlines()[0] if self.text.strip() else ""
        return bool(NEEDS.match(first))


def blocks(path: Path) -> list[Block]:
    """The fenced blocks of a Markdown file, in order (CommonMark fences: ``` or ~~~, closed by
    a fence of the same character at least as long)."""
    found, lines = [], path.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        fence, indent = opening["fence"], len(opening["indent"])
        body, j = [], i + 1
        while j < len(lines):
            closing = FENCE.match(lines[j])
            if closing and closing["fence"][0] == fence[0] and len(closing["fence"]) >= len(fence) \
                    and not closing["info"].strip():
                break
            line = lines[j]
            body.append(line[indent:] if line[:indent] == " " * indent else line.lstrip())
            j += 1
        words = opening["info"].split()
        found.append(Block(words[0].lower() if words else "", i + 2, "\n".join(body) + "\n"))
        i = j + 1
    return found


def commands(block: Block) -> list[tuple[int, list[str]]]:
    """The ``quantoracle`` lines of a shell block that a CPU runs: (line, argv after the program)."""
    if block.marked:
        return []
    found = []
    for offset, line in enumerate(block.text.splitlines()):
        if not COMMAND.match(line) or NEEDS.search(line):
            continue
        words = shlex.split(line.removeprefix("$").strip(), comments=True)
        argv = words[1:] if words[0] == "quantoracle" else words[3:]
        assert not {"|", "||", "&&", ";", ">", "<"} & set(argv), (
            f"line {block.line + offset}: {line!r} is a pipeline; the docs test runs single commands")
        found.append((block.line + offset, argv))
    return found


def _run_python(block: Block, namespace: dict, where: str) -> None:
    # Leading newlines make the traceback's line numbers the document's own.
    code = compile("\n" * (block.line - 1) + block.text, where, "exec")
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            exec(code, namespace)
    except Exception:
        pytest.fail(f"the python block at {where}:{block.line} failed:\n{traceback.format_exc()}",
                    pytrace=False)


def _run_command(argv: list[str], where: str) -> None:
    from quantoracle.cli import main

    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(argv)
    assert code == 0, (
        f"{where}: `quantoracle {shlex.join(argv)}` exited {code}\nstdout:\n{stdout.getvalue()[-3000:]}"
        f"\nstderr:\n{stderr.getvalue()[-3000:]}")


@pytest.mark.parametrize("path", DOCUMENTS, ids=[p.relative_to(ROOT).as_posix() for p in DOCUMENTS])
def test_snippets_run_on_cpu(path: Path, tmp_path, monkeypatch):
    for name in ("QUANTORACLE_BACKEND", "QUANTORACLE_STRICT_PLUGINS", "QUANTORACLE_VERIFY",
                 "QUANTORACLE_QUARANTINE", "QUANTORACLE_CHECK_INPUTS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    document = path.relative_to(ROOT).as_posix()
    namespace: dict = {"__name__": "__main__"}
    for block in blocks(path):
        if block.language == "python" and not block.marked:
            _run_python(block, namespace, str(path))
        elif block.language in SHELL_LANGUAGES:
            for line, argv in commands(block):
                _run_command(argv, f"{document}:{line}")
        elif block.language == "json":
            try:
                json.loads(block.text)
            except json.JSONDecodeError as err:
                pytest.fail(f"{document}:{block.line}: the json block does not parse: {err}")


# The parser and the convention themselves.

def test_blocks_parse_fences_and_marks(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text(
        "text\n```python\nx = 1\n```\n\n````sh\n# needs a CUDA GPU, and humming\nquantoracle demo\n````\n"
        "- item\n\n  ```sh\n  quantoracle backends   # every backend\n  quantoracle demo --device cuda  "
        "# needs a CUDA GPU\n  pip install quantoracle\n  ```\n```\noutput\n```\n")
    found = blocks(doc)
    assert [(b.language, b.line, b.marked) for b in found] == [
        ("python", 3, False), ("sh", 7, True), ("sh", 13, False), ("", 18, False)]
    assert commands(found[1]) == []
    assert commands(found[2]) == [(13, ["backends"])]


def test_an_unmarked_snippet_that_fails_is_reported_with_its_line(tmp_path, monkeypatch):
    doc = tmp_path / "doc.md"
    doc.write_text("# Doc\n\n```python\nimport torch\ny = layer(x)\n```\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(pytest.fail.Exception, match=r"(?s)doc\.md:4 .*line 5.*NameError"):
        _run_python(blocks(doc)[0], {}, str(doc))


def test_a_failing_command_is_reported(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(AssertionError, match="exited 2"):
        _run_command(["resolve", "no-such-checkpoint"], "doc.md:1")


LINK = re.compile(r"\]\((?P<target>[^)\s]+)\)")


def anchors(path: Path) -> set[str]:
    """GitHub's anchors of a Markdown file's headings: lower case, punctuation dropped, spaces to
    hyphens (fenced blocks skipped)."""
    found, fenced = set(), False
    for line in path.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            fenced = not fenced
        elif not fenced and line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            found.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return found


def test_relative_links_resolve():
    missing = []
    for path in DOCUMENTS:
        for match in LINK.finditer(path.read_text(encoding="utf-8")):
            target = match["target"]
            if re.match(r"[a-z]+:", target):
                continue
            file, _, anchor = target.partition("#")
            linked = (path.parent / file).resolve() if file else path
            where = f"{path.relative_to(ROOT).as_posix()}: ({target})"
            if not linked.exists():
                missing.append(where)
            elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
                missing.append(f"{where}: no heading with that anchor")
    assert not missing, "broken links:\n" + "\n".join(missing)
