"""export, evaluate, eda and predict never delete or overwrite what they did not write.

Every check runs before any work; the output is written next to its place (a new folder, a
temporary file) and moved into place at the end, so a failure half-way leaves what was there;
``--force`` replaces only an earlier output of the same command, never a run's workdir, a folder
holding runs, or a folder or file of other content; predict writes into a run's workdir only
under ``<run>/predictions/``. Through the commands' ``main`` on a copy of the session's smoke run.
"""

from __future__ import annotations

import csv
import errno
import json
import shutil

import numpy as np
import pytest
from conftest import ROOT
from etils import epath

from cifar_flax import eda, evaluate, export, predict
from cifar_flax.analysis import dataset_stats
from cifar_flax.run import workdir
from cifar_flax.run.workdir import check_output_file, check_output_folder, output_folder


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


def _one_error(capsys, *words: str, progress: bool = False) -> str:
    """The one ``error:`` line of stderr, holding ``words``; it is all of stderr, or with
    ``progress`` its last line (after progress bars)."""
    err = capsys.readouterr().err.strip().splitlines()
    errors = [ln for ln in err if ln.startswith("error: ")]
    assert errors == err[-1:] and (progress or len(err) == 1), err
    for w in words:
        assert w in err[-1], err[-1]
    return err[-1]


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


def test_evaluate_into_the_runs_evaluations_folder_has_its_own_report(run, capsys):
    out = run / "evaluations" / "test"
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
    assert sorted(p.name for p in out.parent.iterdir()) == ["test"]  # Nothing left beside it.


OWN_FOLDERS = {"export": "exports", "evaluate": "evaluations", "eda": "eda"}


def _command(name, run, out) -> int:
    """The command ``name`` (export, evaluate or eda) writing ``out``; its exit status."""
    if name == "eda":
        return _eda(out)
    return {"export": export, "evaluate": evaluate}[name].main(
        ["--workdir", str(run), "--output", str(out)])


@pytest.mark.parametrize("name", list(OWN_FOLDERS))
def test_each_command_writes_into_a_run_only_under_its_own_folder(run, capsys, name):
    """Inside a run still training (no report/ yet) export, evaluate and eda write only under
    <run>/<their folder>/, like predict: not report/ (the training's own, written later), not a
    new folder, not checkpoints/, not another command's folder. Refused before any work."""
    shutil.rmtree(run / "report")
    before = _tree(run)
    for out in ("report", "notes", "checkpoints/x", "predictions/x", OWN_FOLDERS[name]):
        assert _command(name, run, run / out) == 1
        _one_error(capsys, "inside the training run", f"{run / OWN_FOLDERS[name]}/")
    assert _tree(run) == before and not (run / "report").exists()
    files = {"export": export.EXPORT_FILES, "eda": dataset_stats.EDA_FILES,
             "evaluate": evaluate.REPORT_FILES}[name]
    check_output_folder(str(run / OWN_FOLDERS[name] / "a"), False, name, bool, files,
                        OWN_FOLDERS[name])  # Under its own folder: allowed.


def test_a_full_folder_without_force_is_refused_before_walking_it(run, tmp_path, capsys,
                                                                  monkeypatch):
    """A slip like ``--output ~`` without --force is "not empty" at once: only --force walks
    the folder's tree for runs (which it then refuses)."""
    walked = []
    monkeypatch.setattr(workdir, "find_run", lambda folder: walked.append(folder))
    assert _export(run, tmp_path) == 1
    _one_error(capsys, "is not empty", "--force")
    assert walked == []
    monkeypatch.undo()
    assert _export(run, tmp_path, "--force") == 1
    _one_error(capsys, "holds the training run", str(run))


def test_a_gs_output_is_checked_up_to_its_bucket(monkeypatch):
    """gs://b/x/p.csv: the folders looked at for a run are gs://b/x and gs://b, never the
    ``gs://`` and ``/`` epath lists as its last parents (stubbed: no network)."""
    looked = set()

    def stub(self, *args, **kwargs):
        looked.add(str(self))
        return False

    for method in ("exists", "is_dir", "is_file"):
        monkeypatch.setattr(type(epath.Path("gs://b")), method, stub)
    check_output_file("gs://b/x/p.csv", False, "predict", bool, "predictions")
    assert looked == {"gs://b/x", "gs://b", "gs://b/x/p.csv"}


