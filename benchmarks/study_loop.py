"""The source study's per-scene loop, re-implemented as the reference baseline of issue 10's speed benchmark.

The study (Texty's *Leprosy of the Land*) scanned about 450,000 scenes in about 100 hours on two
GPUs. Its code is not vendored here, so this is our own implementation of what it did per scene,
kept as plain as the study's loop so that ``amber-hunter scan`` can be measured against it on the
same machine, in the same benchmark run (``benchmarks/bench_speed.py``):

1. read and decode the scene image (``skimage.io.imread``) and convert it to float64
   (``img_as_float``);
2. SLIC with ``n_segments=30, compactness=35, sigma=1``, passed by keyword: skimage's third
   positional parameter is ``max_num_iter``, not ``sigma``, so ``slic(image, 30, 35, 1)`` would
   run one iteration;
3. crop each superpixel's bounding box out of the 8-bit scene and resize it to 224x224 with
   nearest-neighbour sampling (what Keras's ``load_img(target_size=...)`` does);
4. Keras ResNet50 (``include_top=False``, global average pooling, caffe preprocessing) with
   ``predict(batch_size=64)``. ImageNet weights cannot be downloaded here, so the weights are
   random: the FLOPs, and so the cost, are the same;
5. XGBoost on the 2048-d embeddings; the scene is flagged when more than 2 superpixels are
   positive (probability >= 0.5). The classifier has the project's tree count and depth
   (``amber_hunter.model.classify.XGB_PARAMS``) and is trained in this script on seeded random
   features: its flags mean nothing, its cost is what a real one costs.

Model building (ResNet50, the XGBoost fit) and one warm-up prediction (TensorFlow traces its
graph on the first call) happen before the clock starts, as the issue's "model loading excluded"
asks. The timed loop covers steps 1-5 for every scene, and the time of each step is summed over
the scenes (``stage_seconds``). TensorFlow and XGBoost use their default threads (all cores).

    python benchmarks/study_loop.py SCENE_DIR_OR_FILES... [--json OUT] [--seed 0]

A folder stands for the images in it (sorted); a file may be given more than once, and is then
read and decoded again each time, as a new scene would be. Prints scenes/s (model loading
excluded) and writes the per-scene and per-stage figures to ``--json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's amber_hunter (for XGB_PARAMS), installed or not

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
N_SEGMENTS = 30
COMPACTNESS = 35
SIGMA = 1
CNN_SIZE = 224
BATCH_SIZE = 64
#: The study flagged a scene when more than this many superpixels were positive.
MIN_POSITIVE = 2
RESNET_DIM = 2048
#: Rows of the random training set of the in-script classifier: about the labelled crops' count.
XGB_TRAIN_ROWS = 860
XGB_POSITIVE_SHARE = 0.25
STAGES = ("decode", "slic", "crop_resize", "cnn", "xgboost")


@dataclass(frozen=True)
class Models:
    """What the loop runs: the random-weight ResNet50, its preprocessing and the classifier."""

    resnet: object
    preprocess: object
    classifier: object
    build_s: float


@dataclass(frozen=True)
class SceneResult:
    path: str
    regions: int
    positive: int
    flagged: bool
    seconds: float


@dataclass
class LoopResult:
    """The timed loop over all scenes: the baseline's throughput and where its time goes."""

    scenes: int
    seconds: float
    #: CPU time of the loop (all threads of this process), model building left out.
    cpu_s: float
    scenes_per_s: float
    stage_seconds: dict[str, float]
    flagged: int
    model_build_s: float
    seed: int
    versions: dict[str, str]
    per_scene: list[SceneResult] = field(default_factory=list)


def scene_paths(args: list[str]) -> list[Path]:
    """The scene images named on the command line, folders expanded to their sorted images."""
    paths: list[Path] = []
    for arg in args:
        path = Path(arg)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise SystemExit(f"study_loop: folder {path} holds no {'/'.join(IMAGE_SUFFIXES)} image; "
                                 "pass scene images or a folder of them")
            paths += found
        elif path.is_file():
            paths.append(path)
        else:
            raise SystemExit(f"study_loop: scene {arg} does not exist; pass scene images or a folder of them")
    return paths


