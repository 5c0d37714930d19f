"""The README's commands are real: every `mixcls …` line of its bash blocks parses with the CLI's
own parser, and every in-page link names a heading."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from mixcls.cli import build_parser

README = Path(__file__).resolve().parents[1] / "README.md"


def _bash_lines(text: str) -> list[str]:
    """The `mixcls …` commands of the ```bash blocks, continuation lines joined, comments cut."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if line.startswith("mixcls "):
                commands.append(line)
    return commands


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


COMMANDS = _bash_lines(README.read_text())


def test_the_readme_has_commands_of_every_kind():
    used = {line.split()[1] for line in COMMANDS}
    assert {"train", "predict", "blend", "runs", "tta", "export", "duplicates", "pseudo"} <= used


def _variants(line: str) -> tuple[list[list[str]], list[str]]:
    """The argv lists a README line stands for, and the flags of its optional [--flag V] parts.

    The README's shorthand: `…` for "your other flags" (or, after a flag, its value), `[--x V]`
    for an optional part, `a|b|c` for one of several values."""
    tokens, optional, argv = shlex.split(line)[1:], [], []
    depth = 0
    for token in tokens:
        if token.startswith("["):
            depth += 1
            optional.append(token.strip("[]"))
        if depth:
            depth -= token.endswith("]")
            continue
        if token in ("…", "..."):
            if argv and argv[-1].startswith("--"):
                argv.append("x")
            continue
        argv.append(token)
    choices = [i for i, t in enumerate(argv) if "|" in t and not t.startswith("-")]
    variants = [argv]
    for i in choices:
        variants = [v[:i] + [alt] + v[i + 1:] for v in variants for alt in argv[i].split("|")]
    return variants, optional


@pytest.mark.parametrize("line", COMMANDS)
def test_each_readme_command_parses(line):
    variants, optional = _variants(line)
    for argv in variants:
        parser = build_parser(argv)
        try:
            parser.parse_args(argv)
        except SystemExit as stop:
            pytest.fail(f"README command does not parse (exit {stop.code}): {' '.join(argv)}")
        command = parser._subparsers._group_actions[0].choices[argv[0]]
        unknown = [flag for flag in optional if flag not in command._option_string_actions]
        assert not unknown, f"{line}: unknown optional flag(s) {unknown}"


def test_every_in_page_link_names_a_heading():
    text = README.read_text()
    headings = {_slug(h) for h in re.findall(r"^#+ (.+)$", text, flags=re.M)}
    links = set(re.findall(r"\]\(#([^)]+)\)", text))
    assert links and links <= headings, sorted(links - headings)
