"""Ray Data pipelines around chameleon_core: captioning and VQA evaluation over Parquet datasets.

Names are imported on first use (PEP 562): a Ray worker that unpickles a stage from `pipeline.units`
or `pipeline.stages` then imports only that module's dependencies, not the whole job (and torch).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from chameleon_core.lazy_exports import lazy_exports

_EXPORTS = {
    "build_caption_dataset": "caption",
    "release_placement_groups": "caption",
    "run_caption_job": "caption",
    "CaptionOptions": "options",
    "GenerationSettings": "options",
    "OptionsError": "options",
}

__all__ = ["CaptionOptions", "GenerationSettings", "OptionsError", "build_caption_dataset",
           "release_placement_groups", "run_caption_job"]

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())

if TYPE_CHECKING:
    from pipeline.caption import build_caption_dataset, release_placement_groups, run_caption_job
    from pipeline.options import CaptionOptions, GenerationSettings, OptionsError
