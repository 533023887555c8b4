"""The committed results rerun anywhere (experiments/README.md, "Paths in the results"):

- no file under ``experiments/results/`` and no line of ``experiments/README.md`` names an
  absolute path of the machine that ran it (``/work/...``, ``/tmp/...``, ``/home/...``); its
  folders are the placeholders ``$DATA``, ``$OUT`` and ``$WEIGHTS``, or paths relative to the
  repository root. URLs (``https://...``, ``gs://...``) are no paths of a machine;
- every command of a ``commands.md`` (its code blocks, continuation lines joined) and every
  recorded ``command`` of a results JSON is ``python experiments/<script>`` or ``python -m
  cifar_flax.<module>``, run from the repository root, and the scripts and configs it names
  exist there.

Fast: text only, nothing is run. The checks are functions of the repository root, so that the
last tests can plant a slip in a copy and see it found.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TEXT_SUFFIXES = (".md", ".json", ".txt", ".csv", ".jsonl")
# A "/" that starts a token (after a space, quote, "=", ":", a bracket or a comma) followed by a
# path segment: "/tmp/x", "--workdir=/work/runs", "imagefolder:/tmp/B", "'/home/me/r.pth'". The
# "//" of a URL never matches: its first "/" is followed by "/", its second preceded by "/".
ABSOLUTE = re.compile(r"(?<![^\s\"'`=:(\[{,<|])/[A-Za-z0-9_.~-][^\s\"'`)\]},;]*")
PREFIXES = ("python experiments/", "python -m cifar_flax.")
# Repository files a command names: scripts and configs (``configs/ablation.py:dense``).
REPO_FILE = re.compile(r"(?:^|[=\s:])((?:experiments|configs)/[\w./-]+?\.py)(?::[\w,]*)?$")


def checked_files(root: Path) -> list[Path]:
    """The text files of ``experiments/results/`` and ``experiments/README.md``."""
    results = sorted(p for p in (root / "experiments" / "results").rglob("*")
                     if p.is_file() and p.suffix in TEXT_SUFFIXES)
    return results + [root / "experiments" / "README.md"]


def absolute_paths(root: Path) -> list[str]:
    """``"<file>:<line>: <path>"`` for every absolute path in the checked files."""
    found = []
    for path in checked_files(root):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            found += [f"{path.relative_to(root)}:{number}: {m.group(0)}"
                      for m in ABSOLUTE.finditer(line)]
    return found


def code_commands(text: str) -> list[str]:
    """The commands of a markdown file's code blocks (indented or fenced), each on one line:
    a line ending in a backslash continues on the next."""
    commands, current, fenced = [], "", False
    for line in text.splitlines():
        if line.strip().startswith("```"):
            fenced = not fenced
            continue
        if not (fenced or line.startswith("    ")) or not line.strip():
            continue
        current += " " + line.strip().removesuffix("\\").strip()
        if not line.rstrip().endswith("\\"):
            commands.append(current.strip())
            current = ""
    return commands


def recorded_commands(root: Path) -> list[tuple[str, str]]:
    """``(where, command)``: the code blocks of every commands.md, and the ``command`` and
    ``shift_command`` fields of every results JSON (at any depth)."""
    results = root / "experiments" / "results"
    out = [(str(p.relative_to(root)), c) for p in sorted(results.rglob("commands.md"))
           for c in code_commands(p.read_text())]

    def walk(value: object, where: str) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                if key in ("command", "shift_command") and isinstance(item, str):
                    out.append((where, item))
                walk(item, where)
        elif isinstance(value, list):
            for item in value:
                walk(item, where)

    for p in sorted(results.rglob("*.json")):
        walk(json.loads(p.read_text()), str(p.relative_to(root)))
    return out


def command_problems(root: Path) -> list[str]:
    """What keeps a recorded command from running as written from the repository root: another
    start than PREFIXES, or a script or config it names that the repository lacks."""
    problems = []
    for where, command in recorded_commands(root):
        if not command.startswith(PREFIXES):
            problems.append(f"{where}: starts neither with {PREFIXES}: {command[:80]}")
            continue
        for token in shlex.split(command):
            m = REPO_FILE.search(token)
            if m and not (root / m.group(1)).is_file():
                problems.append(f"{where}: {m.group(1)} does not exist: {command[:80]}")
    return problems


def test_no_absolute_paths_in_the_committed_results():
    assert absolute_paths(ROOT) == []


def test_recorded_commands_run_from_the_repository_root():
    commands = recorded_commands(ROOT)
    assert any(where.endswith("commands.md") for where, _ in commands)  # The parser finds them.
    assert command_problems(ROOT) == []


def _copy(tmp_path: Path) -> Path:
    """The checked part of the repository (and the scripts and configs commands name)."""
    for folder in ("experiments", "configs"):
        shutil.copytree(ROOT / folder, tmp_path / folder)
    return tmp_path


def test_a_planted_absolute_path_is_found(tmp_path):
    root = _copy(tmp_path)
    summary = root / "experiments" / "results" / "data_efficiency" / "summary.json"
    summary.write_text(summary.read_text().replace("$WEIGHTS", "/home/someone/runs/A", 1))
    readme = root / "experiments" / "README.md"
    readme.write_text(readme.read_text() + "\n    tar xzf data.tar.gz -C /tmp\n"
                      "See https://github.com/google/flax/tree/main and gs://bucket/run.\n")
    found = absolute_paths(root)
    assert [f.split(": ", 1)[1] for f in found] == ["/home/someone/runs/A", "/tmp"]
    assert found[0].startswith("experiments/results/data_efficiency/summary.json:")


def test_a_planted_bad_command_is_found(tmp_path):
    root = _copy(tmp_path)
    commands = root / "experiments" / "results" / "data_efficiency" / "commands.md"
    text = commands.read_text().replace("python experiments/data_efficiency.py",
                                        "python experiments/gone.py", 1)
    commands.write_text(text + "\n    cd /work && python -m cifar_flax.main --config=configs/x.py\n")
    problems = command_problems(root)
    assert len(problems) == 2
    assert "experiments/gone.py does not exist" in problems[0]
    assert "starts neither" in problems[1]
    (root / "configs" / "scratch.py").unlink()
    assert any("configs/scratch.py does not exist" in p for p in command_problems(root))
