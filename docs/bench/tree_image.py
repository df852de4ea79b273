"""Step compression of Jacobi / draft chains and token trees on the bundled t2i zoo model (the BENCHMARKS.md tree
tables). Usage: python docs/bench/tree_image.py N_PROMPTS "name;name;..." (names: see `configs`); prompts are the
held-out captions of `mmspec bench image`, image i drawn with seed i, guidance 3, batch 1. The s.e. printed is the
spread of per-image step compression over sqrt(N_PROMPTS): with 16 prompts it is about 5%. T2I_DRAFT=FOLDER: use the
draft model saved there instead of the bundled one."""

import os
import sys
import time

import torch

import mmspec.drafting
from mmspec.zoo.data import make_scene, scene_seed
from mmspec.zoo.models import load_image_pipeline
from mmspec.zoo.recipes.common import HELDOUT_SCENE_SEED

torch.set_num_threads(1)
pipe, draft = load_image_pipeline()
if os.environ.get("T2I_DRAFT"):  # another draft model folder (e.g. a distilled one before it ships)
    from transformers import AutoModelForCausalLM

    draft = AutoModelForCausalLM.from_pretrained(os.environ["T2I_DRAFT"], dtype=torch.float32).eval()
pipe.set_progress_bar_config(disable=True)
n = int(sys.argv[1]) if len(sys.argv) > 1 else 8
prompts = [make_scene(scene_seed(HELDOUT_SCENE_SEED + 7, i)).caption for i in range(n)]
configs = {
 "sjd16": dict(decoding="jacobi", window=16, init="random"),
 "coupled16-h": dict(decoding="jacobi", window=16, init="horizontal", coupled=True),
 "coupled16-v": dict(decoding="jacobi", window=16, init="vertical", coupled=True),
 "coupled32-h": dict(decoding="jacobi", window=32, init="horizontal", coupled=True),
 "greedy-jacobi16-h": dict(decoding="jacobi", window=16, init="horizontal", do_sample=False),
 "greedy-jacobi32-h": dict(decoding="jacobi", window=32, init="horizontal", do_sample=False),
 "sjd32": dict(decoding="jacobi", window=32, init="random"),
 "coupled16-h-tree(2,2)": dict(decoding="jacobi", window=16, init="horizontal", coupled=True, tree=(2,2)),
 "coupled32-h-tree(3,2)": dict(decoding="jacobi", window=32, init="horizontal", coupled=True, tree=(3,2)),
 "coupled32-h-tree(2,3)": dict(decoding="jacobi", window=32, init="horizontal", coupled=True, tree=(2,3)),
 "coupled32-h-tree(2,4)": dict(decoding="jacobi", window=32, init="horizontal", coupled=True, tree=(2,4)),
 "coupled24-h-tree(3,2)": dict(decoding="jacobi", window=24, init="horizontal", coupled=True, tree=(3,2)),
 "coupled32-v-tree(3,2)": dict(decoding="jacobi", window=32, init="vertical", coupled=True, tree=(3,2)),
 "coupled64-h-tree(4,2)": dict(decoding="jacobi", window=64, init="horizontal", coupled=True, tree=(4,2)),
 "draft6": dict(decoding="draft", window=6, draft_model=draft),
 "draft12-tree(2,2)": dict(decoding="draft", window=12, draft_model=draft, tree=(2,2)),
 "draft20-tree(3,2)": dict(decoding="draft", window=20, draft_model=draft, tree=(3,2)),
 "draft20-tree(4,5)": dict(decoding="draft", window=20, draft_model=draft, tree=(4,5)),
 "draft32-tree(6,5)": dict(decoding="draft", window=32, draft_model=draft, tree=(6,5)),
}
for w in (8, 12, 16, 17, 20, 24, 32, 48):
    configs[f"c{w}-h"] = dict(decoding="jacobi", window=w, init="horizontal", coupled=True)
    configs[f"c{w}-v"] = dict(decoding="jacobi", window=w, init="vertical", coupled=True)
    configs[f"g{w}-h"] = dict(decoding="jacobi", window=w, init="horizontal", do_sample=False)
configs["draft6"] = dict(decoding="draft", window=6, draft_model=draft)
configs["c64-h"] = dict(decoding="jacobi", window=64, init="horizontal", coupled=True)
configs["c64-h-tree(3,3)"] = dict(decoding="jacobi", window=64, init="horizontal", coupled=True, tree=(3, 3))
configs["c64-h-tree(2,5)"] = dict(decoding="jacobi", window=64, init="horizontal", coupled=True, tree=(2, 5))
for w, d in ((4, 1), (6, 1), (8, 1), (4, 2), (3, 3), (2, 2)):
    configs[f"c32-h-tree({w},{d})"] = dict(decoding="jacobi", window=32, init="horizontal", coupled=True, tree=(w, d))
for w in (24, 32, 36):  # Jacobi (tree) + the draft model's chain as a sibling branch
    configs[f"jd{w}-h"] = dict(decoding="jacobi-draft", window=w, init="horizontal", coupled=True, draft_model=draft)
    configs[f"jd{w}-h-tree(3,2)"] = dict(decoding="jacobi-draft", window=w, init="horizontal", coupled=True,
                                          draft_model=draft, tree=(3, 2))
configs["jd48-h-tree(3,2)"] = dict(decoding="jacobi-draft", window=48, init="horizontal", coupled=True,
                                   draft_model=draft, tree=(3, 2))
