"""Every command in the README and docs/*.md works as typed in bash and in zsh: no unquoted glob
bracket in an argument. zsh stops with "no matches found" on
``pip install .[test]`` or ``tracking.backends=[mlflow]``, where bash passes the word on unchanged.

Commands are the lines of ```bash/```sh/```shell/```console blocks and inline code spans that start
with a command (``fedmaml ...``, ``pip install ...``); synopses belong in ```text blocks. When zsh is
installed, the same words are also expanded by zsh itself."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHELL_BLOCKS = ("bash", "sh", "shell", "console", "zsh")
COMMANDS = ("fedmaml ", "flwr ", "pip ", "python ", "make ", "tensorboard ", "mlflow ", "wandb ",
            "flower-", ".venv/", "PYTHONPATH=")
GLOB = set("[]")  # a * in a command is a pattern meant to match files (results/quickstart*)


def documents() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def commands(path: Path, inline: bool = True) -> list[tuple[int, str]]:
    """(line number, command) of every shell command in a Markdown file; ``inline``: with the
    code spans in prose (which may be synopses: ``--to tensorboard|mlflow``)."""
    found, block, heredoc = [], None, None
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if heredoc is not None:  # a file's text (YAML), not a command
            heredoc = None if line.strip() == heredoc else heredoc
            continue
        fence = re.match(r"\s*```(\w*)", line)
        if fence:
            block = None if block is not None else fence.group(1)
            continue
        text = line.strip().removeprefix("$ ")
        if block in SHELL_BLOCKS and text and not text.startswith("#"):
            found.append((n, text))
            marker = re.search(r"<<-?\s*['\"]?(\w+)", text)
            heredoc = marker.group(1) if marker else None
        elif block is None and inline:
            found += [(n, span) for span in re.findall(r"`([^`]+)`", line)
                      if span.startswith(COMMANDS)]
    return found


def unquoted_globs(command: str) -> list[str]:
    """The words of ``command`` (up to a comment) with a glob character outside quotes."""
    bad, word, flagged, quote, i = [], "", False, None, 0
    while i < len(command):
        c = command[i]
        if quote:
            quote = None if c == quote else quote
        elif c == "\\" and i + 1 < len(command):
            word += command[i:i + 2]
            i += 2
            continue
        elif c in "'\"":
            quote = c
        elif c == "#" and not word:
            break
        elif c.isspace():
            if flagged:
                bad.append(word)
            word, flagged = "", False
            i += 1
            continue
        elif c in GLOB:
            flagged = True
        word += c
        i += 1
    if flagged:
        bad.append(word)
    return bad


def test_the_checker_sees_what_zsh_refuses():
    assert unquoted_globs('pip install -e ".[test]"') == []
    assert unquoted_globs("pip install -e .[test]") == [".[test]"]
    assert unquoted_globs("fedmaml run c.yaml tracking.backends=[mlflow]  # [x]") == [
        "tracking.backends=[mlflow]"]
    assert unquoted_globs("fedmaml sweep c.yaml --grid 'hidden=[40,40],[20]'") == []
    assert unquoted_globs("fedmaml run c.yaml model.hidden=20,20") == []


@pytest.mark.parametrize("path", documents(), ids=lambda p: p.name)
def test_documented_commands_work_in_bash_and_zsh(path):
    found = commands(path)
    bad = [f"{path.name}:{n}: {cmd}  <- {', '.join(words)}"
           for n, cmd in found if (words := unquoted_globs(cmd))]
    assert not bad, "quote these words (zsh: no matches found):\n" + "\n".join(bad)


@pytest.mark.skipif(shutil.which("zsh") is None, reason="zsh is not installed")
def test_zsh_expands_the_documented_arguments(tmp_path):
    """zsh itself, in an empty directory (no file a glob could match), expands the arguments of
    every fedmaml command in the docs' code blocks without an error."""
    lines = []
    for path in documents():
        for _, cmd in commands(path, inline=False):
            # not templates (<run_dir>), patterns meant to match files, or continued lines
            if cmd.startswith("fedmaml ") and not set("<*") & set(cmd) and not cmd.endswith("\\"):
                lines.append("print -r -- " + cmd.split("#")[0].removeprefix("fedmaml "))
    assert lines
    for line in lines:
        proc = subprocess.run(["zsh", "-f", "-c", line], cwd=tmp_path, capture_output=True,
                              text=True)
        assert proc.returncode == 0, f"zsh: {line}: {proc.stderr.strip()}"
