"""Batch-1 image timings on the GPU with three repeats (the median leaves out a first call's kernel JIT), eager and
compiled: a follow-up to `mmspec bench gpu`'s zoo image part (session 16)."""
import json
import sys

from mmspec.bench import image
from mmspec.zoo.data import make_scene, scene_seed
from mmspec.zoo.models import load_image_pipeline
from mmspec.zoo.recipes.common import HELDOUT_SCENE_SEED

pipe, draft = load_image_pipeline(device="cuda")
pipe.set_progress_bar_config(disable=True)
ps = [make_scene(scene_seed(HELDOUT_SCENE_SEED + 7, i)).caption for i in range(int(sys.argv[1]))]
image.run(pipe, draft, ps[:1], ["AR"], progress=False)
names = ["AR", "SJD (random init, w16)", "SJD coupled (horizontal, w16)", "coupled + tree(3,2) (horizontal, w32)"]
for extra in ({}, dict(cache="static", compile=True)):
    ms = {n + (" [compiled]" if extra else ""): {**image.METHODS[n], **extra} for n in (names if not extra else names[:3])}
    for r in image.run(pipe, draft, ps, ms, repeats=3, batch_size=1, progress=False):
        print(json.dumps({k: r[k] for k in ("method", "target_forwards", "step_compression", "median_s", "times")}),
              flush=True)
