"""Write a random-weight Chameleon checkpoint in the exact Hugging Face layout (no transformers needed).

    python -m chameleon_core.random_checkpoint OUT --preset tiny [--seed 0] [--dtype float32]

The folder holds config.json, model.safetensors (or shards + model.safetensors.index.json),
tokenizer.json (a byte-level BPE trained here with `tokenizers`), tokenizer_config.json,
special_tokens_map.json, preprocessor_config.json, processor_config.json and generation_config.json.
Token ids differ from the real checkpoint's on purpose (image codes do not start at 4, for one), so
that anything that finds tokens by id instead of by name fails on these checkpoints.

Weights are N(0, std) with std chosen so logits are well separated: linear layers use
`init_scale / sqrt(fan_in)` (init_scale 1.0 by default), lm_head 4x that (logits of std ~4, far from
ties), embeddings N(0, 1), norm weights 1 + N(0, 0.1)
and norm biases N(0, 0.1), so per-head qk-norm rows differ and a loader that drops them is caught.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from chameleon_core.checkpoint import parse_dtype
from chameleon_core.config import ChameleonConfig, VQConfig
from chameleon_core.tokenizer import image_code_token_name

SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>"]
MARKER_TOKENS = ["<eoss>", "<racm3:break>", "<reserved08706>", "<image>"]


@dataclass(frozen=True)
class Preset:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int | None  # None: exactly what the tokenizer needs
    bpe_merges: int
    image_size: int
    vq: VQConfig
    max_position_embeddings: int = 4096
    swin_norm: bool = False
    shard_bytes: int = 2 * 1024**3


PRESETS: dict[str, Preset] = {
    # Loads and generates in well under a second on 2 CPU cores: 16 image tokens per 32px image.
    "tiny": Preset(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=None, bpe_merges=300, image_size=32, max_position_embeddings=1024,
        vq=VQConfig(embed_dim=16, num_embeddings=64, latent_channels=16, resolution=32, base_channels=32,
                    channel_multiplier=(1, 1, 1, 1), num_res_blocks=1),
    ),
    # The real 65536-token vocabulary and VQ topology at reduced width: 256 image tokens per 256px image.
    "small": Preset(
        hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8,
        vocab_size=65536, bpe_merges=2000, image_size=256,
        vq=VQConfig(embed_dim=64, num_embeddings=8192, latent_channels=64, resolution=256, base_channels=32,
                    channel_multiplier=(1, 1, 2, 2, 4), num_res_blocks=2),
        shard_bytes=128 * 1024**2,
    ),
    # facebook/chameleon-7b dimensions, for GPU benchmarks: 1024 image tokens per 512px image.
    "7b-shape": Preset(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, vocab_size=65536, bpe_merges=2000, image_size=512, vq=VQConfig(),
    ),
}

_CORPUS = """
A photo of a small brown dog running across a green field on a sunny afternoon.
Two people are sitting at a wooden table in a busy cafe, drinking coffee and talking.
The picture shows a red bus parked next to a tall building on a city street.
A close-up of a cat with green eyes lying on a blue blanket near a window.
An astronaut in a white suit floats above the Earth, with the black sky behind.
A bowl of fresh fruit with apples, oranges and bananas on a kitchen counter.
The rocket lifts off from the launch pad, leaving a long trail of smoke and fire.
A grey camera on a tripod stands in front of a row of old houses.
Coins of different sizes are scattered on a dark background.
Describe the image in one sentence. What is in this picture? Answer the question using a single word or phrase.
How many animals are there? What color is the car? Is it raining? Where was this photo taken?
The quick brown fox jumps over the lazy dog. 0 1 2 3 4 5 6 7 8 9 10 100 1,000 yes no
""".strip().splitlines()


def build_tokenizer(preset: Preset, vq: VQConfig) -> Tokenizer:
    """Byte-level BPE trained on a small corpus, plus Chameleon's image and marker tokens."""
    trainer_tok = Tokenizer(models.BPE())
    trainer_tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=len(SPECIAL_TOKENS) + len(alphabet) + preset.bpe_merges,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=alphabet,
        show_progress=False,
    )
    trainer_tok.train_from_iterator(_CORPUS * 4, trainer)
    trained = json.loads(trainer_tok.to_str())["model"]
    vocab: dict[str, int] = dict(sorted(trained["vocab"].items(), key=lambda kv: kv[1]))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in trained["merges"]]

    def add(name: str) -> None:
        if name not in vocab:
            vocab[name] = len(vocab)

    for code in range(vq.num_embeddings):
        add(image_code_token_name(code))
    for name in MARKER_TOKENS:
        add(name)
    if preset.vocab_size is not None:
        filler = 0
        while len(vocab) < preset.vocab_size:
            name = f"<reserved{10000 + filler:05d}>"
            filler += 1
            add(name)
        if len(vocab) > preset.vocab_size:
            raise ValueError(f"vocabulary needs {len(vocab)} entries, more than vocab_size {preset.vocab_size}")

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS + MARKER_TOKENS)
    bos = vocab["<s>"]
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    return tok


