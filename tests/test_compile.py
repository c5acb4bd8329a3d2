"""The compiled paths (VQ encoder, decoder layers) give the eager path's codes and tokens."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from chameleon_core import ChameleonEngine, SamplingParams

pytestmark = pytest.mark.slow


def test_compiled_engine_matches_eager(tiny_ckpt, skimage_data):
    images = [Image.open(skimage_data / n) for n in ["astronaut.png", "camera.png", "logo.png"]]
    texts = ["Compare <image> with <image>.", "<image> What is it?", "No image here."]
    per_row = [images[:2], images[2:], []]
    params = SamplingParams(max_new_tokens=12)

    eager = ChameleonEngine.from_pretrained(tiny_ckpt)
    compiled = ChameleonEngine.from_pretrained(tiny_ckpt)
    compiled.compile(vq_batch=2, layers=True)  # 3 images: one full chunk and one padded chunk

    crops = [eager.processor.image_preprocessor.crop(im) for im in images]
    assert compiled.image_tokens(np.stack(crops)).tolist() == eager.image_tokens(np.stack(crops)).tolist()
    want = eager.generate(texts, per_row, params).result.token_ids
    got = compiled.generate(texts, per_row, params).result.token_ids
    assert got == want
