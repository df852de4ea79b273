"""How jacobi-draft's lossless step compression on the bundled t2i target grows with the draft's quality (the
BENCHMARKS.md "what 2.0x SJD would need" table). Each draft is scored by its on-policy expected acceptance (``1 -
TV`` of the guided code distributions along the target's own samples for held-out captions, ``t2i.agreement(...,
on_policy=True)``) and used as the draft branch of ``jd48-h-tree(3,2)`` (window 48, horizontal init, coupled redraw,
SJD-PAC tree (3, 2), the draft's chain of 4 as one more branch) on the same prompts and seeds as SJD as published.
Drafts: the shipped draft, model folders given on the command line, layer-skip views of the target (the target minus
some layers), and the target itself at a temperature above 1 (its LM head scaled by 1 / tau): synthetic drafts of
graded quality that only place points on the curve (each costs a whole target forward per draft token).

Step compression is pooled (all tokens / all target forwards), with the s.e. of the per-image values; the ratio to
SJD is the mean of per-image ratios (paired), as in tree_image.py.

Usage: python docs/bench/draft_quality.py N_PROMPTS N_AGREEMENT [DRAFT_FOLDER ...]
"""

import copy
import sys

import torch
from transformers import AutoModelForCausalLM

from mmspec.drafting.layer_skip import layer_skip_model
from mmspec.zoo.data import make_scene, scene_seed
from mmspec.zoo.models import load_image_pipeline
from mmspec.zoo.recipes import t2i
from mmspec.zoo.recipes.common import HELDOUT_SCENE_SEED

torch.set_num_threads(1)
n, n_agree, folders = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
pipe, shipped = load_image_pipeline()
pipe.set_progress_bar_config(disable=True)
tok, vq = t2i.build_tokenizer(), pipe.vq
prompts = [make_scene(scene_seed(HELDOUT_SCENE_SEED + 7, i)).caption for i in range(n)]
drafts = {"shipped draft": shipped}
for f in folders:
    drafts[f] = AutoModelForCausalLM.from_pretrained(f, dtype=torch.float32).eval()
for skip in ((2,), (3,)):
    drafts[f"target minus layer {','.join(map(str, skip))}"] = layer_skip_model(pipe.model, list(skip))
for tau in (4.0, 2.5, 1.8, 1.4):
    hot = copy.deepcopy(pipe.model)
    hot.lm_head.weight = torch.nn.Parameter(pipe.model.lm_head.weight.detach() / tau)  # untied, scaled
    drafts[f"target at temperature {tau}"] = hot


def compression(**kw):
    """Per-image step compression [n] and the pooled one (all tokens / all target forwards, as tree_image.py)."""
    per, toks, fw = [], 0, 0
    for i, p in enumerate(prompts):
        out = pipe(p, guidance_scale=3.0, output_type="latent", generator=torch.Generator().manual_seed(i), **kw)
        toks, fw = toks + out.stats.new_tokens, fw + sum(out.stats.row_forwards)
        per.append(out.stats.new_tokens / sum(out.stats.row_forwards))
    return torch.tensor(per), toks / fw


sjd, sjd_pooled = compression(decoding="jacobi", window=16, init="random")
print(f"SJD as published (w16): {sjd_pooled:.2f}", flush=True)
print("| draft | on-policy expected acceptance | jd48-h-tree(3,2) step compression | vs SJD (paired) |")
print("|---|---|---|---|")
for name, d in drafts.items():
    acc = t2i.agreement(d, pipe.model, tok, vq, n=n_agree, on_policy=True)["expected_acceptance"]
    r, pooled = compression(decoding="jacobi-draft", window=48, init="horizontal", coupled=True, tree=(3, 2),
                            draft_model=d)
    ratio = r / sjd
    print(f"| {name} | {acc:.3f} | {pooled:.2f} +- {r.std().item() / n ** 0.5:.2f} | "
          f"{ratio.mean():.2f} +- {ratio.std().item() / n ** 0.5:.2f} |", flush=True)
