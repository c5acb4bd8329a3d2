"""Image decoding and preprocessing, bit-exact with transformers' PIL backend for Chameleon.

The work is split in two so a pipeline can ship compact uint8 crops between machines:
`ImagePreprocessor.crop` (decode, RGB, resize, centre crop -> uint8 CHW) runs on CPUs, and
`ImagePreprocessor.normalize` (uint8 -> float32) runs next to the model. Only `normalize` needs
torch, and imports it itself: a worker that only crops never loads it.
"""

from __future__ import annotations

import io
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, UnidentifiedImageError

from chameleon_core.errors import CheckpointError, ImageDecodeError

if TYPE_CHECKING:
    import torch

DEFAULT_MAX_PIXELS = 64_000_000  # declared width*height; about 8000x8000
DEFAULT_MAX_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class PreprocessorConfig:
    shortest_edge: int = 512
    crop_height: int = 512
    crop_width: int = 512
    resample: int = 1  # PIL LANCZOS
    do_resize: bool = True
    do_center_crop: bool = True
    do_rescale: bool = True
    rescale_factor: float = 0.0078
    do_normalize: bool = True
    image_mean: tuple[float, float, float] = (1.0, 1.0, 1.0)
    image_std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    do_convert_rgb: bool = True

    @classmethod
    def from_dict(cls, raw: dict) -> PreprocessorConfig:
        size = raw.get("size") or {}
        crop = raw.get("crop_size") or {}
        if isinstance(size, int):
            size = {"shortest_edge": size}
        if isinstance(crop, int):
            crop = {"height": crop, "width": crop}
        defaults = cls()
        shortest = size.get("shortest_edge", defaults.shortest_edge)
        return cls(
            shortest_edge=int(shortest),
            crop_height=int(crop.get("height", defaults.crop_height)),
            crop_width=int(crop.get("width", defaults.crop_width)),
            resample=int(raw.get("resample", defaults.resample)),
            do_resize=bool(raw.get("do_resize", True)),
            do_center_crop=bool(raw.get("do_center_crop", True)),
            do_rescale=bool(raw.get("do_rescale", True)),
            rescale_factor=float(raw.get("rescale_factor", defaults.rescale_factor)),
            do_normalize=bool(raw.get("do_normalize", True)),
            image_mean=tuple(float(v) for v in raw.get("image_mean", defaults.image_mean)),
            image_std=tuple(float(v) for v in raw.get("image_std", defaults.image_std)),
            do_convert_rgb=bool(raw.get("do_convert_rgb", True)),
        )

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> PreprocessorConfig:
        """Read preprocessor_config.json, or the `image_processor` section of processor_config.json (v5)."""
        model_dir = Path(model_dir)
        for filename, key in (("preprocessor_config.json", None), ("processor_config.json", "image_processor")):
            path = model_dir / filename
            if not path.is_file():
                continue
            try:
                raw = json.loads(path.read_text())
            except json.JSONDecodeError as exc:
                raise CheckpointError(f"{path}: not valid JSON ({exc})") from exc
            if key is not None:
                raw = raw.get(key)
            if raw:
                return cls.from_dict(raw)
        raise CheckpointError(
            f"{model_dir}: no image processor settings (preprocessor_config.json, or processor_config.json "
            "with an 'image_processor' section)"
        )


