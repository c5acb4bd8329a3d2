"""Text tokenizer (byte-level BPE from tokenizer.json) and the image-code <-> token-id vocabulary."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

from tokenizers import Tokenizer

from chameleon_core.errors import CheckpointError

if TYPE_CHECKING:  # tokenizing needs no torch; only the id tables below are tensors, built on first use
    import torch

IMAGE_CODE_PREFIX = "IMGIMG"
_CODE_LETTERS = {chr(ord("A") + i): str(i) for i in range(10)}


def image_code_token_name(code: int) -> str:
    """The vocabulary name of VQ code `code`, spelled as the real Chameleon vocabulary spells it."""
    return IMAGE_CODE_PREFIX + "".join(chr(ord("A") + int(c)) for c in str(code)) + "Z"


def image_code_of_name(name: str) -> int:
    # The last character is a terminator, the rest are digits written as the letters A..J.
    return int("".join(_CODE_LETTERS.get(c, c) for c in name[len(IMAGE_CODE_PREFIX) : -1]))


@dataclass(frozen=True)
class SpecialTokens:
    bos: str = "<s>"
    eos: str = "</s>"
    pad: str = "<pad>"
    unk: str = "<unk>"
    sep: str = "<reserved08706>"
    image: str = "<image>"
    boi: str = "<racm3:break>"
    eoi: str = "<eoss>"


class ImageVocabulary:
    """Maps VQ codebook indices to the BPE ids of the `IMGIMG...` tokens, built from names, never offsets."""

    def __init__(self, vocabulary_map: dict[str, int], num_embeddings: int):
        code_to_id: dict[int, int] = {}
        for name, token_id in vocabulary_map.items():
            if name.startswith(IMAGE_CODE_PREFIX):
                code_to_id[image_code_of_name(name)] = token_id
        missing = [c for c in range(num_embeddings) if c not in code_to_id]
        if missing:
            raise CheckpointError(
                f"vocabulary_map has no {IMAGE_CODE_PREFIX} token for VQ code(s) {missing[:5]}"
                f"{'...' if len(missing) > 5 else ''} (codebook size {num_embeddings}); "
                f"expected e.g. {image_code_token_name(missing[0])!r}"
            )
        self._code_to_id = code_to_id
        self.num_embeddings = num_embeddings

    # The tables are built on first use, always on the CPU: load_model first reads them while the model
    # is being built under `torch.device("meta")`.
    @cached_property
    def code_to_token(self) -> torch.Tensor:
        import torch

        codes = [self._code_to_id[c] for c in range(self.num_embeddings)]
        return torch.tensor(codes, dtype=torch.long, device="cpu")

    @cached_property
    def token_ids(self) -> torch.Tensor:
        """Every IMGIMG id, also ones beyond the codebook: all of them are banned during text generation."""
        import torch

        return torch.tensor(sorted(self._code_to_id.values()), dtype=torch.long, device="cpu")

    def codes_to_tokens(self, codes: torch.Tensor) -> torch.Tensor:
        table = self.code_to_token.to(codes.device)
        return table[codes]


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from exc


def _token_content(value) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


def read_special_tokens(model_dir: Path) -> SpecialTokens:
    """Special token names from the small json files `save_pretrained` writes, defaulting to Chameleon's."""
    names: dict[str, str] = {}
    for filename in ("special_tokens_map.json", "tokenizer_config.json"):
        raw = _read_json(model_dir / filename)
        for key in ("bos", "eos", "pad", "unk", "sep"):
            content = _token_content(raw.get(f"{key}_token"))
            if content and key not in names:
                names[key] = content
    for filename in ("processor_config.json", "tokenizer_config.json"):
        raw = _read_json(model_dir / filename)
        for key, field_name in (("image", "image_token"), ("boi", "boi_token"), ("eoi", "eoi_token")):
            content = _token_content(raw.get(field_name))
            if content and key not in names:
                names[key] = content
    return SpecialTokens(**names)


class ChameleonTokenizer:
    """Byte-level BPE text tokenizer plus Chameleon's special and image tokens, all looked up by name."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        special: SpecialTokens,
        clean_up_tokenization_spaces: bool = False,
    ):
        self.tokenizer = tokenizer
        self.special = special
        self.clean_up_tokenization_spaces = clean_up_tokenization_spaces
        self.bos_id = self._required_id(special.bos)
        self.eos_id = self._required_id(special.eos)
        self.pad_id = self._required_id(special.pad)
        self.sep_id = self._required_id(special.sep)
        self.image_id = self._required_id(special.image)
        self.boi_id = self._required_id(special.boi)
        self.eoi_id = self._required_id(special.eoi)
        # Placeholders are expanded in id space, so `<image>` must always encode to its single id.
        probe = tokenizer.encode(special.image, add_special_tokens=False).ids
        if probe != [self.image_id]:
            raise CheckpointError(
                f"tokenizer.json: {special.image!r} is not an added token (encodes to {probe}); "
                "image placeholders could not be found in prompts"
            )

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> ChameleonTokenizer:
        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        if not path.is_file():
            raise CheckpointError(f"{model_dir}: no tokenizer.json")
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a bare Exception on malformed files
            raise CheckpointError(f"{path}: cannot be read by `tokenizers` ({exc})") from exc
        config = _read_json(model_dir / "tokenizer_config.json")
        return cls(tokenizer, read_special_tokens(model_dir), bool(config.get("clean_up_tokenization_spaces", False)))

    def _required_id(self, name: str) -> int:
        token_id = self.tokenizer.token_to_id(name)
        if token_id is None:
            raise CheckpointError(f"tokenizer.json has no token {name!r}")
        return token_id

    def token_id(self, name: str) -> int:
        return self._required_id(name)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; with special tokens, tokenizer.json's post-processor adds BOS as transformers does."""
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        return [enc.ids for enc in self.tokenizer.encode_batch(texts, add_special_tokens=add_special_tokens)]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        text = self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)
        if self.clean_up_tokenization_spaces:
            text = clean_up_tokenization(text)
        return text

    def decode_batch(self, batch: list[list[int]], skip_special_tokens: bool = True) -> list[str]:
        texts = self.tokenizer.decode_batch([list(ids) for ids in batch], skip_special_tokens=skip_special_tokens)
        if self.clean_up_tokenization_spaces:
            texts = [clean_up_tokenization(t) for t in texts]
        return texts


def clean_up_tokenization(text: str) -> str:
    # The English-punctuation clean-up transformers applies when clean_up_tokenization_spaces is set.
    for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                          (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(before, after)
    return text
