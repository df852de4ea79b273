"""CLI preview: ``python -m mmspec.zoo.data --out DIR`` writes preview grids of the zoo data."""

from __future__ import annotations

import math
import os

import torch

from .moving import make_moving_scene
from .natural import NATURAL_CLASSES, NaturalCropDataset
from .scenes import SceneDataset, image_to_tensor, scene_seed


def _main(argv: list[str] | None = None) -> None:
    import argparse

    from torchvision.utils import save_image

    ap = argparse.ArgumentParser(prog="python -m mmspec.zoo.data", description="Write preview grids of the zoo data.")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--n", type=int, default=16, help="number of scenes / crops")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--zoom", type=int, default=2, help="nearest-neighbour upscaling of the saved grids")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)

    def save(batch: torch.Tensor, path: str, nrow: int) -> None:
        x = (batch + 1) / 2
        if args.zoom > 1:
            x = torch.nn.functional.interpolate(x, scale_factor=args.zoom, mode="nearest")
        save_image(x, path, nrow=nrow, padding=2 * args.zoom, pad_value=1.0)

    nrow = max(1, int(math.ceil(math.sqrt(args.n))))
    scenes = SceneDataset(args.n, size=args.size, seed=args.seed)
    items = [scenes[i] for i in range(args.n)]
    save(torch.stack([it["image"] for it in items]), os.path.join(args.out, "scenes.png"), nrow)
    with open(os.path.join(args.out, "scenes.txt"), "w") as fh:
        for i, it in enumerate(items):
            fh.write(f"{i // nrow},{i % nrow}: {it['caption']}\n")

    crops = NaturalCropDataset(args.n, size=args.size, seed=args.seed)
    citems = [crops[i] for i in range(args.n)]
    save(torch.stack([it["image"] for it in citems]), os.path.join(args.out, "natural.png"), nrow)
    with open(os.path.join(args.out, "natural.txt"), "w") as fh:
        for i, it in enumerate(citems):
            fh.write(f"{i // nrow},{i % nrow}: {NATURAL_CLASSES[it['label']]}\n")

    clips = [make_moving_scene(scene_seed(args.seed, i), args.size) for i in range(4)]
    save(torch.cat([image_to_tensor(c.frames) for c in clips]), os.path.join(args.out, "moving.png"), clips[0].frames.shape[0])
    with open(os.path.join(args.out, "moving.txt"), "w") as fh:
        for i, c in enumerate(clips):
            fh.write(f"row {i}: {c.caption}\n")
    print(f"wrote previews to {args.out}")


if __name__ == "__main__":
    _main()
