"""The README is a short product page that stays true: every command it shows still exists with
the flags it shows, CI runs its two set-up commands, every link (README and docs/) resolves on
disk, and neither it nor the docs speak of issues."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from cli import cli

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
SET_UP = ('pip install torch==2.13.0 -e ".[test,ui]"', "python -m pytest -q")


def _code_lines(text: str) -> list[str]:
    """The lines of the README's shell blocks, comments cut, continuations joined."""
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            if line and not line.startswith("#"):
                lines.append(line)
    return lines


def _command(words: list[str]) -> tuple[click.Command, list[str]]:
    """The click command `cogedit WORDS...` names (groups followed), and the words after it."""
    command, rest = cli, words
    while isinstance(command, click.Group) and rest and rest[0] in command.commands:
        command, rest = command.commands[rest[0]], rest[1:]
    return command, rest


def _flags(command: click.Command) -> set[str]:
    return {opt for p in command.params for opt in p.opts + p.secondary_opts if opt.startswith("--")}


def test_readme_is_short_and_ci_runs_its_set_up():
    text = README.read_text()
    assert len(text.splitlines()) <= 200
    lines = _code_lines(text)
    assert [line for line in lines if line in SET_UP] == list(SET_UP)
    ci = (ROOT / ".ci" / "run").read_text()
    assert all(f"\n{c}\n" in ci for c in SET_UP)


def test_every_command_the_readme_shows_exists_with_its_flags():
    shown = [shlex.split(line) for line in _code_lines(README.read_text()) if line.startswith("cogedit ")]
    assert {w[1] for w in shown} >= {"demo", "ui", "invert", "edit", "run", "tiny-model"}
    for words in shown:
        command, rest = _command(words[1:])
        assert command is not cli, f"README: {' '.join(words)}: no such command"
        unknown = {w.split("=")[0] for w in rest if w.startswith("--")} - _flags(command)
        assert not unknown, f"README: {' '.join(words)}: {command.name} has no {', '.join(sorted(unknown))}"
        help_text = CliRunner().invoke(cli, [*words[1 : len(words) - len(rest)], "--help"])
        assert help_text.exit_code == 0, help_text.output


def test_the_python_example_names_engines_own_functions():
    import engine

    block = re.search(r"```python\n(.*?)```", README.read_text(), re.S)[1]
    called = set(re.findall(r"engine\.(\w+)\(", block))
    assert called >= {"invert", "edit", "run"} and all(callable(getattr(engine, name, None)) for name in called)


def _anchors(page: Path) -> set[str]:
    """GitHub's anchors of a page's headings."""
    heads = re.findall(r"^#+ (.+)$", page.read_text(), re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in heads}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_link_resolves(page):
    for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
        if re.match(r"[a-z]+://", target):
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        assert file.exists(), f"{page.name}: link {target} names no file"
        if anchor:
            assert anchor in _anchors(file), f"{page.name}: link {target}: {file.name} has no heading #{anchor}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_pages_are_written_for_users(page):
    text = page.read_text()
    assert not re.search(r"\b[Ii]ssues? ?#?\d+", text), f"{page.name} names an issue"
    assert "target" not in text.lower() or page.name == "troubleshooting.md", f"{page.name} speaks of internal targets"
