"""Evaluate a t2i training-state file (``--ckpt`` of ``python -m mmspec.zoo.train t2i_*``) without finishing the run:
held-out loss and entropy (256 scenes) and AR prompt adherence, written to ``OUT/eval.json`` beside the saved
weights. Usage: python scripts/eval_t2i_state.py STATE.pt OUT_DIR VQ_DIR [N_CAPTIONS]"""
import json
import sys

import torch

from mmspec.zoo import hub
from mmspec.zoo.recipes import t2i

torch.set_num_threads(1)
ckpt, out, vq_path = sys.argv[1], sys.argv[2], sys.argv[3]
n = int(sys.argv[4]) if len(sys.argv) > 4 else 64
state = torch.load(ckpt, map_location="cpu", weights_only=False)
vq = hub.load_vq(vq_path)
tok = t2i.build_tokenizer()
model = t2i.build_model(t2i.T2IRecipe(**state["recipe"]), len(tok), int(hub.codebook(vq).shape[0]))
model.load_state_dict(state["model"])
hub.tag_vq(model.config, vq, vq_path)
model.eval()
res = {"step": state["step"], "seen": state["seen"], "trained_minutes": round(state["elapsed"] / 60, 1)}
res.update(t2i.evaluate(model, tok, vq, 256, noise_free=True))
model.to(torch.float16).save_pretrained(out, safe_serialization=True)
tok.save_pretrained(out)
if n:  # 0: only the held-out loss (e.g. to export a teacher to distil from)
    res["adherence"] = t2i.adherence(out, vq_path=vq_path, n=n)
print(json.dumps(res, indent=1))
with open(f"{out}/eval.json", "w") as f:
    json.dump(res, f, indent=1)
