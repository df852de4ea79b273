"""diffusers-style pipelines."""

from .caption import CaptionOutput, CaptionPipeline
from .continuous import SpeculativeContinuousPipeline, SpeculativeContinuousPipelineOutput
from .image import SpeculativeImagePipeline, SpeculativeImagePipelineOutput
from .video import SpeculativeVideoPipeline, SpeculativeVideoPipelineOutput, export_video

__all__ = ["SpeculativeImagePipeline", "SpeculativeImagePipelineOutput", "CaptionPipeline", "CaptionOutput",
           "SpeculativeVideoPipeline", "SpeculativeVideoPipelineOutput", "export_video",
           "SpeculativeContinuousPipeline", "SpeculativeContinuousPipelineOutput"]
