"""diffusers-style pipelines."""

from .image import SpeculativeImagePipeline, SpeculativeImagePipelineOutput

__all__ = ["SpeculativeImagePipeline", "SpeculativeImagePipelineOutput"]
