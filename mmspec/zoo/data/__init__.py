"""Deterministic, seeded data for the bundled model zoo.

Everything here is made locally or read from files that ship inside installed packages, so
the zoo can be trained and evaluated on a machine with no network:

* **Procedural scenes with captions** (:func:`make_scene`, :class:`SceneDataset`): 1..N shapes
  of named colour, size and 3x3-grid position on textured, noisy backgrounds, with a caption
  from a small regular vocabulary (:data:`SCENE_VOCAB`). :func:`parse_caption` inverts a caption
  back into attributes, so prompt adherence of a generated image can be scored by a classifier
  (:func:`scene_labels`, :data:`LABEL_NAMES`).
* **Natural-image crops** (:class:`NaturalCropDataset`): random crops of the sample images bundled
  with scikit-learn and scikit-image, labelled by source image (:data:`NATURAL_CLASSES`).
* **Text corpus** (:func:`stdlib_corpus`, :func:`text_corpus_splits`): the Python standard
  library's own source.
* **Moving scenes** (:func:`make_moving_scene`): short clips of shapes moving at constant
  velocity over a static background.

Images are ``np.uint8`` arrays of shape ``[H, W, 3]``; dataset items are float tensors of shape
``[3, H, W]`` in ``[-1, 1]``. No global random state is used: every generator is an
``np.random.default_rng`` seeded from the caller's integers.

The scenes are deliberately not toy-easy: backgrounds carry texture at several scales (stripes,
checks, dots, multi-octave cloud noise, illumination gradients), objects carry shading, and every
image gets per-pixel sensor noise and a slight colour cast. Image tokens of such data have a
realistic entropy, which matters because trivially predictable images make every speculative
decoding method look fast.

The package is split by topic: :mod:`.vocab` (words and label names), :mod:`.captions` (scene
containers, captions and labels), :mod:`.render` (drawing helpers), :mod:`.scenes` (static scenes),
:mod:`.natural` (natural crops), :mod:`.text` (text corpus), :mod:`.moving` (moving scenes); every
public name is importable from ``mmspec.zoo.data``.

Run ``python -m mmspec.zoo.data --out DIR`` to write preview grids.
"""

from __future__ import annotations

from .captions import (
    MovingScene,
    Scene,
    caption_labels,
    caption_words,
    labels_from_attributes,
    make_caption,
    parse_caption,
    scene_labels,
)
from .moving import (
    make_moving_scene,
)
from .natural import (
    NATURAL_CLASSES,
    NaturalCropDataset,
    load_natural_images,
    natural_crop,  # noqa: F401 (public name of the package)
)
from .scenes import (
    SceneDataset,
    image_to_tensor,
    make_scene,
    mean_patch_std,
    scene_seed,
    tensor_to_image,
)
from .text import (
    stdlib_corpus,
    text_corpus_splits,
)
from .vocab import (
    BACKGROUND_PHRASES,
    BACKGROUNDS,
    COLOUR_RGB,
    COLOURS,
    DIRECTIONS,
    LABEL_NAMES,
    POSITIONS,
    SCENE_VOCAB,
    SHAPES,
    SIZES,
)

__all__ = [
    "SHAPES",
    "COLOURS",
    "COLOUR_RGB",
    "SIZES",
    "POSITIONS",
    "BACKGROUNDS",
    "BACKGROUND_PHRASES",
    "DIRECTIONS",
    "SCENE_VOCAB",
    "LABEL_NAMES",
    "NATURAL_CLASSES",
    "Scene",
    "MovingScene",
    "make_scene",
    "make_caption",
    "caption_words",
    "parse_caption",
    "scene_labels",
    "labels_from_attributes",
    "caption_labels",
    "scene_seed",
    "mean_patch_std",
    "image_to_tensor",
    "tensor_to_image",
    "SceneDataset",
    "NaturalCropDataset",
    "load_natural_images",
    "stdlib_corpus",
    "text_corpus_splits",
    "make_moving_scene",
]
