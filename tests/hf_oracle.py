"""Checkpoints saved by transformers itself, and transformers-side reference computations (test-only).

The weights are random but not transformers' default init: every tensor is drawn by the same
generator as `chameleon_core.random_checkpoint` (linear std 1/sqrt(fan_in), lm_head 4/sqrt(hidden),
embeddings std 1, norm weights 1 + N(0, 0.1), norm biases N(0, 0.1)), so logits are spread over
several units, greedy choices are far from ties, and per-head qk-norm rows all differ.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    ChameleonConfig as HFChameleonConfig,
)
from transformers import (
    ChameleonForConditionalGeneration,
    ChameleonProcessor,
    PreTrainedTokenizerFast,
)
from transformers.models.chameleon.image_processing_pil_chameleon import ChameleonImageProcessorPil

from chameleon_core.config import ChameleonConfig, VQConfig
from chameleon_core.random_checkpoint import Preset, build_tokenizer, random_weights

# A VQ with the real topology (5 levels, nin shortcuts where channels change, mid attention) plus
# down-level attention at 16px, on 64px crops: a 4x4 grid of 16 tokens.
HF_VQ = VQConfig(
    embed_dim=32, num_embeddings=512, latent_channels=32, resolution=64, base_channels=32,
    channel_multiplier=(1, 1, 2, 2, 4), num_res_blocks=2, attn_resolutions=(16,),
)
HF_IMAGE_SIZE = 64


def save_hf_checkpoint(
    out: Path,
    num_key_value_heads: int = 4,
    swin_norm: bool = False,
    seed: int = 0,
    max_shard_size: str = "300KB",
) -> Path:
    """A random Chameleon saved with transformers' save_pretrained (sharded safetensors + index)."""
    preset = Preset(
        hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=num_key_value_heads, vocab_size=None, bpe_merges=250, image_size=HF_IMAGE_SIZE,
        vq=HF_VQ, swin_norm=swin_norm,
    )
    tokenizer = build_tokenizer(preset, HF_VQ)
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    vq = {
        "embed_dim": HF_VQ.embed_dim, "num_embeddings": HF_VQ.num_embeddings,
        "latent_channels": HF_VQ.latent_channels, "resolution": HF_VQ.resolution,
        "base_channels": HF_VQ.base_channels, "channel_multiplier": list(HF_VQ.channel_multiplier),
        "num_res_blocks": HF_VQ.num_res_blocks, "attn_resolutions": list(HF_VQ.attn_resolutions),
    }
    hf_config = HFChameleonConfig(
        vocab_size=len(vocab), hidden_size=preset.hidden_size, intermediate_size=preset.intermediate_size,
        num_hidden_layers=preset.num_hidden_layers, num_attention_heads=preset.num_attention_heads,
        num_key_value_heads=num_key_value_heads, max_position_embeddings=512, swin_norm=swin_norm,
        bos_token_id=vocab["<s>"], eos_token_id=vocab["</s>"], pad_token_id=vocab["<pad>"],
        vq_config=vq, vocabulary_map=vocab,
    )
    model = ChameleonForConditionalGeneration(hf_config).eval()
    ours = ChameleonConfig.from_dict(hf_config.to_dict())
    generator = torch.Generator().manual_seed(seed)
    state = dict(random_weights(ours, generator))
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    model.save_pretrained(out, max_shard_size=max_shard_size)

    hf_tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        sep_token="<reserved08706>", padding_side="left",
    )
    image_processor = ChameleonImageProcessorPil(
        size={"shortest_edge": HF_IMAGE_SIZE}, crop_size={"height": HF_IMAGE_SIZE, "width": HF_IMAGE_SIZE}
    )
    processor = ChameleonProcessor(
        image_processor=image_processor, tokenizer=hf_tokenizer,
        image_seq_length=HF_VQ.tokens_per_image(HF_IMAGE_SIZE),
    )
    processor.save_pretrained(out)
    return out


def load_hf(model_dir: Path):
    """transformers' model (fp32, sdpa) and processor (PIL backend, left padding) for a checkpoint folder."""
    model = ChameleonForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    processor = ChameleonProcessor.from_pretrained(model_dir)
    processor.tokenizer.padding_side = "left"
    return model, processor


@torch.inference_mode()
def hf_prompt_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values=None):
    """Full-sequence logits with the position ids generate() would use on a left-padded batch."""
    positions = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                pixel_values=pixel_values)
    return out.logits


@torch.inference_mode()
def hf_greedy(model, inputs: dict, max_new_tokens: int):
    """New tokens and per-step logits from transformers' generate (greedy)."""
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, output_logits=True,
                         return_dict_in_generate=True)
    new = out.sequences[:, inputs["input_ids"].shape[1]:]
    return new, torch.stack(out.logits, dim=1)
