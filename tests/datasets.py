"""Parquet test datasets built from the real images shipped in scikit-image, plus corrupt rows."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

SKIMAGE_FILES = [
    "astronaut.png", "brick.png", "camera.png", "cell.png", "chelsea.png", "chessboard_GRAY.png",
    "chessboard_RGB.png", "clock_motion.png", "coffee.png", "coins.png", "color.png", "grass.png", "gravel.png",
    "horse.png", "hubble_deep_field.jpg", "ihc.png", "logo.png", "microaneurysms.png", "moon.png",
    "motorcycle_left.png", "no_time_for_that_tiny.gif", "page.png", "phantom.png", "retina.jpg", "rocket.jpg",
    "text.png",
]


def skimage_dir() -> Path:
    import skimage

    return Path(os.path.dirname(skimage.__file__)) / "data"


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def synthetic_mode_images() -> dict[str, bytes]:
    """Encoded images in the modes scikit-image does not ship: LA, P+transparency, CMYK, I;16, animated."""
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)
    alpha = rng.integers(0, 256, (120, 160), dtype=np.uint8)
    palette = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=32)
    frames = [Image.new("RGB", (80, 60), c) for c in ((200, 30, 30), (30, 30, 200))]
    return {
        "synthetic_la": _encode(Image.fromarray(np.stack([rgb[..., 0], alpha], -1)), "PNG"),
        "synthetic_rgba_webp": _encode(Image.fromarray(np.dstack([rgb, alpha])), "WEBP", lossless=True),
        "synthetic_p_transparency": _encode(palette, "PNG", transparency=3),
        "synthetic_cmyk": _encode(Image.fromarray(rgb).convert("CMYK"), "JPEG"),
        "synthetic_i16": _encode(Image.fromarray(rng.integers(0, 65536, (90, 70)).astype(np.uint16)), "PNG"),
        "synthetic_animated_gif": _encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50),
    }


def corrupt_images() -> dict[str, bytes]:
    jpeg = (skimage_dir() / "rocket.jpg").read_bytes()
    return {
        "bad_zero_bytes": b"",
        "bad_truncated_jpeg": jpeg[: len(jpeg) // 3],
        "bad_random_bytes": np.random.default_rng(2).integers(0, 256, 5000, dtype=np.uint8).tobytes(),
        "bad_decompression_bomb": _encode(Image.new("L", (10000, 10000)), "PNG"),
    }


def write_caption_dataset(folder: Path, files: int = 2) -> tuple[list[Path], dict[str, str]]:
    """>= 40 rows in the Hugging Face image struct form {bytes, path}, split over `files` Parquet files.

    Real images come as bytes, as relative paths (next to the Parquet file) and as absolute paths; the
    corrupt rows are zero bytes, a truncated JPEG, random bytes, a decompression bomb and a missing path.
    Returns the files and, per id, "ok" or the expected error type.
    """
    folder.mkdir(parents=True, exist_ok=True)
    images_dir = folder / "images"
    images_dir.mkdir(exist_ok=True)
    rows: list[dict] = []
    expected: dict[str, str] = {}
    for i, name in enumerate(SKIMAGE_FILES):
        data = (skimage_dir() / name).read_bytes()
        stem = Path(name).stem
        if i % 3 == 0:
            (images_dir / name).write_bytes(data)
            rows.append({"id": f"rel_{stem}", "image": {"bytes": None, "path": f"images/{name}"}})
            expected[f"rel_{stem}"] = "ok"
        elif i % 3 == 1:
            rows.append({"id": f"abs_{stem}", "image": {"bytes": None, "path": str(skimage_dir() / name)}})
            expected[f"abs_{stem}"] = "ok"
        rows.append({"id": f"bytes_{stem}", "image": {"bytes": data, "path": None}})
        expected[f"bytes_{stem}"] = "ok"
    for name, data in synthetic_mode_images().items():
        rows.append({"id": name, "image": {"bytes": data, "path": None}})
        expected[name] = "ok"
    for name, data in corrupt_images().items():
        rows.append({"id": name, "image": {"bytes": data, "path": None}})
        expected[name] = "ImageDecodeError"
    rows.append({"id": "bad_missing_path", "image": {"bytes": None, "path": "images/does_not_exist.png"}})
    expected["bad_missing_path"] = "ImageSourceError"
    order = np.random.default_rng(3).permutation(len(rows))
    rows = [rows[i] for i in order]
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    paths = []
    for k in range(files):
        part = rows[k::files]
        table = pa.table({
            "id": [r["id"] for r in part],
            "image": pa.array([r["image"] for r in part], image_type),
            "note": [f"row {r['id']}" for r in part],
        })
        path = folder / f"part{k}.parquet"
        pq.write_table(table, path, row_group_size=7)
        paths.append(path)
    return paths, expected


def write_multi_image_dataset(path: Path) -> Path:
    """Rows with 0, 1 and 2 images (list<binary>) and their own prompts (a prompt column)."""
    d = skimage_dir()
    imgs = {n: (d / n).read_bytes() for n in ("astronaut.png", "coins.png", "logo.png", "chelsea.png")}
    table = pa.table({
        "id": ["two_images", "one_image", "no_image", "mismatch", "two_again"],
        "images": pa.array([
            [imgs["astronaut.png"], imgs["coins.png"]],
            [imgs["logo.png"]],
            [],
            [imgs["chelsea.png"]],
            [imgs["chelsea.png"], imgs["logo.png"]],
        ], pa.list_(pa.binary())),
        "question": [
            "Compare <image> with <image>.",
            "<image>What is shown?",
            "Write one sentence about cats.",
            "This prompt has no placeholder.",
            "<image> and <image>: which is older?",
        ],
    })
    pq.write_table(table, path)
    return path
