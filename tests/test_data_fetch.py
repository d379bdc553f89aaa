"""The Texty dataset fetcher against a real HTTP mirror on 127.0.0.1: checksums, retries, resume.

The mirror holds five real files of the shared dataset, copied into tmp_path, laid out as
upstream has them (``model/datasets/<folder>/<name>``); a mini manifest built from them stands
in for the bundled one.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
from tile_servers import Fault, tile_server

from amber_hunter.errors import DatasetError
from amber_hunter.learn.data import find_texty_dataset
from amber_hunter.learn.download import (
    DATASET_FOLDERS,
    DEFAULT_BASE_URL,
    MANIFEST_PATH,
    Manifest,
    build_manifest,
    fetch_texty,
    load_manifest,
    write_manifest,
)

FAST = {"backoff": 0.0, "timeout": (2.0, 2.0), "progress": False}
PREFIX = "/model/datasets/"


@pytest.fixture
def mirror(tmp_path, data_root) -> tuple[Path, Manifest]:
    """Two positive and two negative crops and one example scene, with their mini manifest."""
    datasets = tmp_path / "mirror" / PREFIX.strip("/")
    picks = {
        "positive": sorted((data_root / "positive").glob("*.png"))[:2],
        "negative": sorted((data_root / "negative").glob("*.png"))[:2],
        "example": [data_root / "example" / "positive3.png"],
    }
    for folder, files in picks.items():
        (datasets / folder).mkdir(parents=True)
        for file in files:
            shutil.copyfile(file, datasets / folder / file.name)
    manifest = build_manifest(datasets)
    assert len(manifest.files) == 5
    return tmp_path / "mirror", manifest


def _local(dest: Path, manifest: Manifest) -> dict[str, bytes]:
    return {e.path: (dest / e.path).read_bytes() for e in manifest.files if (dest / e.path).exists()}


def _served(root: Path, manifest: Manifest) -> dict[str, bytes]:
    return {e.path: (root / PREFIX.strip("/") / e.url_path).read_bytes() for e in manifest.files}


def _leftovers(dest: Path) -> list[Path]:
    return sorted(dest.rglob("*.part"))


def test_fetch_downloads_every_file_verified(tmp_path, mirror):
    root, manifest = mirror
    with tile_server(root) as server:
        dest = fetch_texty(tmp_path / "dest", server.url + PREFIX, manifest=manifest, **FAST)
    assert dest == tmp_path / "dest"
    assert _local(dest, manifest) == _served(root, manifest)
    assert not _leftovers(dest)
    assert find_texty_dataset(dest) == dest  # the layout the rest of the package expects
    assert sum(server.hits.values()) == 5


def test_second_fetch_skips_files_already_present(tmp_path, mirror):
    root, manifest = mirror
    dest = tmp_path / "dest"
    with tile_server(root) as server:
        fetch_texty(dest, server.url + PREFIX, manifest=manifest, **FAST)
        first = sum(server.hits.values())
        fetch_texty(dest, server.url + PREFIX, manifest=manifest, **FAST)
        assert sum(server.hits.values()) == first  # nothing asked for again
        damaged, gone = manifest.files[0], manifest.files[3]
        (dest / damaged.path).write_bytes(b"not the file")
        (dest / gone.path).unlink()
        fetch_texty(dest, server.url + PREFIX, manifest=manifest, **FAST)
    assert sum(server.hits.values()) == first + 2
    assert server.hits[PREFIX + damaged.url_path] == server.hits[PREFIX + gone.url_path] == 2
    assert _local(dest, manifest) == _served(root, manifest)


def test_checksum_mismatch_is_an_error_and_leaves_no_file(tmp_path, mirror):
    root, manifest = mirror
    changed = manifest.files[2]
    (root / PREFIX.strip("/") / changed.url_path).write_bytes(b"upstream changed this file")
    dest = tmp_path / "dest"
    (dest / changed.path).parent.mkdir(parents=True)
    (dest / changed.path).write_bytes(b"a stale partial copy")
    with tile_server(root) as server, pytest.raises(DatasetError) as error:
        fetch_texty(dest, server.url + PREFIX, manifest=manifest, **FAST)
    message = str(error.value)
    assert "\n" not in message
    assert changed.path in message and "upstream" in message and "changed" in message
    assert not (dest / changed.path).exists()
    assert not _leftovers(dest)
    assert server.hits[PREFIX + changed.url_path] == 1  # a mismatch is not retried


def test_interrupted_download_is_retried_and_completes(tmp_path, mirror):
    root, manifest = mirror
    # Each file's first response announces the full length but the connection drops halfway.
    with tile_server(root, fault=Fault("truncate", failures=1)) as server:
        dest = fetch_texty(tmp_path / "dest", server.url + PREFIX, manifest=manifest, **FAST)
    assert _local(dest, manifest) == _served(root, manifest)
    assert not _leftovers(dest)
    assert all(server.hits[PREFIX + e.url_path] == 2 for e in manifest.files)


def test_server_errors_are_retried(tmp_path, mirror):
    root, manifest = mirror
    with tile_server(root, fault=Fault("status", status=503, failures=2)) as server:
        dest = fetch_texty(tmp_path / "dest", server.url + PREFIX, manifest=manifest, **FAST)
    assert _local(dest, manifest) == _served(root, manifest)
    assert all(server.hits[PREFIX + e.url_path] == 3 for e in manifest.files)


def test_a_server_that_keeps_failing_gives_up_with_one_line(tmp_path, mirror):
    root, manifest = mirror
    with tile_server(root, fault=Fault("truncate", failures=None)) as server, pytest.raises(DatasetError) as error:
        fetch_texty(tmp_path / "dest", server.url + PREFIX, manifest=manifest, retries=2, **FAST)
    assert "\n" not in str(error.value) and "after 2 retries" in str(error.value)
    assert server.hits[PREFIX + manifest.files[0].url_path] == 3
    assert not _local(tmp_path / "dest", manifest) and not _leftovers(tmp_path / "dest")


def test_missing_upstream_file_is_not_retried(tmp_path, mirror):
    root, manifest = mirror
    (root / PREFIX.strip("/") / manifest.files[0].url_path).unlink()
    with tile_server(root) as server, pytest.raises(DatasetError, match="HTTP 404"):
        fetch_texty(tmp_path / "dest", server.url + PREFIX, manifest=manifest, **FAST)
    assert sum(server.hits.values()) == 1


def test_url_path_maps_upstream_layout_to_local_paths(tmp_path, mirror):
    root, manifest = mirror
    moved = manifest.files[0]
    target = root / PREFIX.strip("/") / "elsewhere" / "scene.png"
    target.parent.mkdir()
    shutil.move(root / PREFIX.strip("/") / moved.url_path, target)
    remapped = dataclasses.replace(
        manifest, files=(dataclasses.replace(moved, url_path="elsewhere/scene.png"),) + manifest.files[1:]
    )
    with tile_server(root) as server:
        dest = fetch_texty(tmp_path / "dest", server.url + PREFIX.rstrip("/"), manifest=remapped, **FAST)
    assert (dest / moved.path).read_bytes() == target.read_bytes()


def test_progress_bars_count_files_and_bytes(tmp_path, mirror, capsys):
    root, manifest = mirror
    with tile_server(root) as server:
        fetch_texty(tmp_path / "dest", server.url + PREFIX, manifest=manifest, progress=True, backoff=0.0)
    err = capsys.readouterr().err
    assert "files" in err and "5/5" in err and "bytes" in err


def test_default_destination_is_the_user_data_folder(tmp_path, mirror, monkeypatch):
    root, manifest = mirror
    monkeypatch.setenv("AMBER_HUNTER_DATA_HOME", str(tmp_path / "home"))
    with tile_server(root) as server:
        dest = fetch_texty(base_url=server.url + PREFIX, manifest=manifest, **FAST)
    assert dest == tmp_path / "home" / "texty-amber"
    assert len(_local(dest, manifest)) == 5


def test_manifest_round_trips_and_rejects_escaping_paths(tmp_path, mirror):
    _, manifest = mirror
    write_manifest(manifest, tmp_path / "m.json")
    assert load_manifest(tmp_path / "m.json") == manifest
    obj = json.loads((tmp_path / "m.json").read_text())
    obj["files"][0]["path"] = "../../.bashrc"
    (tmp_path / "bad.json").write_text(json.dumps(obj))
    with pytest.raises(DatasetError, match="not a plain relative path"):
        load_manifest(tmp_path / "bad.json")
    (tmp_path / "garbled.json").write_text("{")
    with pytest.raises(DatasetError, match="not a readable dataset manifest"):
        load_manifest(tmp_path / "garbled.json")


def test_bundled_manifest_describes_the_shared_dataset(data_root):
    bundled = load_manifest()
    assert MANIFEST_PATH.name == "texty_manifest.json"
    assert {e.path.split("/")[0] for e in bundled.files} == set(DATASET_FOLDERS)
    assert sorted(e.path for e in bundled.files if e.path.startswith("example/")) == sorted(
        f"example/{kind}{i}.png" for kind in ("positive", "negative") for i in (1, 2, 3)
    )
    assert all(e.url_path == e.path for e in bundled.files)  # upstream has the same layout
    assert DEFAULT_BASE_URL.startswith("https://raw.githubusercontent.com/texty/amber-methodology/")
    assert build_manifest(data_root) == bundled