def build_models(seed: int) -> Models:
    """ResNet50 with random weights and an XGBoost of the project's size fitted on random features."""
    t0 = time.perf_counter()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras
    import xgboost as xgb

    from amber_hunter.model.classify import XGB_PARAMS

    keras.utils.set_random_seed(seed)
    resnet = keras.applications.ResNet50(
        include_top=False, weights=None, input_shape=(CNN_SIZE, CNN_SIZE, 3), pooling="avg"
    )
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(XGB_TRAIN_ROWS, RESNET_DIM)).astype(np.float32)
    labels = (rng.random(XGB_TRAIN_ROWS) < XGB_POSITIVE_SHARE).astype(np.int32)
    classifier = xgb.XGBClassifier(**XGB_PARAMS, random_state=seed, eval_metric="logloss")
    classifier.fit(features, labels)
    preprocess = keras.applications.resnet50.preprocess_input
    # The first predict traces TensorFlow's graph: part of loading, not of the per-scene cost.
    dummy = np.zeros((N_SEGMENTS, CNN_SIZE, CNN_SIZE, 3), np.float32)
    classifier.predict_proba(resnet.predict(preprocess(dummy), batch_size=BATCH_SIZE, verbose=0))
    return Models(resnet, preprocess, classifier, time.perf_counter() - t0)


def run_scene(path: Path, models: Models, stages: dict[str, float]) -> SceneResult:
    """The study's steps on one scene; adds each step's seconds to ``stages``."""
    from PIL import Image
    from scipy import ndimage
    from skimage import img_as_float, io
    from skimage.segmentation import slic

    t0 = time.perf_counter()
    image = io.imread(path)[..., :3]
    scene = img_as_float(image)
    t1 = time.perf_counter()
    labels = slic(scene, n_segments=N_SEGMENTS, compactness=COMPACTNESS, sigma=SIGMA)
    t2 = time.perf_counter()
    boxes = [b for b in ndimage.find_objects(labels) if b is not None]
    crops = np.stack([
        np.asarray(Image.fromarray(image[b]).resize((CNN_SIZE, CNN_SIZE), Image.Resampling.NEAREST))
        for b in boxes
    ])
    t3 = time.perf_counter()
    embeddings = models.resnet.predict(models.preprocess(crops.astype(np.float32)), batch_size=BATCH_SIZE, verbose=0)
    t4 = time.perf_counter()
    positive = int((models.classifier.predict_proba(embeddings)[:, 1] >= 0.5).sum())
    t5 = time.perf_counter()
    for stage, seconds in zip(STAGES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)):
        stages[stage] += seconds
    return SceneResult(str(path), len(boxes), positive, positive > MIN_POSITIVE, t5 - t0)


def run_loop(paths: list[Path], seed: int = 0) -> LoopResult:
    """Build the models (untimed), then time the study's loop over ``paths``."""
    import keras
    import skimage
    import xgboost

    models = build_models(seed)
    stages = dict.fromkeys(STAGES, 0.0)
    t0, cpu0 = time.perf_counter(), time.process_time()
    per_scene = [run_scene(path, models, stages) for path in paths]
    seconds = time.perf_counter() - t0
    return LoopResult(
        scenes=len(paths),
        seconds=seconds,
        cpu_s=time.process_time() - cpu0,
        scenes_per_s=len(paths) / seconds,
        stage_seconds=stages,
        flagged=sum(s.flagged for s in per_scene),
        model_build_s=models.build_s,
        seed=seed,
        versions={"keras": keras.__version__, "skimage": skimage.__version__, "xgboost": xgboost.__version__},
        per_scene=per_scene,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("scenes", nargs="+", help="scene images, or folders of them")
    parser.add_argument("--json", type=Path, help="write the loop's figures here")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random ResNet50 and classifier")
    args = parser.parse_args(argv)
    paths = scene_paths(args.scenes)
    result = run_loop(paths, args.seed)
    stages = ", ".join(f"{k} {v:.1f}" for k, v in result.stage_seconds.items())
    print(f"{result.scenes} scenes in {result.seconds:.1f} s: {result.scenes_per_s:.3f} scenes/s "
          f"(models built in {result.model_build_s:.1f} s, not counted); stage s: {stages}; "
          f"{result.flagged} flagged (random weights: meaningless)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(asdict(result), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
