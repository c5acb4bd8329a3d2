"""Multimodal prompts: text with `<image>` placeholders -> token ids, images -> VQ tokens spliced in.

A prompt is tokenized once with a single `<image>` id per placeholder, then each placeholder is expanded
in id space to `boi + <image> * image_seq_length + eoi`; after VQ encoding the `<image>` ids are replaced
by the image's BPE ids in order. The result is identical to transformers' string-level expansion because
every one of these markers is an added token that the tokenizer splits out before BPE.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from chameleon_core.config import ChameleonConfig
from chameleon_core.errors import CheckpointError, PromptError
from chameleon_core.image_processor import ImagePreprocessor
from chameleon_core.tokenizer import ChameleonTokenizer, ImageVocabulary

if TYPE_CHECKING:  # building prompts needs no torch (a CPU preprocessing worker never imports it)
    import torch


class ChameleonProcessor:
    def __init__(
        self,
        tokenizer: ChameleonTokenizer,
        image_preprocessor: ImagePreprocessor,
        image_vocabulary: ImageVocabulary,
        image_seq_length: int,
        chat_template: str | None = None,
    ):
        self.tokenizer = tokenizer
        self.image_preprocessor = image_preprocessor
        self.image_vocabulary = image_vocabulary
        self.image_seq_length = image_seq_length
        self.chat_template = chat_template

    @classmethod
    def from_pretrained(
        cls, model_dir: str | Path, config: ChameleonConfig | None = None, **image_limits
    ) -> ChameleonProcessor:
        model_dir = Path(model_dir)
        config = config or ChameleonConfig.from_pretrained(model_dir)
        tokenizer = ChameleonTokenizer.from_pretrained(model_dir)
        preprocessor = ImagePreprocessor.from_pretrained(model_dir, **image_limits)
        vq_tokens = config.vq.tokens_per_image(preprocessor.config.crop_height)
        if preprocessor.config.crop_height != preprocessor.config.crop_width:
            raise CheckpointError(f"{model_dir}: the VQ-VAE needs square crops, got {preprocessor.output_size}")
        seq_len = _read_image_seq_length(model_dir, default=vq_tokens)
        if seq_len != vq_tokens:
            raise CheckpointError(
                f"{model_dir}: image_seq_length {seq_len} does not match the VQ grid "
                f"({vq_tokens} tokens for {preprocessor.config.crop_height}px crops)"
            )
        vocab = ImageVocabulary(config.vocabulary_map, config.vq.num_embeddings)
        return cls(tokenizer, preprocessor, vocab, seq_len, _read_chat_template(model_dir))

    # -- text -------------------------------------------------------------------------------------

    def prompt_ids(self, text: str, num_images: int, text_completion: bool = False, name: str = "prompt") -> list[int]:
        """Token ids with each `<image>` expanded to boi + placeholders + eoi (placeholders filled later).

        Unless `text_completion`, the separator token is appended (Chameleon's chat mode), as
        transformers' processor does. BOS comes from the tokenizer's post-processor.
        """
        tok = self.tokenizer
        if not text_completion:
            text = text + tok.special.sep
        ids = tok.encode(text)
        found = ids.count(tok.image_id)
        if found != num_images:
            raise PromptError(
                f"{name}: has {found} {tok.special.image} placeholder(s) but {num_images} image(s) were given"
            )
        if not found:
            return ids
        expanded: list[int] = []
        image_block = [tok.boi_id] + [tok.image_id] * self.image_seq_length + [tok.eoi_id]
        for token in ids:
            if token == tok.image_id:
                expanded.extend(image_block)
            else:
                expanded.append(token)
        return expanded

    def fill_image_tokens(self, ids: torch.Tensor, image_tokens: torch.Tensor) -> torch.Tensor:
        """Replace the `<image>` placeholders of `ids` (any shape) with image BPE ids (N, seq), in order."""
        slots = ids == self.tokenizer.image_id
        if int(slots.sum()) != image_tokens.numel():
            raise PromptError(
                f"{int(slots.sum())} image placeholder tokens but {image_tokens.numel()} image tokens"
            )
        out = ids.clone()
        out[slots] = image_tokens.reshape(-1).to(out.dtype)
        return out

    # -- images -----------------------------------------------------------------------------------

    def image_tokens(self, vqmodel: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
        """BPE ids (N, image_seq_length) of N preprocessed images, VQ-encoded on the VQ's device."""
        codes = vqmodel.encode(pixels)
        return self.image_vocabulary.codes_to_tokens(codes)

    # -- chat -------------------------------------------------------------------------------------

    def apply_chat_template(self, conversation: Sequence[dict[str, Any]]) -> tuple[str, int]:
        """A prompt string and its image count for a chat conversation.

        `conversation` is `[{"role": ..., "content": [{"type": "image"}, {"type": "text", "text": ...}]}]`.
        A template shipped with the checkpoint (chat_template.json/.jinja or tokenizer_config.json) is used
        when present. Otherwise each message's parts are written in order (`<image>` for an image) and an
        assistant turn is closed with the separator token, Chameleon's end-of-turn marker.
        """
        messages = [_normalise_message(i, m) for i, m in enumerate(conversation)]
        num_images = sum(1 for m in messages for part in m["content"] if part["type"] == "image")
        if self.chat_template:
            return _render_template(self.chat_template, messages, self.tokenizer), num_images
        pieces = []
        image = self.tokenizer.special.image
        for message in messages:
            text = "".join(image if part["type"] == "image" else part["text"] for part in message["content"])
            if message["role"] == "assistant":
                text += self.tokenizer.special.sep
            pieces.append(text)
        return "".join(pieces), num_images


def _normalise_message(index: int, message: dict[str, Any]) -> dict[str, Any]:
    if not isinstance(message, dict) or "role" not in message:
        raise PromptError(f"conversation[{index}]: each message needs a 'role' and 'content'")
    content = message.get("content", [])
    if isinstance(content, str):
        content = [{"type": "text", "text": content}]
    parts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "image":
            parts.append({"type": "image"})
        elif kind == "text":
            parts.append({"type": "text", "text": str(part.get("text", ""))})
        else:
            raise PromptError(f"conversation[{index}].content[{j}]: type must be 'image' or 'text', got {kind!r}")
    return {"role": str(message["role"]), "content": parts}


def _render_template(template: str, messages: list[dict[str, Any]], tokenizer: ChameleonTokenizer) -> str:
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(template).render(
        messages=messages,
        add_generation_prompt=False,
        bos_token="",  # BOS is added by the tokenizer's post-processor
        eos_token=tokenizer.special.eos,
        sep_token=tokenizer.special.sep,
    )


def _read_image_seq_length(model_dir: Path, default: int) -> int:
    path = model_dir / "processor_config.json"
    if path.is_file():
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{path}: not valid JSON ({exc})") from exc
        if "image_seq_length" in raw:
            return int(raw["image_seq_length"])
    return default


def _read_chat_template(model_dir: Path) -> str | None:
    jinja = model_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    for filename in ("chat_template.json", "processor_config.json", "tokenizer_config.json"):
        path = model_dir / filename
        if path.is_file():
            try:
                template = json.loads(path.read_text()).get("chat_template")
            except json.JSONDecodeError:
                continue
            if isinstance(template, str) and template:
                return template
    return None
