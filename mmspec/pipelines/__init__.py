"""diffusers-style pipelines."""

from .caption import CaptionOutput, CaptionPipeline
from .image import SpeculativeImagePipeline, SpeculativeImagePipelineOutput

__all__ = ["SpeculativeImagePipeline", "SpeculativeImagePipelineOutput", "CaptionPipeline", "CaptionOutput"]
