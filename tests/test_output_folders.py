"""export and evaluate never delete or overwrite what they did not write.

Every check runs before any work; the output is written into a new folder next to ``--output``
and moved into place at the end; ``--force`` replaces only an earlier output of the same command,
never a run's workdir, a folder holding runs, or a folder with other files. Through the commands'
``main`` on a copy of the session's smoke run.
"""

from __future__ import annotations

import json
import shutil

import pytest

from cifar_flax import evaluate, export


@pytest.fixture
def run(smoke_run, tmp_path):
    """A copy of the smoke run in ``tmp_path/runs/smoke`` (tests may try to destroy it)."""
    dst = tmp_path / "runs" / "smoke"
    shutil.copytree(smoke_run, dst)
    return dst


def _tree(path) -> dict[str, int]:
    """{relative path: size} of every file under ``path`` (what must survive untouched)."""
    return {str(p.relative_to(path)): p.stat().st_size for p in sorted(path.rglob("*"))
            if p.is_file()}


def _one_error(capsys, *words: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    for w in words:
        assert w in err[0], err[0]
    return err[0]


def _export(run, out, *extra) -> int:
    return export.main(["--workdir", str(run), "--output", str(out), "--nosaved_model", *extra])


@pytest.mark.parametrize("target", ["workdir", "parent"])
def test_export_force_never_deletes_a_run_or_the_folder_holding_runs(run, capsys, target):
    out = run if target == "workdir" else run.parent
    before = _tree(run.parent)
    assert _export(run, out, "--force") == 1
    _one_error(capsys, "holds the training run", str(run))
    assert _tree(run.parent) == before


def test_export_with_a_mistyped_workdir_keeps_the_previous_export(run, tmp_path, capsys):
    out = tmp_path / "export"
    assert _export(run, out) == 0
    capsys.readouterr()
    before = _tree(out)
    assert _export(tmp_path / "runs" / "smok", out, "--force") == 1
    _one_error(capsys, "does not exist")
    assert _tree(out) == before


def test_export_force_replaces_only_an_earlier_export(run, tmp_path, capsys):
    out = tmp_path / "export"
    assert _export(run, out) == 0
    first = json.loads((out / "model.json").read_text())["provenance"]["created"]
    assert _export(run, out, "--force", "--checkpoint", "latest") == 0
    assert json.loads((out / "model.json").read_text())["provenance"]["checkpoint"] == "latest"
    assert first  # The earlier export was replaced as a whole: no leftovers beside it.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "runs"]
    (out / "notes.txt").write_text("mine")
    capsys.readouterr()
    assert _export(run, out, "--force") == 1
    _one_error(capsys, "notes.txt")
    assert (out / "notes.txt").read_text() == "mine"


def test_evaluate_never_writes_over_the_runs_report(run, capsys):
    before = _tree(run)
    for force in ([], ["--force"]):
        for out in (run / "report", run):
            assert evaluate.main(["--workdir", str(run), "--output", str(out), *force]) == 1
            _one_error(capsys, str(out))
    assert _tree(run) == before


def test_evaluate_into_a_new_subfolder_of_the_run_has_its_own_report(run, capsys):
    out = run / "eval_test"
    assert evaluate.main(["--workdir", str(run), "--output", str(out)]) == 0
    got = json.loads((out / "results.json").read_text())
    trained = json.loads((run / "report" / "results.json").read_text())
    assert got["test_accuracy"] == trained["test_accuracy"]
    assert not (out / "curves.png").exists()  # No training curves in an evaluation.
    assert "steps" not in got and "images_per_sec" not in got
    assert got["wall_seconds"] < trained["wall_seconds"]  # Its own, not the run's.
    md = (out / "report.md").read_text()
    assert md.startswith("# Evaluation report") and "curves" not in md
    capsys.readouterr()
    assert evaluate.main(["--workdir", str(run), "--output", str(out)]) == 1  # Not empty.
    _one_error(capsys, "--force")
    assert evaluate.main(["--workdir", str(run), "--output", str(out), "--force"]) == 0
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".eval")) == []
