"""A lean PyTorch implementation of Meta's Chameleon for batched inference (no transformers at run time).

Names are imported on first use (PEP 562), so `from chameleon_core.tokenizer import ...` or
`from chameleon_core import ChameleonError` loads only what it needs: a CPU preprocessing worker that
tokenizes prompts and crops images never pays for importing torch (seconds of CPU and ~200 MiB).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from chameleon_core.lazy_exports import lazy_exports

_EXPORTS = {
    "ChameleonConfig": "config",
    "VQConfig": "config",
    "ChameleonEngine": "engine",
    "load_model": "engine",
    "ChameleonError": "errors",
    "CheckpointError": "errors",
    "ImageDecodeError": "errors",
    "PromptError": "errors",
    "TensorParallelError": "errors",
    "GenerationResult": "generate",
    "left_pad": "generate",
    "ImagePreprocessor": "image_processor",
    "ChameleonProcessor": "processor",
    "SamplingParams": "sampling",
    "ChameleonTokenizer": "tokenizer",
}

# The `generate` function is not among them: `chameleon_core.generate` names its module, which any
# import of that module binds on the package. Use `chameleon_core.generate.generate`.
__all__ = [
    "ChameleonConfig",
    "ChameleonEngine",
    "ChameleonError",
    "ChameleonProcessor",
    "ChameleonTokenizer",
    "CheckpointError",
    "GenerationResult",
    "ImageDecodeError",
    "ImagePreprocessor",
    "PromptError",
    "SamplingParams",
    "TensorParallelError",
    "VQConfig",
    "left_pad",
    "load_model",
]


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())

if TYPE_CHECKING:
    from chameleon_core.config import ChameleonConfig, VQConfig
    from chameleon_core.engine import ChameleonEngine, load_model
    from chameleon_core.errors import (
        ChameleonError,
        CheckpointError,
        ImageDecodeError,
        PromptError,
        TensorParallelError,
    )
    from chameleon_core.generate import GenerationResult, left_pad
    from chameleon_core.image_processor import ImagePreprocessor
    from chameleon_core.processor import ChameleonProcessor
    from chameleon_core.sampling import SamplingParams
    from chameleon_core.tokenizer import ChameleonTokenizer
