"""Model configuration read from a Hugging Face `config.json` (transformers v4 or v5 spelling)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from chameleon_core.errors import CheckpointError

# The original VQGAN yaml names, which `convert_chameleon_weights_to_hf` leaves next to the new ones.
_LEGACY_VQ_KEYS = {
    "ch": "base_channels",
    "n_embed": "num_embeddings",
    "ch_mult": "channel_multiplier",
    "double_z": "double_latent",
    "z_channels": "latent_channels",
}


@dataclass(frozen=True)
class VQConfig:
    embed_dim: int = 256
    num_embeddings: int = 8192
    double_latent: bool = False
    latent_channels: int = 256
    resolution: int = 512
    in_channels: int = 3
    base_channels: int = 128
    channel_multiplier: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = ()
    attn_type: str = "vanilla"

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channel_multiplier) - 1)

    def tokens_per_image(self, image_size: int) -> int:
        side = image_size // self.downsample_factor
        return side * side

    @classmethod
    def from_dict(cls, raw: dict[str, Any] | None) -> VQConfig:
        raw = dict(raw or {})
        for old, new in _LEGACY_VQ_KEYS.items():
            if new not in raw and old in raw:
                raw[new] = raw[old]
        kwargs = {}
        for name in cls.__dataclass_fields__:
            if name in raw and raw[name] is not None:
                value = raw[name]
                if name in ("channel_multiplier", "attn_resolutions"):
                    value = tuple(int(v) for v in value)
                kwargs[name] = value
        cfg = cls(**kwargs)
        bad = [c for c in cfg.level_channels() if c % 32]
        if bad:
            raise CheckpointError(
                f"vq_config: every VQ level needs a channel count divisible by 32 (GroupNorm(32)); got {cfg.level_channels()}"
            )
        return cfg

    def level_channels(self) -> list[int]:
        return [self.base_channels * m for m in self.channel_multiplier]


@dataclass(frozen=True)
class ChameleonConfig:
    vocab_size: int = 65536
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    swin_norm: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    pad_token_id: int | None = None
    vq: VQConfig = field(default_factory=VQConfig)
    # name -> id for the whole vocabulary; large (65k entries) so kept out of repr/eq.
    vocabulary_map: dict[str, int] = field(default_factory=dict, repr=False, compare=False)
    torch_dtype: str | None = None

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config.json") -> ChameleonConfig:
        model_type = raw.get("model_type")
        if model_type != "chameleon":
            raise CheckpointError(
                f"{source}: model_type is {model_type!r}, expected 'chameleon' "
                "(this loader reads Chameleon checkpoints in the Hugging Face layout only)"
            )
        rope_theta, rope_type = _read_rope(raw, source)
        if rope_type not in (None, "default"):
            raise CheckpointError(f"{source}: rope type {rope_type!r} is not supported (Chameleon uses default RoPE)")
        for flag in ("attention_bias", "mlp_bias"):
            if raw.get(flag):
                raise CheckpointError(f"{source}: {flag}=true is not supported (Chameleon has no biases there)")
        act = raw.get("hidden_act", "silu")
        if act != "silu":
            raise CheckpointError(f"{source}: hidden_act {act!r} is not supported (expected 'silu')")
        vocab_map = raw.get("vocabulary_map")
        if not isinstance(vocab_map, dict) or not vocab_map:
            raise CheckpointError(f"{source}: 'vocabulary_map' is missing; it is needed to find the image tokens by name")
        defaults = cls()
        heads = int(raw.get("num_attention_heads", defaults.num_attention_heads))
        kv_heads = raw.get("num_key_value_heads")
        eos = raw.get("eos_token_id", defaults.eos_token_id)
        if isinstance(eos, list):
            eos = eos[0] if eos else None
        cfg = cls(
            vocab_size=int(raw.get("vocab_size", defaults.vocab_size)),
            hidden_size=int(raw.get("hidden_size", defaults.hidden_size)),
            intermediate_size=int(raw.get("intermediate_size", defaults.intermediate_size)),
            num_hidden_layers=int(raw.get("num_hidden_layers", defaults.num_hidden_layers)),
            num_attention_heads=heads,
            num_key_value_heads=int(kv_heads) if kv_heads is not None else heads,
            max_position_embeddings=int(raw.get("max_position_embeddings", defaults.max_position_embeddings)),
            rms_norm_eps=float(raw.get("rms_norm_eps", defaults.rms_norm_eps)),
            rope_theta=rope_theta,
            swin_norm=bool(raw.get("swin_norm") or False),
            bos_token_id=raw.get("bos_token_id", defaults.bos_token_id),
            eos_token_id=eos,
            pad_token_id=raw.get("pad_token_id"),
            vq=VQConfig.from_dict(raw.get("vq_config")),
            vocabulary_map={str(k): int(v) for k, v in vocab_map.items()},
            torch_dtype=raw.get("dtype") or raw.get("torch_dtype"),
        )
        cfg.validate(source)
        return cfg

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> ChameleonConfig:
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise CheckpointError(f"{model_dir}: no config.json (is this a Hugging Face checkpoint folder?)")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{path}: not valid JSON ({exc})") from exc
        return cls.from_dict(raw, source=str(path))

    def validate(self, source: str = "config") -> None:
        if self.hidden_size % self.num_attention_heads:
            raise CheckpointError(
                f"{source}: hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise CheckpointError(
                f"{source}: num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        if self.head_dim % 2:
            raise CheckpointError(f"{source}: head_dim {self.head_dim} must be even for rotary embeddings")
        top = max(self.vocabulary_map.values(), default=-1)
        if top >= self.vocab_size:
            raise CheckpointError(f"{source}: vocabulary_map has id {top} but vocab_size is {self.vocab_size}")

    def to_hf_dict(self) -> dict[str, Any]:
        """The config.json transformers writes for this model (v5 spelling, v4 rope fields kept too)."""
        vq = asdict(self.vq)
        vq["channel_multiplier"] = list(self.vq.channel_multiplier)
        vq["attn_resolutions"] = list(self.vq.attn_resolutions)
        vq.update({"model_type": "chameleon_vqgan", "dropout": 0.0, "initializer_range": 0.02})
        return {
            "architectures": ["ChameleonForConditionalGeneration"],
            "model_type": "chameleon",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "initializer_range": 0.02,
            "rms_norm_eps": self.rms_norm_eps,
            "use_cache": True,
            "pad_token_id": self.pad_token_id,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "tie_word_embeddings": False,
            "rope_theta": self.rope_theta,
            "rope_parameters": {"rope_theta": self.rope_theta, "rope_type": "default"},
            "attention_bias": False,
            "attention_dropout": 0.0,
            "model_parallel_size": 1,
            "swin_norm": self.swin_norm,
            "mlp_bias": False,
            "dtype": self.torch_dtype or "float32",
            "vq_config": vq,
            "vocabulary_map": self.vocabulary_map,
        }

    def num_parameters(self) -> dict[str, int]:
        """Parameter counts of the text decoder parts (used by the cost model and memory reports)."""
        d, f, hd = self.hidden_size, self.intermediate_size, self.head_dim
        q = self.num_attention_heads * hd
        kv = self.num_key_value_heads * hd
        per_layer = d * (q + 2 * kv) + q * d + 3 * d * f + 2 * d + 2 * (q + kv)
        return {
            "embed": self.vocab_size * d,
            "layers": per_layer * self.num_hidden_layers,
            "lm_head": self.vocab_size * d,
        }


def _read_rope(raw: dict[str, Any], source: str) -> tuple[float, str | None]:
    params = raw.get("rope_parameters")
    if isinstance(params, dict) and "rope_theta" in params:
        return float(params["rope_theta"]), params.get("rope_type")
    scaling = raw.get("rope_scaling")
    rope_type = None
    if isinstance(scaling, dict):
        rope_type = scaling.get("rope_type") or scaling.get("type")
    theta = raw.get("rope_theta", 10000.0)
    if not isinstance(theta, (int, float)) or not math.isfinite(theta) or theta <= 0:
        raise CheckpointError(f"{source}: rope_theta {theta!r} is not a positive number")
    return float(theta), rope_type
