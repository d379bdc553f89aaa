"""Train the model bundles that ship inside the package, then check them on the example scenes.

    python training/train_default_model.py [--data DIR] [--seed 0]

Writes ``amber_hunter/model/bundled/default`` (vgg16+efflite0+texture: the best grouped and spatial
result, see the README's table), ``amber_hunter/model/bundled/balanced`` (efflite0+texture: about
8 times the default's scan speed on a CPU, weaker in a new area along longitude) and
``amber_hunter/model/bundled/fast`` (texture only, no TensorFlow: for CPU-only sweeps of large
regions), all trained on every labelled crop of the Texty dataset. Then runs ``detect`` on the six
example scenes and exits non-zero unless every model flags exactly the three positive ones.
The run is reproducible: same data, same seed, same bundles (up to the creation time).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from amber_hunter.images import read_rgb
from amber_hunter.learn.data import find_texty_dataset
from amber_hunter.learn.workflows import train_model
from amber_hunter.model.classify import bundled_model_path
from amber_hunter.model.detect import Detector
from amber_hunter.model.segment import SlicParams

#: Bundled name -> (embedder, SLIC scale). Why these embedders: the README's "How good is it?"
#: table (vgg16+efflite0+texture wins on grouped and on both spatial axes; efflite0+texture is the
#: best model without VGG16, whose per-crop pass is most of a CPU scan). The fast model flags
#: positive2.png with three positive superpixels, the fewest that flag: the check guards it too,
#: so a retrain that loses it says so. Why these scales
#: (``training/results/slic_scale.md``, measured with the default model and the fast model of the
#: time): the CNN models stay at 1/2, the closer one to full-size superpixels, since SLIC is a small
#: part of their time; at 1/2 SLIC was a quarter of the fast model's CPU time, and at 1/3 it costs
#: half as much again with every flag kept.
BUNDLES = {
    "default": ("vgg16+efflite0+texture", 2),
    "balanced": ("efflite0+texture", 2),
    "fast": ("texture", 3),
}
#: The shipped operating point, also the CLI's default. Not the study's 0.95 ("precision is a
#: must"): a scene is flagged only when three or more superpixels are positive, which is a second,
#: independent precision filter, and at 0.95 the model keeps markedly fewer pit superpixels.
TARGET_PRECISION = 0.90


def check_examples(data: Path, model: Path) -> bool:
    """Detect on example/positive1-3 and negative1-3; True when exactly the positives are flagged."""
    detector = Detector.load(model)
    ok = True
    for scene in sorted((data / "example").glob("*.png")):
        result, _ = detector.detect(read_rgb(scene))
        expected = scene.stem.startswith("positive")
        ok &= result.flagged == expected
        print(
            f"  {scene.name:16s} {'FLAGGED' if result.flagged else 'clean  '} {result.n_positive:2d}/"
            f"{result.n_superpixels} positive  {'ok' if result.flagged == expected else 'WRONG'}"
        )
    return ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=None, help="labelled folder (default: the texty dataset)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", choices=sorted(BUNDLES), help="train just this bundle")
    args = parser.parse_args()
    data = find_texty_dataset(args.data)
    ok = True
    for name, (embedder, scale) in BUNDLES.items():
        if args.only and name != args.only:
            continue
        out = bundled_model_path(name)
        bundle = train_model([data], embedder, out, target_precision=TARGET_PRECISION, seed=args.seed,
                             slic=SlicParams(scale=scale))
        m = bundle.metadata
        print(
            f"{name}: {embedder}, threshold {m.threshold:.3f}, out-of-fold precision "
            f"{m.metrics['oof_precision']:.3f} recall {m.metrics['oof_recall']:.3f} -> {out}"
        )
        ok &= check_examples(data, out)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
