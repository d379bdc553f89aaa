"""``amber-hunter suggest`` on its two pools: a flat folder of crops (embedded through the cache)
and a scanned run (its stored embeddings; picks cut into crops), labelled superpixels left out,
and the labels CSV with the label column empty."""

from __future__ import annotations

import shutil

from click.testing import CliRunner

from amber_hunter.cli import main
from amber_hunter.learn.dataset import parse_name
from amber_hunter.learn.labels import CropKey, LabelStore


def _csv_rows(path):
    lines = path.read_text().splitlines()
    assert lines[0] == "path,label,source,note"
    return [line.split(",", 3) for line in lines[1:]]


def test_suggest_from_a_flat_folder_leaves_labelled_crops_out(small_data, shared_cache, tmp_path, monkeypatch):
    from amber_hunter.cli.feedback import suggest
    from amber_hunter.learn.suggest import DEFAULT_STRATEGY, STRATEGIES

    option = {p.name: p for p in suggest.params}["strategy"]
    assert option.default == DEFAULT_STRATEGY and tuple(option.type.choices) == STRATEGIES
    pool = tmp_path / "pool"
    pool.mkdir()
    crops = sorted((small_data / "positive").glob("*.png"))[:4] + sorted((small_data / "negative").glob("*.png"))[:8]
    for c in crops:
        shutil.copy(c, pool / c.name)
    store = tmp_path / "labels.sqlite"
    with LabelStore(store) as labels:
        labels.add(CropKey.of(pool, pool / crops[0].name), 1)
    monkeypatch.setenv("AMBER_HUNTER_LABELS", str(store))
    out = tmp_path / "picks.csv"
    args = ["suggest", "--model", "fast", "--pool", str(pool), "-n", "5", "--cache-dir", str(shared_cache), "--out", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    rows = _csv_rows(out)
    assert len(rows) == 5 and all(r[1] == "" and r[2] == "suggest" for r in rows)
    assert crops[0].name not in {r[0].rsplit("/", 1)[-1] for r in rows}  # labelled: never suggested again
    assert all((tmp_path / r[0]).is_file() for r in rows)
    assert CliRunner().invoke(main, args).stdout == result.stdout  # seeded: the same picks
    margin = CliRunner().invoke(main, [*args[:-2], "--strategy", "margin"])
    assert margin.exit_code == 0 and "p=" in margin.stdout
    bad = CliRunner().invoke(main, ["suggest", "--model", "fast", "--pool", str(small_data)])
    assert bad.exit_code == 2 and "that is a labelled dataset" in bad.stderr


def test_suggest_from_a_run_cuts_its_picks_into_crops(folder_run, tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("AMBER_HUNTER_LABELS", str(tmp_path / "labels.sqlite"))
    out = tmp_path / "picks.csv"
    result = CliRunner().invoke(main, ["suggest", "--model", str(tiny_model), "--pool", str(folder_run), "-n", "3",
                                       "--strategy", "typical", "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = _csv_rows(out)
    assert len(rows) == 3 and all(r[0].startswith("picks-crops/") for r in rows)
    for r in rows:
        assert parse_name(r[0]) is not None and (tmp_path / r[0]).is_file()
