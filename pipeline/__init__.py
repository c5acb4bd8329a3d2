"""Ray Data pipelines around chameleon_core: captioning and VQA evaluation over Parquet datasets."""

from pipeline.caption import build_caption_dataset, release_placement_groups, run_caption_job
from pipeline.options import CaptionOptions, GenerationSettings, OptionsError

__all__ = ["CaptionOptions", "GenerationSettings", "OptionsError", "build_caption_dataset",
           "release_placement_groups", "run_caption_job"]
