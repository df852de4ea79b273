"""CPU time of AR and SJD on one batch of held-out captions with each KV cache (the BENCHMARKS.md table "Batched
decoding: the dynamic cache without holes"). Usage: python docs/bench/batch_cache.py N_PROMPTS dynamic,static
(one thread; image i drawn with seed i, guidance 3, SJD window 16 with random init). Process CPU time, so a job
sharing the core inflates both rows alike rather than the wall clock of one."""

import sys
import time

import torch

from mmspec.zoo.data import make_scene, scene_seed
from mmspec.zoo.models import load_image_pipeline
from mmspec.zoo.recipes.common import HELDOUT_SCENE_SEED

torch.set_num_threads(1)
pipe, _ = load_image_pipeline(with_draft=False)
pipe.set_progress_bar_config(disable=True)
n = int(sys.argv[1]) if len(sys.argv) > 1 else 16
prompts = [make_scene(scene_seed(HELDOUT_SCENE_SEED + 7, i)).caption for i in range(n)]
for cache in (sys.argv[2] if len(sys.argv) > 2 else "dynamic,static").split(","):
    for decoding, kw in (("ar", {}), ("jacobi", dict(window=16, init="random"))):
        t0 = time.thread_time()
        out = pipe(prompts, decoding=decoding, cache=cache, guidance_scale=3.0, output_type="latent",
                   generator=[torch.Generator().manual_seed(i) for i in range(n)], **kw)
        print(f"{cache:8s} {decoding:7s} {time.thread_time() - t0:6.1f} s CPU, {out.stats.target_forwards} target "
              f"forwards, step compression {out.stats.step_compression:.2f}", flush=True)