class ImagePreprocessor:
    """Bytes or PIL image -> the (3, H, W) tensor Chameleon's VQ-VAE expects."""

    def __init__(
        self,
        config: PreprocessorConfig,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        max_bytes: int = DEFAULT_MAX_BYTES,
    ):
        self.config = config
        self.max_pixels = max_pixels
        self.max_bytes = max_bytes

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, **limits) -> ImagePreprocessor:
        return cls(PreprocessorConfig.from_pretrained(model_dir), **limits)

    @property
    def output_size(self) -> tuple[int, int]:
        return self.config.crop_height, self.config.crop_width

    def open(self, data: bytes | bytearray | memoryview, name: str = "image") -> Image.Image:
        """Decode encoded image bytes, refusing empty, oversized, truncated and non-image inputs."""
        size = len(data)
        if size == 0:
            raise ImageDecodeError(f"{name}: empty input (0 bytes)")
        if size > self.max_bytes:
            raise ImageDecodeError(f"{name}: {size} bytes is above the limit of {self.max_bytes} bytes")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                image = Image.open(io.BytesIO(bytes(data)))
                self._check_pixels(image, name)
                image.load()
        except ImageDecodeError:
            raise
        except UnidentifiedImageError as exc:
            raise ImageDecodeError(f"{name}: not a recognised image format ({size} bytes)") from exc
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageDecodeError(f"{name}: decompression bomb refused ({exc})") from exc
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise ImageDecodeError(f"{name}: cannot decode image ({type(exc).__name__}: {exc})") from exc
        return image

    def _check_pixels(self, image: Image.Image, name: str) -> None:
        width, height = image.size
        if width <= 0 or height <= 0:
            raise ImageDecodeError(f"{name}: image has no pixels ({width}x{height})")
        if width * height > self.max_pixels:
            raise ImageDecodeError(
                f"{name}: declared size {width}x{height} = {width * height} pixels is above the limit of "
                f"{self.max_pixels} (decompression bomb guard)"
            )

    def crop(self, image: Image.Image | bytes, name: str = "image") -> np.ndarray:
        """RGB, shortest edge resized, centre-cropped: uint8 array (3, crop_h, crop_w)."""
        if not isinstance(image, Image.Image):
            image = self.open(image, name)
        else:
            self._check_pixels(image, name)
        cfg = self.config
        try:
            if cfg.do_convert_rgb:
                image = to_rgb(image)
            if cfg.do_resize:
                image = image.resize(resize_output_size(image.size, cfg.shortest_edge), resample=cfg.resample)
            array = np.asarray(image)
        except (OSError, ValueError) as exc:
            raise ImageDecodeError(f"{name}: cannot convert image ({type(exc).__name__}: {exc})") from exc
        if array.ndim == 2:
            array = array[:, :, None]
        array = np.moveaxis(array, -1, 0)
        if cfg.do_center_crop:
            array = center_crop(array, cfg.crop_height, cfg.crop_width)
        if array.dtype != np.uint8 or array.shape[0] != 3:
            raise ImageDecodeError(f"{name}: unsupported pixel layout {array.dtype} {array.shape} after conversion")
        return np.ascontiguousarray(array)

    def normalize(self, crops: torch.Tensor | np.ndarray) -> torch.Tensor:
        """uint8 (..., 3, H, W) -> float32, as `float32(x * rescale_factor)` then `(x - mean) / std`."""
        import torch

        x = torch.as_tensor(crops)
        cfg = self.config
        # float64 multiply then float32 round, exactly like the reference's numpy path.
        x = x.to(torch.float64) * cfg.rescale_factor if cfg.do_rescale else x.to(torch.float64)
        x = x.to(torch.float32)
        if cfg.do_normalize:
            shape = (3, 1, 1)
            mean = torch.tensor(cfg.image_mean, dtype=torch.float32, device=x.device).view(shape)
            std = torch.tensor(cfg.image_std, dtype=torch.float32, device=x.device).view(shape)
            x = (x - mean) / std
        return x

    def __call__(self, image: Image.Image | bytes, name: str = "image") -> torch.Tensor:
        return self.normalize(self.crop(image, name))


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB image; any transparency is composited onto opaque white (rounded, as transformers >= 5.4 does)."""
    has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
    if has_alpha:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def resize_output_size(size: tuple[int, int], shortest_edge: int) -> tuple[int, int]:
    """(width, height) with the short side at `shortest_edge` and the long side truncated, not rounded."""
    width, height = size
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(shortest_edge * long / short)
    return (shortest_edge, new_long) if width <= height else (new_long, shortest_edge)


def center_crop(array: np.ndarray, height: int, width: int) -> np.ndarray:
    """Centre crop of a CHW array; pads with zeros (centred) where the image is smaller, as transformers does."""
    _, h, w = array.shape
    if h < height or w < width:
        top_pad = max(height - h, 0) // 2
        left_pad = max(width - w, 0) // 2
        padded = np.zeros((array.shape[0], max(h, height), max(w, width)), dtype=array.dtype)
        padded[:, top_pad : top_pad + h, left_pad : left_pad + w] = array
        array, (h, w) = padded, padded.shape[1:]
    top = (h - height) // 2
    left = (w - width) // 2
    return array[:, top : top + height, left : left + width]
