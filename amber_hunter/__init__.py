"""amber-hunter: find illegal surface mining in high-resolution map tiles.

The public API is listed in ``__all__``; the stage functions that share their module's name
(``model.segment.segment``, ``run.scan.scan``, ``export.writers.export``) are imported from their
modules. Names are imported lazily (PEP 562) so that
``import amber_hunter`` and ``amber-hunter --help`` stay instant: TensorFlow, XGBoost and
scikit-image load only when a function that needs them is called.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "AmberHunterError": "errors",
    "read_rgb": "images",
    "Region": "model.segment",
    "Segmentation": "model.segment",
    "SlicParams": "model.segment",
    "Embedder": "model.embed",
    "get_embedder": "model.embed",
    "Dataset": "learn.dataset",
    "Sample": "learn.dataset",
    "load_dataset": "learn.dataset",
    "ModelBundle": "model.classify",
    "ModelMetadata": "model.classify",
    "load_bundle": "model.classify",
    "save_bundle": "model.classify",
    "Detector": "model.detect",
    "SceneResult": "model.detect",
    "overlay": "model.detect",
    "EvaluationReport": "learn.evaluate",
    "train_model": "learn.workflows",
    "evaluate_protocol": "learn.workflows",
    "evaluate_model": "learn.workflows",
    "RunConfig": "run.config",
    "RunStore": "run.store",
}

#: Written out, not derived from _EXPORTS, so that editors and type checkers can see it.
__all__ = [
    "AmberHunterError",
    "Dataset",
    "Detector",
    "Embedder",
    "EvaluationReport",
    "ModelBundle",
    "ModelMetadata",
    "Region",
    "RunConfig",
    "RunStore",
    "Sample",
    "SceneResult",
    "Segmentation",
    "SlicParams",
    "__version__",
    "evaluate_model",
    "evaluate_protocol",
    "get_embedder",
    "load_bundle",
    "load_dataset",
    "overlay",
    "read_rgb",
    "save_bundle",
    "train_model",
]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'amber_hunter' has no attribute {name!r}")
