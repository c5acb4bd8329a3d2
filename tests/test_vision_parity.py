"""Vision parity with transformers >= 5.4: pixels (PIL backend), VQ codes, and multimodal generation."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from hf_oracle import hf_greedy, load_hf
from PIL import Image
from transformers.models.chameleon.image_processing_pil_chameleon import ChameleonImageProcessorPil

from chameleon_core import ChameleonEngine, ImageDecodeError, ImagePreprocessor, PromptError, SamplingParams
from chameleon_core.image_processor import PreprocessorConfig

SKIMAGE_FILES = [
    "astronaut.png",  # RGB 512x512
    "chelsea.png",  # RGB 451x300
    "rocket.jpg",  # JPEG RGB 640x427
    "hubble_deep_field.jpg",  # JPEG RGB 1000x872
    "camera.png",  # L
    "coins.png",  # L, odd size
    "logo.png",  # RGBA
    "horse.png",  # RGBA
    "no_time_for_that_tiny.gif",  # P (palette), tiny: upscaled
]


def _synthetic_images() -> dict[str, Image.Image]:
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (300, 420, 3), dtype=np.uint8)
    alpha = rng.integers(0, 256, (300, 420), dtype=np.uint8)
    images = {
        "LA": Image.fromarray(np.stack([rgb[..., 0], alpha], -1)),
        "RGBA-partial": Image.fromarray(np.dstack([rgb, alpha])),
        "CMYK": Image.fromarray(rgb).convert("CMYK"),
        "I;16": Image.fromarray((rng.integers(0, 65536, (260, 380))).astype(np.uint16)),
        "P": Image.fromarray(rgb).convert("P"),
    }
    p_transparent = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    p_transparent.info["transparency"] = 5
    images["P-transparency"] = p_transparent
    # Round-trip through bytes so modes survive an encoder as they would in a dataset.
    out = {}
    for name, img in images.items():
        fmt = "TIFF" if img.mode in ("CMYK", "I;16") else "PNG"
        buf = io.BytesIO()
        save_kwargs = {"transparency": 5} if name == "P-transparency" else {}
        img.save(buf, format=fmt, **save_kwargs)
        out[name] = Image.open(io.BytesIO(buf.getvalue()))
    return out


def _real_images(skimage_data) -> dict[str, Image.Image]:
    return {name: Image.open(skimage_data / name) for name in SKIMAGE_FILES}


def test_pixels_bit_exact_on_real_and_synthetic_images(skimage_data):
    ours = ImagePreprocessor(PreprocessorConfig())
    theirs = ChameleonImageProcessorPil()
    images = {**_real_images(skimage_data), **_synthetic_images()}
    modes = {img.mode for img in images.values()}
    assert {"RGB", "L", "RGBA", "P", "LA", "CMYK", "I;16"} <= modes, modes
    for name, image in images.items():
        expected = theirs(images=[image], return_tensors="pt")["pixel_values"][0]
        got = ours(image, name=name)
        assert got.dtype == torch.float32 and got.shape == (3, 512, 512), name
        assert torch.equal(got, expected), f"{name}: max |diff| {(got - expected).abs().max().item()}"


def test_animated_gif_uses_first_frame():
    frames = [Image.new("RGB", (64, 48), color) for color in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    data = buf.getvalue()
    ours = ImagePreprocessor(PreprocessorConfig())
    pixels = ours(data)
    expected = ChameleonImageProcessorPil()(images=[Image.open(io.BytesIO(data))], return_tensors="pt")
    assert torch.equal(pixels, expected["pixel_values"][0])
    red = np.float32(np.float32(255 * 0.0078) - 1)
    assert pixels[0, 256, 256].item() == pytest.approx(float(red)) and pixels[2, 256, 256].item() == -1.0


def test_preprocessor_reads_checkpoint_settings(hf_checkpoints, tiny_ckpt):
    for path, size in ((hf_checkpoints("mha"), 64), (tiny_ckpt, 32)):
        pre = ImagePreprocessor.from_pretrained(path)
        assert pre.output_size == (size, size)
        assert pre.config.rescale_factor == 0.0078


def test_vq_codes_match_get_image_tokens(hf_checkpoints, skimage_data):
    path = hf_checkpoints("mha")
    engine = ChameleonEngine.from_pretrained(path)
    hf_model, processor = load_hf(path)
    images = {**_real_images(skimage_data), **_synthetic_images()}
    pixels_hf = processor.image_processor(images=list(images.values()), return_tensors="pt")["pixel_values"]
    crops = np.stack([engine.processor.image_preprocessor.crop(img, name) for name, img in images.items()])
    pixels = engine.processor.image_preprocessor.normalize(crops)
    assert torch.equal(pixels, pixels_hf)
    with torch.inference_mode():
        codes_hf = hf_model.model.vqmodel.encode(pixels_hf).image_tokens.view(len(images), -1)
        bpe_hf = hf_model.model.get_image_tokens(pixels_hf)
        codes = engine.model.model.vqmodel.encode(pixels)
        bpe = engine.image_tokens(crops)
    assert codes.shape == (len(images), 16)
    assert torch.equal(codes, codes_hf)
    assert torch.equal(bpe, bpe_hf.long())
    assert len(torch.unique(codes)) > 10, "codes should vary across images"


@pytest.mark.parametrize("which", ["hf-gqa", "ours-tiny"])
def test_multimodal_batch_greedy_matches_transformers(which, hf_checkpoints, tiny_ckpt, skimage_data):
    path = tiny_ckpt if which == "ours-tiny" else hf_checkpoints("gqa")
    engine = ChameleonEngine.from_pretrained(path)
    hf_model, processor = load_hf(path)
    imgs = _real_images(skimage_data)
    texts = [
        "Compare these two pictures: <image> and <image>. Which one shows a person?",
        "<image>What is in this image?",
        "A text-only prompt in the same batch.",
    ]
    images = [[imgs["astronaut.png"], imgs["coins.png"]], [imgs["logo.png"]], []]
    hf_inputs = processor(images=[i for row in images for i in row], text=texts, return_tensors="pt",
                          padding=True)
    hf_tokens, _ = hf_greedy(hf_model, dict(hf_inputs), 20)

    out = engine.generate(texts, images, SamplingParams(max_new_tokens=20))
    lengths = out.result.num_prompt_tokens
    assert len(set(lengths)) == 3 and lengths == hf_inputs["attention_mask"].sum(1).tolist()
    for row, tokens in enumerate(out.result.token_ids):
        assert len(tokens) >= 16 or out.result.finish_reasons[row] == "stop"
        assert tokens == hf_tokens[row, : len(tokens)].tolist(), f"row {row} differs"
    assert out.texts == engine.tokenizer.decode_batch(out.result.token_ids)


def test_placeholder_count_mismatch_names_the_prompt(tiny_ckpt, skimage_data):
    engine = ChameleonEngine.from_pretrained(tiny_ckpt)
    img = Image.open(skimage_data / "camera.png")
    with pytest.raises(PromptError, match=r"prompt 1: has 1 <image> placeholder\(s\) but 2 image\(s\)"):
        engine.generate(["no image here", "one <image>"], [[], [img, img]])
    with pytest.raises(PromptError, match=r"prompt 0: has 0 <image> placeholder\(s\) but 1 image\(s\)"):
        engine.generate(["no image here"], [[img]])


def test_chat_template_helper(tiny_ckpt):
    engine = ChameleonEngine.from_pretrained(tiny_ckpt)
    conversation = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
        {"role": "user", "content": [{"type": "text", "text": "And this?"}, {"type": "image"}]},
    ]
    text, num_images = engine.processor.apply_chat_template(conversation)
    assert num_images == 2
    assert text == "<image>What is this?A cat.<reserved08706>And this?<image>"
    ids = engine.prompt_ids(text, num_images)
    assert ids.count(engine.tokenizer.boi_id) == 2 and ids[-1] == engine.tokenizer.sep_id
    with pytest.raises(PromptError, match=r"conversation\[0\]\.content\[0\]: type must be 'image' or 'text'"):
        engine.processor.apply_chat_template([{"role": "user", "content": [{"type": "video"}]}])


# -- guard rails: every bad input raises ImageDecodeError with a message naming the problem ----------

def _png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def test_decompression_bomb_is_refused_before_decoding():
    bomb = _png_bytes(Image.new("L", (9000, 9000)))  # 81M pixels, ~80 KB compressed
    assert len(bomb) < 200_000
    with pytest.raises(ImageDecodeError, match=r"bomb\.png: declared size 9000x9000 = 81000000 pixels is above"):
        ImagePreprocessor(PreprocessorConfig()).crop(bomb, name="bomb.png")


def test_truncated_jpeg(skimage_data):
    data = (skimage_data / "rocket.jpg").read_bytes()
    with pytest.raises(ImageDecodeError, match=r"cut\.jpg: cannot decode image \(OSError: image file is truncated"):
        ImagePreprocessor(PreprocessorConfig()).crop(data[: len(data) // 2], name="cut.jpg")


def test_non_image_bytes():
    noise = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    with pytest.raises(ImageDecodeError, match=r"noise\.bin: not a recognised image format \(4096 bytes\)"):
        ImagePreprocessor(PreprocessorConfig()).crop(noise, name="noise.bin")


def test_zero_byte_file():
    with pytest.raises(ImageDecodeError, match=r"empty\.png: empty input \(0 bytes\)"):
        ImagePreprocessor(PreprocessorConfig()).crop(b"", name="empty.png")


def test_byte_limit(skimage_data):
    data = (skimage_data / "astronaut.png").read_bytes()
    with pytest.raises(ImageDecodeError, match=r"big\.png: \d+ bytes is above the limit of 1000 bytes"):
        ImagePreprocessor(PreprocessorConfig(), max_bytes=1000).crop(data, name="big.png")
