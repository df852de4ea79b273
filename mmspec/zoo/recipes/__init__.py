"""Training recipes of the bundled zoo models (``python -m mmspec.zoo.train NAME``).

* :mod:`.vq`: the image tokenizer (diffusers ``VQModel``, 64x64 <-> 16x16 codes of 1024).
* :mod:`.classifier`: the evaluation classifier of procedural scenes.
"""

RECIPES = ("vq", "classifier")
