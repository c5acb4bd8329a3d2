"""A lean PyTorch implementation of Meta's Chameleon for batched inference (no transformers at run time)."""

from chameleon_core.config import ChameleonConfig, VQConfig
from chameleon_core.engine import ChameleonEngine, load_model
from chameleon_core.errors import (
    ChameleonError,
    CheckpointError,
    ImageDecodeError,
    PromptError,
    TensorParallelError,
)
from chameleon_core.generate import GenerationResult, generate, left_pad
from chameleon_core.image_processor import ImagePreprocessor
from chameleon_core.processor import ChameleonProcessor
from chameleon_core.sampling import SamplingParams
from chameleon_core.tokenizer import ChameleonTokenizer

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
    "generate",
    "left_pad",
    "load_model",
]
