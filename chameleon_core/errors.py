"""Error types that callers (the pipeline in particular) turn into clear per-row or per-job messages."""


class ChameleonError(Exception):
    """Base class of every error raised on purpose by chameleon_core."""


class CheckpointError(ChameleonError, ValueError):
    """A checkpoint folder is incomplete or does not describe a Chameleon model."""


class ImageDecodeError(ChameleonError, ValueError):
    """An input could not be turned into pixels: empty, truncated, not an image, or too large."""


class PromptError(ChameleonError, ValueError):
    """A prompt cannot be built: placeholder/image count mismatch, or too long for the model."""


class TensorParallelError(ChameleonError, RuntimeError):
    """A tensor-parallel group cannot be formed or does not fit the model."""
