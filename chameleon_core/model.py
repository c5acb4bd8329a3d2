"""Chameleon's early-fusion decoder: RMSNorm, qk-LayerNorm, rotate-half RoPE, SiLU MLP, GQA, swin-norm.

Module and parameter names mirror the Hugging Face checkpoint (`model.layers.0.self_attn.q_proj.weight`, ...)
so loading is a name-for-name copy. Tensor parallelism is not written here: `chameleon_core.tp` shards an
ordinary model after it is built.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from chameleon_core.config import ChameleonConfig
from chameleon_core.kv_cache import LayerKV, StaticKVCache
from chameleon_core.packed_linear import Linear
from chameleon_core.vqvae import VQVAE


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Statistics in fp32, cast back to the activation dtype *before* the weight, as the reference does.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class QKLayerNorm(nn.Module):
    """LayerNorm over head_dim with a separate affine per head: weight/bias have shape (heads, head_dim).

    The per-head rows come from the original model-parallel shards, each of which normalised its own heads.
    """

    def __init__(self, num_heads: int, head_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_heads, head_dim))
        self.bias = nn.Parameter(torch.zeros(num_heads, head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (..., heads, head_dim)
        # eps is fixed at 1e-5 in every reference implementation, independent of rms_norm_eps.
        x = F.layer_norm(x, (x.shape[-1],), None, None, eps=1e-5)
        return x * self.weight + self.bias


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        # Built on the CPU explicitly: models are constructed under a meta-device context before loading.
        exponents = torch.arange(0, head_dim, 2, dtype=torch.float, device="cpu") / head_dim
        inv_freq = 1.0 / (theta**exponents)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin of shape (B, T, head_dim), computed in fp32 and cast to the activation dtype."""
        freqs = positions[..., None].float() * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


class Attention(nn.Module):
    def __init__(self, config: ChameleonConfig):
        super().__init__()
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        d = config.hidden_size
        self.q_proj = Linear(d, self.num_heads * self.head_dim)
        self.k_proj = Linear(d, self.num_kv_heads * self.head_dim)
        self.v_proj = Linear(d, self.num_kv_heads * self.head_dim)
        self.o_proj = Linear(self.num_heads * self.head_dim, d)
        self.q_norm = QKLayerNorm(self.num_heads, self.head_dim)
        self.k_norm = QKLayerNorm(self.num_kv_heads, self.head_dim)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        layer_kv: LayerKV | None,
        cache_positions: torch.Tensor | None,
        kv_len: int | None,
        last_query_only: bool = False,
    ) -> torch.Tensor:
        """Attention output (B, Tq, D): Tq = T, or 1 with `last_query_only` (keys and values still cover T)."""
        B, T, _ = x.shape
        # With `last_query_only` the other positions' queries are never computed; their keys and values are.
        q = self.q_proj(x[:, -1:] if last_query_only else x)
        k, v = self.k_proj(x), self.v_proj(x)
        Tq = q.shape[1]
        # Head counts come from the weights so that a tensor-parallel shard needs no extra bookkeeping.
        q = self.q_norm(q.view(B, Tq, -1, self.head_dim)).transpose(1, 2)
        k = self.k_norm(k.view(B, T, -1, self.head_dim)).transpose(1, 2)
        v = v.view(B, T, -1, self.head_dim).transpose(1, 2)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        q = q * cos[:, :, T - Tq :] + rotate_half(q) * sin[:, :, T - Tq :]
        k = k * cos + rotate_half(k) * sin
        if layer_kv is not None:
            k, v = layer_kv.update(cache_positions, k, v, kv_len)
        n_rep = q.shape[1] // k.shape[1]
        if n_rep > 1:
            k = k.repeat_interleave(n_rep, dim=1)
            v = v.repeat_interleave(n_rep, dim=1)
        if Tq == 1:  # a decode step, or the last position of a prompt: its mask row is the last one
            out = single_query_attention(q, k, v, None if mask is None else mask[:, :, -1:])
        elif mask is None:  # no padding anywhere in the batch: the fused causal kernel, no mask tensor
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(out.transpose(1, 2).reshape(B, Tq, -1))