def test_a_move_into_place_failing_half_way_puts_the_earlier_output_back(tmp_path, monkeypatch):
    """On gs:// a folder's rename copies, then deletes: a failure half-way leaves part of the
    new output at ``out``. The earlier output must come back, whole, and nothing else stay."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.txt").write_text("earlier")
    real_rename = type(epath.Path(tmp_path)).rename

    def half_rename(self, target):
        if not self.name.startswith(".out.tmp."):
            return real_rename(self, target)
        epath.Path(target).mkdir()  # The first file copied, then the connection drops.
        shutil.copy(self / "a.txt", epath.Path(target) / "a.txt")
        raise OSError(errno.ECONNRESET, "Connection reset by peer")

    monkeypatch.setattr(type(epath.Path(tmp_path)), "rename", half_rename)
    with pytest.raises(OSError, match="Connection reset"):
        with output_folder(str(out)) as tmp:
            (tmp / "a.txt").write_text("new")
            (tmp / "b.txt").write_text("new")
    assert _tree(tmp_path) == {"out/a.txt": len("earlier")}
    assert (out / "a.txt").read_text() == "earlier"


def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("folder", ["own model.json", "model.json claiming an export"])
def test_export_force_refuses_a_folder_with_a_model_json_it_did_not_write(run, tmp_path, capsys,
                                                                          folder):
    """A model.json alone does not make a folder an earlier export: its format must be the
    export's and every file an export writes must be there."""
    out = tmp_path / "mine"
    out.mkdir()
    if folder == "own model.json":
        (out / "model.json").write_text(json.dumps({"name": "my model", "version": 3}))
    else:
        (out / "model.json").write_text(json.dumps({"format": export.FORMAT}))
        (out / "params.npz").write_bytes(b"my weights")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert _export(run, out, "--force") == 1
    _one_error(capsys, "no output of it", "--force replaces only an earlier output of export")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


@pytest.mark.parametrize("target", ["an earlier export", "an empty folder"])
def test_export_failing_half_way_leaves_the_output_as_it_was(run, tmp_path, capsys, monkeypatch,
                                                             target):
    """A failure after model.jax, params.npz and model.json were written (a full disk): one
    error line, the earlier export (or the empty folder) untouched, no partial folder left."""
    out = tmp_path / "out" / "export"
    out.mkdir(parents=True)
    if target == "an earlier export":
        assert _export(run, out) == 0
    before, written = _tree(tmp_path / "out"), []

    def fail(*args):  # Called once the other files are written: record them, then fail.
        written.extend(str(p) for p in (tmp_path / "out").rglob("model.json"))
        _disk_full()

    monkeypatch.setattr(export, "requirements", fail)
    capsys.readouterr()
    assert _export(run, out, "--force") == 1
    _one_error(capsys, "No space left on device")
    assert len(written) == 1 + (target == "an earlier export")  # It had written half an export.
    assert _tree(tmp_path / "out") == before
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["export"]


# ---- eda ----


def _eda(out, *extra) -> int:
    return eda.main(["--config", str(ROOT / "configs" / "smoke.py"), "--workdir", str(out),
                     "--samples_per_class", "2", *extra])


@pytest.mark.parametrize("target", ["user stats.json", "run"])
def test_eda_refuses_a_folder_it_did_not_write(run, tmp_path, capsys, target):
    if target == "run":
        out, words = run, ("holds the training run", "never writes over a run")
    else:
        out, words = tmp_path / "stats", ("no output of it",)
        out.mkdir()
        (out / "stats.json").write_text('{"mine": 1}')
    before = _tree(out)
    for force in ([], ["--force"]):
        assert _eda(out, *force) == 1
        err = _one_error(capsys, f"--workdir {out}")
        assert all(w in err for w in words) if force or target == "run" else "--force" in err
    assert _tree(out) == before