def random_weights(config: ChameleonConfig, generator: torch.Generator, init_scale: float = 1.0):
    """Yield (name, tensor) for every tensor of the HF checkpoint layout, in fp32."""
    d, f, hd = config.hidden_size, config.intermediate_size, config.head_dim
    heads, kv = config.num_attention_heads, config.num_key_value_heads

    def normal(*shape, std):
        return torch.randn(*shape, generator=generator) * std

    def linear(out_f, in_f):
        return normal(out_f, in_f, std=init_scale / math.sqrt(in_f))

    def norm_weight(*shape):
        return 1.0 + normal(*shape, std=0.1)

    yield "model.embed_tokens.weight", normal(config.vocab_size, d, std=1.0)
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}"
        yield f"{p}.self_attn.q_proj.weight", linear(heads * hd, d)
        yield f"{p}.self_attn.k_proj.weight", linear(kv * hd, d)
        yield f"{p}.self_attn.v_proj.weight", linear(kv * hd, d)
        yield f"{p}.self_attn.o_proj.weight", linear(d, heads * hd)
        yield f"{p}.self_attn.q_norm.weight", norm_weight(heads, hd)
        yield f"{p}.self_attn.q_norm.bias", normal(heads, hd, std=0.1)
        yield f"{p}.self_attn.k_norm.weight", norm_weight(kv, hd)
        yield f"{p}.self_attn.k_norm.bias", normal(kv, hd, std=0.1)
        yield f"{p}.mlp.gate_proj.weight", linear(f, d)
        yield f"{p}.mlp.up_proj.weight", linear(f, d)
        yield f"{p}.mlp.down_proj.weight", linear(d, f)
        yield f"{p}.input_layernorm.weight", norm_weight(d)
        yield f"{p}.post_attention_layernorm.weight", norm_weight(d)
    yield "model.norm.weight", norm_weight(d)
    # Logits with std ~4 keep greedy choices far from ties, so parity checks on tokens are meaningful.
    yield "lm_head.weight", normal(config.vocab_size, d, std=4 * init_scale / math.sqrt(d))
    yield from random_vq_weights(config.vq, generator)


def random_vq_weights(vq: VQConfig, generator: torch.Generator):
    prefix = "model.vqmodel."

    def conv(name, out_c, in_c, k):
        yield f"{prefix}{name}.weight", torch.randn(out_c, in_c, k, k, generator=generator) / math.sqrt(in_c * k * k)
        yield f"{prefix}{name}.bias", torch.randn(out_c, generator=generator) * 0.02

    def group_norm(name, c):
        yield f"{prefix}{name}.weight", 1.0 + torch.randn(c, generator=generator) * 0.1
        yield f"{prefix}{name}.bias", torch.randn(c, generator=generator) * 0.1

    def resnet(name, in_c, out_c):
        yield from group_norm(f"{name}.norm1", in_c)
        yield from conv(f"{name}.conv1", out_c, in_c, 3)
        yield from group_norm(f"{name}.norm2", out_c)
        yield from conv(f"{name}.conv2", out_c, out_c, 3)
        if in_c != out_c:
            yield from conv(f"{name}.nin_shortcut", out_c, in_c, 1)

    def attn(name, c):
        yield from group_norm(f"{name}.norm", c)
        for part in ("q", "k", "v", "proj_out"):
            yield from conv(f"{name}.{part}", c, c, 1)

    yield from conv("encoder.conv_in", vq.base_channels, vq.in_channels, 3)
    channels, resolution = vq.base_channels, vq.resolution
    for level, mult in enumerate(vq.channel_multiplier):
        out_c = vq.base_channels * mult
        for block in range(vq.num_res_blocks):
            yield from resnet(f"encoder.down.{level}.block.{block}", channels, out_c)
            channels = out_c
            if vq.attn_type == "vanilla" and resolution in vq.attn_resolutions:
                yield from attn(f"encoder.down.{level}.attn.{block}", channels)
        if level != len(vq.channel_multiplier) - 1:
            yield from conv(f"encoder.down.{level}.downsample.conv", channels, channels, 3)
            resolution //= 2
    yield from resnet("encoder.mid.block_1", channels, channels)
    if vq.attn_type == "vanilla":
        yield from attn("encoder.mid.attn_1", channels)
    yield from resnet("encoder.mid.block_2", channels, channels)
    yield from group_norm("encoder.norm_out", channels)
    latent = 2 * vq.latent_channels if vq.double_latent else vq.latent_channels
    yield from conv("encoder.conv_out", latent, channels, 3)
    yield from conv("quant_conv", vq.embed_dim, vq.latent_channels, 1)
    yield from conv("post_quant_conv", vq.latent_channels, vq.embed_dim, 1)
    yield f"{prefix}quantize.embedding.weight", torch.randn(vq.num_embeddings, vq.embed_dim, generator=generator)


