"""Ways to break a model bundle on disk, shared by the library tests (test_classify) and the CLI
tests (test_cli), which check that each gives its own one-line error."""

from __future__ import annotations

import json
from pathlib import Path


def edit_model_json(bundle: Path, **changes) -> None:
    meta = json.loads((bundle / "model.json").read_text())
    meta.update(changes)
    (bundle / "model.json").write_text(json.dumps(meta))


def truncate_xgb_json(bundle: Path) -> None:
    """Cut xgb.json as an interrupted copy would, at a key boundary past its middle (``...",``).
    XGBoost's parse error for that case carries a raw 0xFF byte."""
    data = (bundle / "xgb.json").read_bytes()
    (bundle / "xgb.json").write_bytes(data[: data.index(b'",', len(data) // 2) + 2])
