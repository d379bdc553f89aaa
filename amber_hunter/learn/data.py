"""Where the labelled Texty data live: an explicit path, ``../shared/datasets``, or the user cache.

Inside this project's workplace the data sit in ``../shared`` beside the repo; on a user's machine
they are downloaded into the user cache. Everything that needs them (training scripts, notebooks,
the demo) asks here, so they all look in the same places in the same order.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import DatasetError

TEXTY = "texty-amber"


def user_data_dir() -> Path:
    """``$AMBER_HUNTER_DATA_HOME`` or the platform's user data folder."""
    env = os.environ.get("AMBER_HUNTER_DATA_HOME")
    if env:
        return Path(env)
    import platformdirs

    return Path(platformdirs.user_data_dir("amber-hunter"))


def candidate_dirs(name: str = TEXTY) -> list[Path]:
    """Places searched, in order: ``$AMBER_HUNTER_DATA``, ``../shared/datasets`` next to the
    working directory and next to the repo, then the user data folder."""
    repo = Path(__file__).resolve().parents[2]
    places = [Path(os.environ["AMBER_HUNTER_DATA"])] if os.environ.get("AMBER_HUNTER_DATA") else []
    places += [
        Path.cwd().parent / "shared" / "datasets" / name,
        repo.parent / "shared" / "datasets" / name,
        user_data_dir() / name,
    ]
    return places


def find_texty_dataset(explicit: str | Path | None = None) -> Path:
    """The Texty labelled-superpixel folder (holding positive/, negative/, example/)."""
    if explicit is not None:
        path = Path(explicit)
        if not (path / "positive").is_dir():
            raise DatasetError(f"{path} holds no positive/ folder; point to the texty-amber dataset folder")
        return path
    for path in candidate_dirs():
        if (path / "positive").is_dir() and (path / "negative").is_dir():
            return path
    raise DatasetError(
        "the Texty dataset was not found in "
        + ", ".join(str(p) for p in candidate_dirs())
        + "; download it with 'amber-hunter data fetch texty' or pass its path"
    )
