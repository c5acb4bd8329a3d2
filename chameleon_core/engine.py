"""Loading a checkpoint folder into a ready model, and the one-call API on top of it."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from chameleon_core.checkpoint import VQ_PREFIX, load_weights, parse_dtype
from chameleon_core.config import ChameleonConfig
from chameleon_core.cpu_allocator import keep_freed_memory
from chameleon_core.distributed import TPGroup
from chameleon_core.errors import CheckpointError
from chameleon_core.generate import GenerationResult, generate, left_pad
from chameleon_core.model import ChameleonForCausalLM, causal_padding_mask, positions_from_mask
from chameleon_core.packed_linear import pack_linears
from chameleon_core.processor import ChameleonProcessor
from chameleon_core.sampling import SamplingParams
from chameleon_core.tokenizer import ImageVocabulary
from chameleon_core.tp import apply_tensor_parallel


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CheckpointError("device 'cuda' was asked for but torch sees no CUDA device")
    return device


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """'auto' is bfloat16 on CUDA and float32 on the CPU (where bf16 matmuls are slow)."""
    if str(dtype) == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return parse_dtype(dtype)


def load_model(
    model_dir: str | Path,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    vq_dtype: str | torch.dtype | None = None,
    tp: TPGroup | None = None,
    config: ChameleonConfig | None = None,
) -> ChameleonForCausalLM:
    """Build the model on the meta device, shard it when `tp` spans several ranks, then stream weights in.

    Text weights are cast to `dtype`. VQ-VAE weights keep the dtype they are stored in (the original
    Chameleon tokenizer runs the VQ in its checkpoint dtype) unless `vq_dtype` is given; pass the model
    dtype to reproduce transformers, which casts the VQ together with everything else.
    """
    config = config or ChameleonConfig.from_pretrained(model_dir)
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    vocab = ImageVocabulary(config.vocabulary_map, config.vq.num_embeddings)
    with torch.device("meta"):
        model = ChameleonForCausalLM(config, vocab.token_ids)
    shards = apply_tensor_parallel(model, tp) if tp is not None and tp.world_size > 1 else None
    keep = (VQ_PREFIX,) if vq_dtype is None else ()
    load_weights(model, model_dir, dtype, device, shards, keep_dtype_prefixes=keep)
    if vq_dtype is not None:
        model.model.vqmodel.to(parse_dtype(vq_dtype))
    model = model.to(device).eval()
    pack_linears(model)  # CPU only; a no-op elsewhere
    if device.type == "cpu":
        keep_freed_memory()  # after loading: see cpu_allocator
    return model


@dataclass
class GenerateOutput:
    texts: list[str]
    result: GenerationResult
    timings: dict[str, float] = field(default_factory=dict)


class ChameleonEngine:
    """Model + processor: images and prompts in, text out. Every rank of a TP group runs the same calls."""

    def __init__(self, model: ChameleonForCausalLM, processor: ChameleonProcessor, tp: TPGroup | None = None):
        self.model = model
        self.processor = processor
        self.tp = tp
        self._vq_encode = None  # compiled VQ encoder, see compile()
        self._vq_batch = 0

    def compile(self, vq_batch: int = 8, vq: bool = True, layers: bool = False) -> None:
        """Compile the VQ encoder and, optionally, each decoder layer with torch.compile.

        The VQ encoder is a long chain of convolutions, group norms and swish activations that inductor
        fuses: 2.5x faster on a 2-core CPU in bf16 (bench/RESULTS.md). It always sees chunks of
        `vq_batch` images (the last one padded) so it compiles once, for tens of seconds.

        A decoder layer is a few matmuls among some forty small ops (norms, rotary, qk-norm, cache
        writes, softmax, SiLU). Compiling the layers (dynamic batch, prompt and cache lengths, so one
        graph serves prefill, one decode and one the prompt's last layer) fuses the small ops; the
        matmuls stay oneDNN calls on the CPU's packed weights (packed_linear). With packed weights the
        fusion saved 7-10% of a prefill on the 2-core dev CPU; per decode step, A/B runs did not agree on a
        gain beyond their noise.
        """
        if vq:
            vqmodel = self.model.model.vqmodel
            vqmodel.to(memory_format=torch.channels_last)
            self._vq_encode = torch.compile(vqmodel.encode, dynamic=False)
            self._vq_batch = vq_batch
        if layers:
            for layer in self.model.model.layers:
                layer.compile(dynamic=True)

    def _encode_codes(self, pixels: torch.Tensor) -> torch.Tensor:
        vqmodel = self.model.model.vqmodel
        if self._vq_encode is None:
            return vqmodel.encode(pixels)
        chunks = []
        for start in range(0, pixels.shape[0], self._vq_batch):
            chunk = pixels[start : start + self._vq_batch]
            n = chunk.shape[0]
            if n < self._vq_batch:
                chunk = torch.cat([chunk, chunk.new_zeros((self._vq_batch - n, *chunk.shape[1:]))])
            chunk = chunk.to(dtype=vqmodel.dtype).contiguous(memory_format=torch.channels_last)
            chunks.append(self._vq_encode(chunk)[:n])
        return torch.cat(chunks)

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | Path,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "float32",
        vq_dtype: str | torch.dtype | None = None,
        tp: TPGroup | None = None,
        **image_limits,
    ) -> ChameleonEngine:
        config = ChameleonConfig.from_pretrained(model_dir)
        processor = ChameleonProcessor.from_pretrained(model_dir, config, **image_limits)
        model = load_model(model_dir, dtype, device, vq_dtype, tp, config)
        return cls(model, processor, tp)

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def device(self) -> torch.device:
        return self.model.device

    @torch.inference_mode()
    def image_tokens(self, crops: torch.Tensor | np.ndarray) -> torch.Tensor:
        """BPE ids (N, image_seq_length) of uint8 crops (N, 3, H, W) from `ImagePreprocessor.crop`."""
        crops = torch.as_tensor(crops).to(self.device, non_blocking=True)
        pixels = self.processor.image_preprocessor.normalize(crops)
        return self.processor.image_vocabulary.codes_to_tokens(self._encode_codes(pixels))

    def prompt_ids(self, text: str, num_images: int, text_completion: bool = False, name: str = "prompt") -> list[int]:
        return self.processor.prompt_ids(text, num_images, text_completion, name)

    @torch.inference_mode()
    def fill_images(self, prompts: Sequence[list[int]], crops: Sequence[np.ndarray]) -> list[list[int]]:
        """Prompts with their `<image>` placeholders replaced by the VQ tokens of `crops`, in order."""
        if not crops:
            return [list(p) for p in prompts]
        tokens = self.image_tokens(np.stack(crops)).cpu()
        flat = torch.tensor([t for p in prompts for t in p], dtype=torch.long)
        filled = self.processor.fill_image_tokens(flat, tokens).tolist()
        out, start = [], 0
        for p in prompts:
            out.append(filled[start : start + len(p)])
            start += len(p)
        return out

    def generate_ids(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams, seeds: Sequence[int] | None = None
    ) -> GenerationResult:
        tok = self.tokenizer
        return generate(self.model, prompts, params, tok.eos_id, tok.pad_id, seeds)

    def generate(
        self,
        texts: Sequence[str],
        images: Sequence[Sequence[Image.Image | bytes]] | None = None,
        params: SamplingParams | None = None,
        text_completion: bool = False,
        seeds: Sequence[int] | None = None,
    ) -> GenerateOutput:
        """Generate for a batch of prompts; `images[i]` are the images of prompt i, in placeholder order."""
        params = params or SamplingParams()
        images = images if images is not None else [[] for _ in texts]
        if len(images) != len(texts):
            raise ValueError(f"{len(texts)} prompts but {len(images)} image lists")
        t0 = time.perf_counter()
        prompts = [
            self.prompt_ids(text, len(imgs), text_completion, name=f"prompt {i}")
            for i, (text, imgs) in enumerate(zip(texts, images))
        ]
        crops = [
            self.processor.image_preprocessor.crop(img, name=f"prompt {i} image {j}")
            for i, imgs in enumerate(images)
            for j, img in enumerate(imgs)
        ]
        t1 = time.perf_counter()
        prompts = self.fill_images(prompts, crops)
        t2 = time.perf_counter()
        result = self.generate_ids(prompts, params, seeds)
        t3 = time.perf_counter()
        texts_out = self.tokenizer.decode_batch(result.token_ids)
        timings = {"preprocess_s": t1 - t0, "vq_s": t2 - t1, "generate_s": t3 - t2}
        return GenerateOutput(texts_out, result, timings)

    @torch.inference_mode()
    def prompt_logits(self, prompts: Sequence[Sequence[int]]) -> torch.Tensor:
        """Logits at every position of a left-padded batch, (B, T, V), for parity checks."""
        ids, mask = left_pad(prompts, self.tokenizer.pad_id, self.device)
        return self.model(ids, positions_from_mask(mask), causal_padding_mask(mask), last_only=False)
