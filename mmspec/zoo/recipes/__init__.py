"""Training recipes of the bundled zoo models (``python -m mmspec.zoo.train NAME``).

* :mod:`.vq`: the image tokenizer (diffusers ``VQModel``, 64x64 <-> 16x16 codes of 1024).
* :mod:`.classifier`: the evaluation classifier of procedural scenes.
* :mod:`.t2i`: the text-to-image token target and draft.
* :mod:`.text_lm`: the text LM target and draft (Python standard library source).
* :mod:`.c2i`: the class-conditional LlamaGen model on natural-image crops.
* :mod:`.captioner`: the LLaVA-architecture captioner and its draft.
* :mod:`.mar`: the continuous-token autoencoder, MAR target and draft.
* :mod:`.video`: the caption-to-video token model.
"""

RECIPES = ("vq", "classifier", "t2i", "text_lm", "c2i", "captioner", "mar", "video")
