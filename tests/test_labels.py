"""The label store: append-only history where the latest row wins, CSV export that ``train
--labels`` reads, import, and real concurrent writers in separate processes."""

from __future__ import annotations

import csv
import itertools
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from amber_hunter.errors import LabelsError
from amber_hunter.learn.dataset import load_dataset, read_labels_csv
from amber_hunter.learn.labels import CropKey, LabelStore, SuperpixelKey, content_hash


@pytest.fixture
def crops(small_data) -> list[Path]:
    return sorted((small_data / "positive").iterdir())[:2] + sorted((small_data / "negative").iterdir())[:2]


def test_latest_wins_and_history_keeps_every_label(tmp_path, small_data, crops):
    key = CropKey.of(small_data, crops[0])
    assert key.path == f"positive/{crops[0].name}" and key.content_hash == content_hash(crops[0])
    with LabelStore(tmp_path / "labels.sqlite") as store:
        first = store.add(key, "negative", note="cemetery?")
        second = store.add(key, 1, note="pits after all")
        assert (first.previous, first.label) == (None, 0)
        assert (second.previous, second.label, second.source, second.note) == (0, 1, "explore", "pits after all")
        assert second.created >= first.created
        assert store.get(key).id == second.id
        assert [r.label for r in store.history(key)] == [0, 1]
        sp = SuperpixelKey.of(tmp_path / "run", "18/1/2/4", 7)
        store.add(sp, "mining", source="feedback")
        latest = store.latest()
        assert {r.key: r.label for r in latest.values()} == {key.key: 1, sp.key: 1}
        assert latest[sp.key].scene_id == "18/1/2/4" and latest[sp.key].segment == 7
        assert store.latest("superpixel").keys() == {sp.key}


def test_a_moved_crop_keeps_its_labels(tmp_path, small_data, crops):
    """Crops are keyed by content: the same bytes under another name are the same crop."""
    copy = tmp_path / "elsewhere" / "renamed.png"
    copy.parent.mkdir()
    copy.write_bytes(crops[0].read_bytes())
    with LabelStore(tmp_path / "l.sqlite") as store:
        store.add(CropKey.of(small_data, crops[0]), 0)
        assert store.get(CropKey.of(copy.parent, copy)).label == 0


def test_store_is_append_only(tmp_path, small_data, crops):
    path = tmp_path / "labels.sqlite"
    with LabelStore(path) as store:
        store.add(CropKey.of(small_data, crops[0]), 1)
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    for sql in ("UPDATE labels SET label = 0", "DELETE FROM labels"):
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            db.execute(sql)
    assert db.execute("SELECT COUNT(*) FROM labels").fetchone()[0] == 1
    db.close()


def test_bad_labels_are_refused(tmp_path, small_data, crops):
    with LabelStore(tmp_path / "l.sqlite") as store:
        with pytest.raises(LabelsError, match="unknown label"):
            store.add(CropKey.of(small_data, crops[0]), "maybe")
        with pytest.raises(LabelsError, match="source"):
            store.add(CropKey.of(small_data, crops[0]), 1, source="robot")
        with pytest.raises(LabelsError, match="not inside"):
            CropKey.of(small_data / "positive", crops[-1])
        assert store.history() == []
    (tmp_path / "junk.sqlite").write_bytes(b"not a database at all" * 100)
    with pytest.raises(LabelsError, match="not a usable label store"):
        LabelStore(tmp_path / "junk.sqlite")


def test_export_is_the_csv_train_reads(tmp_path, small_data, crops):
    """Exported labels override the folder labels when the dataset is loaded with them."""
    with LabelStore(tmp_path / "l.sqlite") as store:
        store.add(CropKey.of(small_data, crops[0]), 1)
        store.add(CropKey.of(small_data, crops[0]), 0, note="a sand quarry, not amber")  # positive/ crop relabelled
        store.add(CropKey.of(small_data, crops[2]), 1)  # negative/ crop relabelled
        store.add(SuperpixelKey.of(tmp_path / "run", "18/1/2/4", 3), 1)
        out = tmp_path / "export" / "labels.csv"
        assert store.export_csv(out) == (2, 1)
    rows = {Path(r["path"]).name: r for r in csv.DictReader(out.open())}
    assert rows.keys() == {crops[0].name, crops[2].name}
    assert (rows[crops[0].name]["label"], rows[crops[2].name]["label"]) == ("negative", "positive")
    assert rows[crops[0].name]["note"] == "a sand quarry, not amber" and rows[crops[0].name]["source"] == "explore"
    assert {p.resolve() for p, _, _ in read_labels_csv(out)} == {crops[0].resolve(), crops[2].resolve()}
    dataset = load_dataset([small_data], out)
    by_path = {s.path.resolve(): s.label for s in dataset.samples}
    assert by_path[crops[0].resolve()] == 0 and by_path[crops[2].resolve()] == 1 and by_path[crops[1].resolve()] == 1


