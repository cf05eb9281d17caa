"""The README's examples run as written (Python blocks, and its `python -m distload` lines)."""

import os
import re
import subprocess
import sys

import pytest

README = os.path.join(os.path.dirname(__file__), "..", "README.md")


def _blocks(lang: str) -> list[str]:
    with open(README, encoding="utf-8") as f:
        return re.findall(rf"```{lang}\n(.*?)```", f.read(), re.S)


@pytest.mark.parametrize("index", range(len(_blocks("python"))))
def test_python_block_runs(index, tmp_path):
    code = _blocks("python")[index]
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr


def _cli_lines():
    lines = []
    for block in _blocks("sh"):
        for line in block.splitlines():
            if line.startswith("python -m distload"):
                command, _, comment = line.partition("#")
                expected = re.match(r"\s*exit (\d)", comment)
                lines.append((command.split()[1:], int(expected.group(1)) if expected else 0))
    return lines


@pytest.mark.parametrize("args,code", _cli_lines(), ids=lambda v: " ".join(v) if isinstance(v, list) else str(v))
def test_cli_line_exit_code(args, code, tmp_path):
    proc = subprocess.run([sys.executable, *args], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == code, proc.stdout + proc.stderr
    if code == 0:
        assert proc.stdout.startswith("distload load:") or proc.stdout.startswith("distload dry-run:")
    if "--json" in args:
        assert (tmp_path / args[args.index("--json") + 1]).exists()


def test_readme_names_the_ci_command():
    with open(os.path.join(os.path.dirname(__file__), "..", ".ci", "run"), encoding="utf-8") as f:
        ci = f.read()
    assert "bash scripts/test" in ci
    assert "bash scripts/test" in "".join(_blocks("sh"))


def test_the_json_table_lists_every_verification_status_the_code_defines():
    from distload.checkpoint.reference import UNREAD
    from distload.verify import FAILING, VERIFIED, FileVerdict
    with open(README, encoding="utf-8") as f:
        row = next(line for line in f if line.startswith("| `verification` |"))
    statuses = row.split("`status` is ", 1)[1].split("; `algorithm`", 1)[0]
    verified, failing = statuses.split("; or, failing the load: ", 1)
    failing, unread = failing.split("; or, for a weight file the load does not read", 1)
    listed = [re.findall(r"`([a-z-]+)`", part) for part in (verified, failing, unread)]
    assert [sorted(part) for part in listed] == [[VERIFIED], sorted(FAILING), sorted(UNREAD)]
    keys = re.search(r"`files` has one `\{([a-z_, ]+)\}` per file", row).group(1).split(", ")
    assert keys == list(FileVerdict(name="config.json", status=VERIFIED).to_json())