def test_eda_force_replaces_only_its_own_output_and_a_failure_keeps_it(tmp_path, capsys,
                                                                       monkeypatch):
    out, smaller = tmp_path / "eda", "--config.synthetic.num_test=32"
    assert _eda(out) == 0
    stats = json.loads((out / "stats.json").read_text())
    assert stats["written_by"] == "cifar_flax.eda" and stats["splits"]["test"]["num_images"] == 64
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    assert _eda(out, smaller) == 1  # An earlier EDA: replaced only with --force.
    _one_error(capsys, "--force")
    with monkeypatch.context() as m:  # Fails after stats.json and a PNG were written.
        m.setattr(dataset_stats, "plot_samples", _disk_full)
        assert _eda(out, "--force", smaller) == 1
    _one_error(capsys, "No space left on device", progress=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eda"]
    assert _eda(out, "--force", smaller) == 0
    stats = json.loads((out / "stats.json").read_text())
    assert stats["splits"]["test"]["num_images"] == 32
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eda"]


# ---- predict ----


@pytest.fixture
def images(tmp_path):
    np.save(tmp_path / "x.npy", np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3),
                                                                   dtype=np.uint8))
    return tmp_path / "x.npy"


def _predict(run, images, out, *extra) -> int:
    return predict.main(["--workdir", str(run), str(images), "--output", str(out), *extra])


# Files predict did not write, though they look alike (its CSV header, its JSON records).
USER_FILES = {
    "mydata.csv": "id,label\n1,cat\n",
    "header only.csv": "file,class_1,prob_1\n",
    "not probabilities.csv": "file,class_1,prob_1\nx.png,cat,high\n",
    "other records.json": json.dumps([{"file": "x.png", "label": "cat"}]),
    "extra key.json": json.dumps([{"file": "x.png", "top": [{"class": "cat", "probability": 1}],
                                   "note": "mine"}]),
}


@pytest.mark.parametrize("name", list(USER_FILES))
def test_predict_never_replaces_a_file_it_did_not_write(run, images, tmp_path, capsys, name):
    out = tmp_path / name
    out.write_text(USER_FILES[name])
    for force in ([], ["--force"]):
        assert _predict(run, images, out, *force) == 1
        _one_error(capsys, "is not an output of predict", "choose a new file")
    assert out.read_text() == USER_FILES[name]


@pytest.mark.parametrize("suffix", [".csv", ".json"])
def test_predict_replaces_its_own_output_only_with_force(run, images, tmp_path, capsys, suffix):
    out = tmp_path / "out" / f"p{suffix}"
    assert _predict(run, images, out, "--top_k", "1") == 0
    first = out.read_text()
    capsys.readouterr()
    assert _predict(run, images, out, "--top_k", "2") == 1
    _one_error(capsys, "earlier output of predict", "--force")
    assert out.read_text() == first
    assert _predict(run, images, out, "--top_k", "2", "--force") == 0
    if suffix == ".csv":
        assert next(csv.reader(out.open())) == ["file", "class_1", "prob_1", "class_2", "prob_2"]
    else:
        assert [len(d["top"]) for d in json.loads(out.read_text())] == [2, 2, 2]
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # No temporary file left.


def test_predict_writes_into_a_run_only_under_its_predictions_folder(run, images, capsys):
    before = _tree(run)
    for out in ("config.json", "run_info.json", "preds.csv", "report/p.json",
                "checkpoints/p.csv", "previous/p.csv"):
        for force in ([], ["--force"]):
            assert _predict(run, images, run / out, *force) == 1
            _one_error(capsys, "inside the training run", f"{run / 'predictions'}/")
    assert _tree(run) == before
    assert _predict(run, images, run / "predictions" / "p.csv") == 0
    assert sorted(_tree(run).keys() - before.keys()) == ["predictions/p.csv"]


def test_predict_failing_half_way_keeps_the_earlier_file(run, images, tmp_path, capsys,
                                                         monkeypatch):
    """A full disk after the CSV's first row: one error line, the earlier predictions file
    as it was, no partial or temporary file left."""
    out = tmp_path / "out" / "p.csv"
    assert _predict(run, images, out) == 0
    first = out.read_text()
    real_writer = csv.writer

    def writer(f):
        w, rows = real_writer(f), []

        class Failing:
            def writerow(self, row):
                rows.append(w.writerow(row))
                if len(rows) == 2:
                    f.flush()
                    _disk_full()

        return Failing()

    monkeypatch.setattr(csv, "writer", writer)
    capsys.readouterr()
    assert _predict(run, images, out, "--force", "--top_k", "1") == 1
    _one_error(capsys, "No space left on device")
    assert out.read_text() == first
    assert [p.name for p in out.parent.iterdir()] == ["p.csv"]