def write_safetensors(out: Path, tensors, shard_bytes: int) -> None:
    """Stream tensors into shards of at most `shard_bytes`, with an index when there is more than one."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    sizes = [0]
    paths: list[Path] = []

    def flush() -> None:
        path = out / f"shard-tmp-{len(paths):05d}.safetensors"
        save_file(shards[-1], str(path), metadata={"format": "pt"})
        paths.append(path)

    for name, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and sizes[-1] + nbytes > shard_bytes:
            flush()
            shards.append({})
            sizes.append(0)
        shards[-1][name] = tensor.contiguous()
        sizes[-1] += nbytes
    flush()
    if len(paths) == 1:
        paths[0].rename(out / "model.safetensors")
        return
    weight_map = {}
    for i, (path, shard) in enumerate(zip(paths, shards)):
        final = out / f"model-{i + 1:05d}-of-{len(paths):05d}.safetensors"
        path.rename(final)
        weight_map.update({name: final.name for name in shard})
    index = {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def write_processor_files(out: Path, tokenizer: Tokenizer, image_size: int, image_seq_length: int) -> None:
    special_map = {
        "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>",
        "sep_token": "<reserved08706>",
    }
    (out / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "padding_side": "left",
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 4096,
        "extra_special_tokens": ["<image>", "<racm3:break>", "<eoss>"],
        **special_map,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    image_processor = {
        "image_processor_type": "ChameleonImageProcessor",
        "processor_class": "ChameleonProcessor",
        "do_resize": True, "size": {"shortest_edge": image_size}, "resample": 1,
        "do_center_crop": True, "crop_size": {"height": image_size, "width": image_size},
        "do_rescale": True, "rescale_factor": 0.0078,
        "do_normalize": True, "image_mean": [1.0, 1.0, 1.0], "image_std": [1.0, 1.0, 1.0],
        "do_convert_rgb": True,
    }
    (out / "preprocessor_config.json").write_text(json.dumps(image_processor, indent=2))
    processor = {"processor_class": "ChameleonProcessor", "image_seq_length": image_seq_length, "image_token": "<image>"}
    (out / "processor_config.json").write_text(json.dumps(processor, indent=2))
    tokenizer.save(str(out / "tokenizer.json"))


def write_random_checkpoint(
    out: str | Path,
    preset: str | Preset = "tiny",
    seed: int = 0,
    dtype: str = "float32",
    init_scale: float = 1.0,
    **overrides,
) -> Path:
    """Write a checkpoint folder and return its path. `overrides` replace Preset fields (e.g. swin_norm)."""
    preset = PRESETS[preset] if isinstance(preset, str) else preset
    preset = replace(preset, **overrides) if overrides else preset
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch_dtype = parse_dtype(dtype)
    tokenizer = build_tokenizer(preset, preset.vq)
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    config = ChameleonConfig(
        vocab_size=preset.vocab_size or len(vocab),
        hidden_size=preset.hidden_size,
        intermediate_size=preset.intermediate_size,
        num_hidden_layers=preset.num_hidden_layers,
        num_attention_heads=preset.num_attention_heads,
        num_key_value_heads=preset.num_key_value_heads,
        max_position_embeddings=preset.max_position_embeddings,
        swin_norm=preset.swin_norm,
        bos_token_id=vocab["<s>"],
        eos_token_id=vocab["</s>"],
        pad_token_id=vocab["<pad>"],
        vq=preset.vq,
        vocabulary_map=dict(sorted(vocab.items(), key=lambda kv: kv[1])),
        torch_dtype=str(torch_dtype).removeprefix("torch."),
    )
    config.validate(str(out))
    (out / "config.json").write_text(json.dumps(config.to_hf_dict(), indent=2))
    generation_config = {
        "bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id,
    }
    (out / "generation_config.json").write_text(json.dumps(generation_config, indent=2))
    image_seq_length = preset.vq.tokens_per_image(preset.image_size)
    write_processor_files(out, tokenizer, preset.image_size, image_seq_length)
    generator = torch.Generator().manual_seed(seed)
    tensors = ((name, t.to(torch_dtype)) for name, t in random_weights(config, generator, init_scale))
    write_safetensors(out, tensors, preset.shard_bytes)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="folder to write (created if missing)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    parser.add_argument("--swin-norm", action="store_true", help="use the 30B swin-norm layer layout")
    parser.add_argument("--kv-heads", type=int, default=None, help="override num_key_value_heads (GQA)")
    args = parser.parse_args(argv)
    overrides = {}
    if args.swin_norm:
        overrides["swin_norm"] = True
    if args.kv_heads:
        overrides["num_key_value_heads"] = args.kv_heads
    path = write_random_checkpoint(args.out, args.preset, args.seed, args.dtype, **overrides)
    print(f"wrote {args.preset} checkpoint to {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
