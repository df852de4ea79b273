"""Compare c2i models: tokenizer reconstruction PSNR on held-out crops, and Frechet distance (evaluation-classifier
features) between AR samples (guidance 3) and held-out crops of the same classes.

    python scripts/c2i_compare.py N_PER_CLASS FOLDER...

FOLDER: saved c2i models; each decodes with the tokenizer it names (``zoo_vq.json``, else ``vq``)."""
import json
import sys

import torch

from mmspec.models.llamagen import LlamaGenGPT
from mmspec.pipelines import SpeculativeImagePipeline
from mmspec.zoo import hub
from mmspec.zoo.data import NATURAL_CLASSES, NaturalCropDataset
from mmspec.zoo.recipes.common import HELDOUT_CROP_SEED, psnr

torch.set_num_threads(1)
n_per = int(sys.argv[1])
K = len(NATURAL_CLASSES)
ds = NaturalCropDataset(K * n_per, 64, HELDOUT_CROP_SEED)
items = [ds[i] for i in range(K * n_per)]
real = torch.stack([it["image"] for it in items])
labels = [it["label"] for it in items]
clf = hub.load_classifier()
real_f = hub.features(clf, real)
res = {}
for folder in sys.argv[2:]:
    model = LlamaGenGPT.from_pretrained(folder, torch_dtype=torch.float32).eval()
    vq = hub.load_vq_for(folder)
    recon = hub.decode_tokens(vq, hub.encode_images(vq, real))
    pipe = SpeculativeImagePipeline(model=model, vq=vq)
    pipe.set_progress_bar_config(disable=True)
    outs = []
    for i in range(0, len(labels), 34):
        lab = labels[i : i + 34]
        o = pipe(class_labels=lab, guidance_scale=3.0, decoding="ar", output_type="pt",
                 generator=[torch.Generator().manual_seed(1000 + i + j) for j in range(len(lab))])
        outs.append(o.images * 2 - 1)
    samples = torch.cat(outs)
    res[folder] = {
        "tokenizer": hub.vq_tag(folder)["name"],
        "recon_psnr_db": float(psnr(recon.clamp(-1, 1), real).mean()),
        "frechet_recon_vs_real": float(hub.frechet_distance(real_f, hub.features(clf, recon))),
        "frechet_samples_vs_real": float(hub.frechet_distance(real_f, hub.features(clf, samples))),
        "n": len(labels),
    }
    print(folder, res[folder], flush=True)
print(json.dumps(res, indent=1))