def test_import_round_trip_and_bad_rows_add_nothing(tmp_path, small_data, crops):
    csv_path = small_data / "relabel.csv"
    csv_path.write_text(f"path,label,source,note\npositive/{crops[1].name},negative,csv,road\n"
                        f"negative/{crops[3].name},1,csv,\n")
    with LabelStore(tmp_path / "l.sqlite") as store:
        assert store.import_csv(csv_path) == 2
        latest = store.latest()
        assert {r.path: (r.label, r.source, r.note) for r in latest.values()} == {
            f"positive/{crops[1].name}": (0, "import", "road"), f"negative/{crops[3].name}": (1, "import", None)}
        bad = tmp_path / "bad.csv"
        bad.write_text(f"path,label\n{crops[0]},1\nnope.png,1\n{crops[1]},perhaps\n")
        with pytest.raises(LabelsError, match=r"line 3: 'nope.png' does not exist .*line 4: unknown label"):
            store.import_csv(bad, root=small_data)
        assert len(store.history()) == 2
    csv_path.unlink()


WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from amber_hunter.learn.labels import LabelStore, SuperpixelKey
    store_path, start, worker, n = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    store = LabelStore(store_path)
    while not start.exists():
        time.sleep(0.005)
    for i in range(n):
        # Every worker writes the same 5 keys, so they race on each key's "previous" label.
        store.add(SuperpixelKey.of("/runs/r", "18/1/2/4", i % 5), (worker + i) % 2, note=f"w{worker} i{i}")
    print("ok")
""")


def test_concurrent_writers_lose_no_label(tmp_path):
    """Four processes write at once; every label lands and every ``previous`` is the label
    that really preceded it."""
    store_path, start = tmp_path / "labels.sqlite", tmp_path / "go"
    LabelStore(store_path).close()
    workers, n = 4, 40
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(store_path), str(start), str(w), str(n)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for w in range(workers)]
    time.sleep(1.0)  # let every process import and open the store before they start together
    start.touch()
    for p in procs:
        out, err = p.communicate(timeout=180)
        assert p.returncode == 0 and out.strip() == "ok", err
    with LabelStore(store_path) as store:
        rows = store.history()
    assert len(rows) == workers * n
    assert sorted(r.note for r in rows) == sorted(f"w{w} i{i}" for w in range(workers) for i in range(n))
    by_key: dict[str, list] = {}
    for r in rows:
        by_key.setdefault(r.key, []).append(r)
    assert len(by_key) == 5
    writers_interleaved = False
    for chain in by_key.values():
        assert chain[0].previous is None
        for before, after in itertools.pairwise(chain):
            assert after.previous == before.label
            writers_interleaved |= before.note.split()[0] != after.note.split()[0]
    assert writers_interleaved, "the writers never overlapped; the test proved nothing"


def test_cli_labels_export_and_import(tmp_path, small_data, crops):
    from amber_hunter.cli.explore import labels

    store = tmp_path / "l.sqlite"
    csv_path = tmp_path / "in.csv"
    csv_path.write_text(f"path,label,source,note\n{crops[0]},negative,csv,quarry\n")
    runner = CliRunner()
    result = runner.invoke(labels, ["import", str(store), str(csv_path), "--root", str(small_data)])
    assert result.exit_code == 0, result.output
    assert "imported 1 label" in result.output
    out = tmp_path / "out" / "labels.csv"
    result = runner.invoke(labels, ["export", str(store), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert read_labels_csv(out)[0][:2] == (crops[0].resolve(), 0)
    result = runner.invoke(labels, ["import", str(store), str(tmp_path / "missing.csv")])
    assert result.exit_code == 2 and "does not exist" in result.output
