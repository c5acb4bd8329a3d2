"""The embedded default for `make demo`: a tiny random checkpoint and a Parquet file of real images."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

# Real photographs and drawings shipped inside scikit-image (RGB, grayscale, RGBA and palette images).
DEMO_IMAGES = [
    "astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "hubble_deep_field.jpg", "camera.png",
    "coins.png", "page.png", "logo.png", "horse.png", "no_time_for_that_tiny.gif", "color.png",
]


def sample_image_dir() -> Path:
    try:
        import skimage
    except ImportError as exc:  # the demo needs real images from an installed package
        raise RuntimeError("the demo reads sample images from scikit-image: pip install scikit-image") from exc
    return Path(os.path.dirname(skimage.__file__)) / "data"


def write_demo_inputs(folder: Path) -> tuple[Path, Path]:
    """Write (checkpoint folder, images.parquet) under `folder` and return their paths."""
    from chameleon_core.random_checkpoint import write_random_checkpoint

    folder.mkdir(parents=True, exist_ok=True)
    model = write_random_checkpoint(folder / "chameleon-tiny-random", "tiny", seed=0)
    images = sample_image_dir()
    table = pa.table({
        "id": [Path(name).stem for name in DEMO_IMAGES],
        "image": pa.array([(images / name).read_bytes() for name in DEMO_IMAGES], pa.binary()),
        "file_name": DEMO_IMAGES,
    })
    data = folder / "images.parquet"
    pq.write_table(table, data, row_group_size=4)
    return model, data