def single_query_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor:
    """Attention of one query per row (a decode step, or a prompt's last position): two small batched
    matmuls. `mask` (B, 1, 1, S) says which keys each row may attend; None means all of them.

    The CPU flash-attention kernel behind SDPA spends about a millisecond per call on a single query
    (it tiles for long queries), which made attention a fifth of a decode step; plain matmuls with a
    float32 softmax take a few microseconds and agree with SDPA to rounding.
    """
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * (q.shape[-1] ** -0.5)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(scores.softmax(dim=-1).to(v.dtype), v)


class MLP(nn.Module):
    def __init__(self, config: ChameleonConfig):
        super().__init__()
        self.gate_proj = Linear(config.hidden_size, config.intermediate_size)
        self.up_proj = Linear(config.hidden_size, config.intermediate_size)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: ChameleonConfig):
        super().__init__()
        self.swin_norm = config.swin_norm
        self.self_attn = Attention(config)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos, sin, mask, layer_kv, cache_positions, kv_len, last_only: bool = False) -> torch.Tensor:
        """(B, T, D), or (B, 1, D) for the last position only while keys and values cover all T."""
        attend = (cos, sin, mask, layer_kv, cache_positions, kv_len, last_only)
        residual = x[:, -1:] if last_only else x
        if self.swin_norm:
            # 30B layout: the norms wrap the sublayer outputs instead of their inputs.
            h = residual + self.input_layernorm(self.self_attn(x, *attend))
            return h + self.post_attention_layernorm(self.mlp(h))
        h = residual + self.self_attn(self.input_layernorm(x), *attend)
        return h + self.mlp(self.post_attention_layernorm(h))


class ChameleonModel(nn.Module):
    def __init__(self, config: ChameleonConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.vqmodel = VQVAE(config.vq)
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_theta)


class ChameleonForCausalLM(nn.Module):
    """Decoder + untied lm_head. `forward` returns logits only for the positions asked for."""

    def __init__(self, config: ChameleonConfig, image_token_ids: torch.Tensor):
        super().__init__()
        self.config = config
        self.model = ChameleonModel(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size)
        self.register_buffer("image_token_ids", image_token_ids.clone(), persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor | None,
        kv_cache: StaticKVCache | None = None,
        cache_positions: torch.Tensor | None = None,
        kv_len: int | None = None,
        last_only: bool = True,
    ) -> torch.Tensor:
        """Logits (B, V) at the last position (`last_only`) or (B, T, V) at every position.

        `mask` is a boolean (B, 1, T, kv_len) "may attend" mask, or None for plain causal attention over
        a prompt without padding. With a cache, the new keys/values are
        written at `cache_positions` and attention runs over the first `kv_len` cache slots.
        """
        x = self.model.embed_tokens(input_ids)
        cos, sin = self.model.rotary(positions, x.dtype)
        last = len(self.model.layers) - 1
        for i, layer in enumerate(self.model.layers):
            layer_kv = kv_cache.layers[i] if kv_cache is not None else None
            # Only the last position's output of the last layer is read: its queries, attention and MLP
            # run for that position alone (a prefill then does about 1/num_layers less work).
            trim = last_only and i == last and x.shape[1] > 1
            x = layer(x, cos, sin, mask, layer_kv, cache_positions, kv_len, trim)
        if last_only:
            x = x[:, -1]
        return self.compute_logits(self.model.norm(x))

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden)
        # Text generation never emits VQ codes: ban every IMGIMG id, in the logits dtype, like the reference.
        return logits.index_fill_(-1, self.image_token_ids, torch.finfo(logits.dtype).min)


def causal_padding_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, T) "may attend" mask for a left-padded prompt: causal, never onto padding.

    A padding query attends to itself only, so its (unused) output stays finite.
    """
    T = attention_mask.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=attention_mask.device).tril()
    allowed = causal[None] & attention_mask[:, None, :].bool()
    allowed |= torch.eye(T, dtype=torch.bool, device=attention_mask.device)[None]
    return allowed[:, None]


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that skip left padding (padding positions get 0), as transformers' generate makes them."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 0)