configs["jd64-h-tree(3,2)"] = dict(decoding="jacobi-draft", window=64, init="horizontal", coupled=True,
                                   draft_model=draft, tree=(3, 2))
configs["jd40-h-tree(4,2)"] = dict(decoding="jacobi-draft", window=40, init="horizontal", coupled=True,
                                   draft_model=draft, tree=(4, 2))
configs["c48-h-tree(3,2)"] = dict(decoding="jacobi", window=48, init="horizontal", coupled=True, tree=(3, 2))
# Layer-skip self-drafting (issue 16): the target minus some layers drafts (calibrated, or a given skip set), alone
# and as the draft branch of jacobi-draft (the layer-skip view passed as the draft model).
from mmspec.drafting.layer_skip import layer_skip_model  # noqa: E402

for w in (4, 6, 8):
    configs[f"self{w}"] = dict(decoding="self", window=w)
for skip in ((3,), (2,), (1,), (0,), (2, 3), (1, 2), (1, 2, 3)):
    name = "".join(map(str, skip))
    configs[f"self6-skip{name}"] = dict(decoding="self", window=6, skip=list(skip))
    configs[f"selfjd48-skip{name}-h-tree(3,2)"] = dict(
        decoding="jacobi-draft", window=48, init="horizontal", coupled=True, tree=(3, 2),
        draft_model=layer_skip_model(pipe.model, list(skip)))
# the layer-skip view drafting an EAGLE-2-style tree (method "self" with tree=(width, depth))
for w, tree in ((12, (3, 4)), (20, (4, 5)), (32, (6, 5)), (48, (8, 6)), (64, (8, 8)), (64, (12, 6))):
    for skip in ((3,), (2,)):
        name = "".join(map(str, skip))
        configs[f"self{w}-skip{name}-tree{tree[0]},{tree[1]}"] = dict(decoding="self", window=w, skip=list(skip),
                                                                      tree=tree)
# jacobi-draft with W candidates for the draft branch's first token (mmspec.drafting.JACOBI_DRAFT_WIDTH)
for dw in (2, 3):
    configs[f"jd48-h-tree(3,2)-dw{dw}"] = dict(configs["jd48-h-tree(3,2)"], _draft_width=dw)
    configs[f"jd32-h-tree(3,2)-dw{dw}"] = dict(configs["jd32-h-tree(3,2)"], _draft_width=dw)
# the layer-skip branch (skips layer 3) with a longer chain (mmspec.drafting.JACOBI_DRAFT_DEPTH) and a wider window
view3 = configs["selfjd48-skip3-h-tree(3,2)"]["draft_model"]
for w in (48, 64):
    for dd in (4, 6, 8):
        configs[f"selfjd{w}-skip3-h-tree(3,2)-dd{dd}"] = dict(
            decoding="jacobi-draft", window=w, init="horizontal", coupled=True, tree=(3, 2), draft_model=view3,
            _draft_depth=dd)
for dw in (2, 4):  # the branch as a draft tree (EAGLE-2 style) of dd + dw - 1 nodes
    configs[f"selfjd64-skip3-h-tree(3,2)-dd6-dw{dw}"] = dict(configs["selfjd64-skip3-h-tree(3,2)-dd6"], _draft_width=dw)
    configs[f"jd64-h-tree(3,2)-dd6-dw{dw}"] = dict(configs["jd64-h-tree(3,2)"], _draft_depth=6, _draft_width=dw)
# deeper and wider trees of the separate draft model, and deeper draft branches of jacobi-draft (for a draft that
# agrees with the target more often, e.g. a distilled one)
for w, tree in ((48, (8, 6)), (64, (8, 8)), (64, (12, 6))):
    configs[f"draft{w}-tree{tree[0]},{tree[1]}"] = dict(decoding="draft", window=w, draft_model=draft, tree=tree)
for w in (48, 64):
    for dd in (6, 8):
        configs[f"jd{w}-h-tree(3,2)-dd{dd}"] = dict(configs[f"jd{w}-h-tree(3,2)"], _draft_depth=dd)
sel = sys.argv[2].split(";") if len(sys.argv) > 2 else list(configs)
per_image = {}
for name in sel:
    kw = dict(configs[name])
    mmspec.drafting.JACOBI_DRAFT_WIDTH = kw.pop("_draft_width", 1)
    mmspec.drafting.JACOBI_DRAFT_DEPTH = kw.pop("_draft_depth", 4)
    t, toks, fw, per = time.time(), 0, 0, []
    for i, p in enumerate(prompts):
        out = pipe(p, guidance_scale=3.0, output_type="latent", generator=torch.Generator().manual_seed(i), **kw)
        toks += out.stats.new_tokens
        fw += sum(out.stats.row_forwards)
        per.append(out.stats.new_tokens / sum(out.stats.row_forwards))
    se = torch.tensor(per).std().item() / len(per) ** 0.5 if len(per) > 1 else float("nan")
    print(f"{name:28s} step compression {toks/fw:.2f} (+- {se:.2f} s.e. over images)  ({time.time()-t:.0f}s)",
          flush=True)
    per_image[name] = per
if len(per_image) > 1:  # paired with the first config (same prompts and seeds): mean ratio of per-image compression
    first, *rest = per_image
    a = torch.tensor(per_image[first])
    for name in rest:
        r = torch.tensor(per_image[name]) / a
        print(f"{name} / {first}: {r.mean():.3f} +- {r.std().item() / len(r) ** 0.5:.3f} (paired, per image); "
              f"higher on {int((r > 1).sum())} of {len(r)} images")
