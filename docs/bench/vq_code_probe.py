"""Is what the classifier misses on VQ reconstructions in the codes? (session 13, mmspec/zoo/cards/vq.md)

Trains a small CNN on the quantised latents alone (codebook vectors, ``[8, 16, 16]``) of one-object training
scenes to read shape / size / background / colour, and reports its accuracy on the 256 held-out one-object scenes
the tokenizer's card reads with the evaluation classifier.

    python docs/bench/vq_code_probe.py [N_TRAIN=8192] [MINUTES=8]
"""

import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from mmspec.zoo import hub
from mmspec.zoo.recipes.common import HELDOUT_SCENE_SEED, TRAIN_SCENE_SEED, label_tensors, scene_batch

HEADS = ["shape", "size", "background", "colour"]


@torch.no_grad()
def latents(vq, cb, seed: int, n: int):
    """Code vectors ``[n, D, 16, 16]`` of ``n`` one-object scenes of stream ``seed`` and their labels."""
    zs, labs = [], {h: [] for h in HEADS}
    for s in range(0, n, 256):
        x, scenes = scene_batch(s, min(256, n - s), seed, 1)
        t = hub.encode_images(vq, x)
        zs.append(cb[t].view(-1, 16, 16, cb.shape[1]).permute(0, 3, 1, 2).contiguous())
        lab = label_tensors(scenes)
        for h in HEADS:
            labs[h].append(lab[h])
    return torch.cat(zs), {h: torch.cat(v) for h, v in labs.items()}


class Probe(nn.Module):
    def __init__(self, channels: int, classes: dict[str, int], width: int = 96):
        super().__init__()
        block = lambda i, o, s=1: [nn.Conv2d(i, o, 3, padding=1, stride=s), nn.GELU()]  # noqa: E731
        self.body = nn.Sequential(*block(channels, width), *block(width, width), *block(width, width, 2),
                                  *block(width, width), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.heads = nn.ModuleDict({h: nn.Linear(width, k) for h, k in classes.items()})

    def forward(self, z):
        f = self.body(z)
        return {h: m(f) for h, m in self.heads.items()}


def accuracy(net, z, y) -> dict[str, float]:
    with torch.no_grad():
        o = net(z)
    return {h: round(float((o[h].argmax(1) == y[h]).float().mean()), 3) for h in HEADS}


def main(n_train: int = 8192, minutes: float = 8.0) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    vq = hub.load_vq()
    cb = hub.codebook(vq)
    ztr, ytr = latents(vq, cb, TRAIN_SCENE_SEED + 77, n_train)
    zte, yte = latents(vq, cb, HELDOUT_SCENE_SEED + 1, 256)
    mu, sd = ztr.mean((0, 2, 3), keepdim=True), ztr.std((0, 2, 3), keepdim=True)
    ztr, zte = (ztr - mu) / sd, (zte - mu) / sd
    net = Probe(cb.shape[1], {h: int(max(ytr[h].max(), yte[h].max())) + 1 for h in HEADS})
    opt = torch.optim.AdamW(net.parameters(), 2e-3, weight_decay=0.05)
    step, t0 = 0, time.time()
    while time.time() - t0 < minutes * 60:
        idx = torch.randint(0, n_train, (128,))
        out = net(ztr[idx])
        loss = sum(F.cross_entropy(out[h], ytr[h][idx]) for h in HEADS)
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        if step % 200 == 0:
            print(f"step {step} {time.time() - t0:.0f}s loss {loss.item():.3f} held-out {accuracy(net, zte, yte)}",
                  flush=True)
    print("final held-out", accuracy(net, zte, yte), "train", accuracy(net, ztr[:1024], {h: v[:1024] for h, v in ytr.items()}))


if __name__ == "__main__":
    main(*(int(a) if i == 0 else float(a) for i, a in enumerate(sys.argv[1:3])))
