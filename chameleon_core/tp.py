"""Tensor parallelism as one sharding step applied to an ordinary model built on the meta device.

Per decoder layer (Megatron layout, all-reduce of whole (B, T, D) outputs so every row of a batch is
reduced with its own partial sums):
  - q_proj, k_proj, v_proj, gate_proj, up_proj: column-parallel (output rows split by head / by unit);
  - o_proj, down_proj: row-parallel (input columns split) followed by an all-reduce;
  - q_norm/k_norm: their (heads, head_dim) rows follow the heads they normalise;
  - kv heads are split when tp divides them, otherwise each rank keeps the one kv head its query
    heads use (with that head's k_norm row).
Embedding and lm_head are vocab-parallel: each rank holds 1/tp of the vocabulary rows; embedding
lookups are all-reduced and logits all-gathered. Together they are 2*V*D parameters (0.54B of 7B)
that would otherwise be replicated and break the 1/tp memory budget. RMSNorms are replicated.
The VQ-VAE is replicated: every rank encodes the (same) images itself, which needs no communication,
gives bit-identical codes to tp=1, and costs about 4% of a prefill.

The function returns, for every sharded parameter, the slice of the checkpoint tensor the rank must
read, so the loader reads nothing else.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from chameleon_core.checkpoint import Shard
from chameleon_core.distributed import TPGroup
from chameleon_core.errors import TensorParallelError
from chameleon_core.model import ChameleonForCausalLM
from chameleon_core.packed_linear import Linear


class VocabParallelEmbedding(nn.Module):
    def __init__(self, start: int, length: int, dim: int, tp: TPGroup):
        super().__init__()
        self.start, self.length, self.tp = start, length, tp
        self.weight = nn.Parameter(torch.empty(length, dim, device="meta"))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.start
        outside = (local < 0) | (local >= self.length)
        out = F.embedding(local.clamp(0, self.length - 1), self.weight)
        # Exactly one rank contributes a non-zero row per token, so the sum is exact.
        return self.tp.all_reduce(out.masked_fill(outside[..., None], 0))


class VocabParallelLMHead(Linear):
    def __init__(self, chunk: int, length: int, dim: int, vocab_size: int, tp: TPGroup):
        with torch.device("meta"):
            super().__init__(dim, length)
        self.chunk, self.length, self.vocab_size, self.tp = chunk, length, vocab_size, tp

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = super().forward(hidden)
        if self.length < self.chunk:  # the last rank's slice is short when tp does not divide the vocab
            logits = F.pad(logits, (0, self.chunk - self.length))
        return self.tp.all_gather_last_dim(logits)[..., : self.vocab_size]


def _even_split(total: int, rank: int, world: int, what: str) -> tuple[int, int]:
    if total % world:
        raise TensorParallelError(f"{what} ({total}) is not divisible by the tensor-parallel size {world}")
    size = total // world
    return rank * size, size


def _set_meta_weight(module: nn.Module, name: str, shape: tuple[int, ...]) -> None:
    module._parameters[name] = nn.Parameter(torch.empty(shape, device="meta"), requires_grad=False)


def apply_tensor_parallel(model: ChameleonForCausalLM, tp: TPGroup) -> dict[str, Shard]:
    """Shard `model` (on the meta device) for rank `tp.rank`; return what each rank must read."""
    cfg = model.config
    rank, world = tp.rank, tp.world_size
    hd, d = cfg.head_dim, cfg.hidden_size
    q_start, q_heads = _even_split(cfg.num_attention_heads, rank, world, "num_attention_heads")
    f_start, f_len = _even_split(cfg.intermediate_size, rank, world, "intermediate_size")
    kv = cfg.num_key_value_heads
    if kv % world == 0:
        kv_start, kv_heads = rank * (kv // world), kv // world
    elif world % kv == 0:
        kv_start, kv_heads = rank * kv // world, 1  # replicated: the kv head this rank's query heads use
    else:
        raise TensorParallelError(
            f"num_key_value_heads ({kv}) and the tensor-parallel size {world} must divide one another"
        )
    tp.check_agreement(
        [world, cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, kv, cfg.vocab_size],
        "tensor-parallel size and model shape (were all ranks given the same checkpoint?)",
    )

    shards: dict[str, Shard] = {}

    def shard(module: nn.Module, prefix: str, pname: str, dim: int, start: int, length: int) -> None:
        param = module._parameters[pname]
        full = param.shape[dim]
        shape = list(param.shape)
        shape[dim] = length
        _set_meta_weight(module, pname, tuple(shape))
        shards[f"{prefix}.{pname}"] = Shard(dim, start, length, full)

    for i, layer in enumerate(model.model.layers):
        p = f"model.layers.{i}"
        attn, mlp = layer.self_attn, layer.mlp
        shard(attn.q_proj, f"{p}.self_attn.q_proj", "weight", 0, q_start * hd, q_heads * hd)
        shard(attn.k_proj, f"{p}.self_attn.k_proj", "weight", 0, kv_start * hd, kv_heads * hd)
        shard(attn.v_proj, f"{p}.self_attn.v_proj", "weight", 0, kv_start * hd, kv_heads * hd)
        shard(attn.o_proj, f"{p}.self_attn.o_proj", "weight", 1, q_start * hd, q_heads * hd)
        for pname in ("weight", "bias"):
            shard(attn.q_norm, f"{p}.self_attn.q_norm", pname, 0, q_start, q_heads)
            shard(attn.k_norm, f"{p}.self_attn.k_norm", pname, 0, kv_start, kv_heads)
        shard(mlp.gate_proj, f"{p}.mlp.gate_proj", "weight", 0, f_start, f_len)
        shard(mlp.up_proj, f"{p}.mlp.up_proj", "weight", 0, f_start, f_len)
        shard(mlp.down_proj, f"{p}.mlp.down_proj", "weight", 1, f_start, f_len)
        attn.o_proj.register_forward_hook(lambda _m, _i, out: tp.all_reduce(out))
        mlp.down_proj.register_forward_hook(lambda _m, _i, out: tp.all_reduce(out))

    chunk = -(-cfg.vocab_size // world)
    v_start = min(rank * chunk, cfg.vocab_size)
    v_len = min(chunk, cfg.vocab_size - v_start)
    if v_len <= 0:
        raise TensorParallelError(f"vocab_size {cfg.vocab_size} is too small for tensor-parallel size {world}")
    model.model.embed_tokens = VocabParallelEmbedding(v_start, v_len, d, tp)
    model.lm_head = VocabParallelLMHead(chunk, v_len, d, cfg.vocab_size, tp)
    shards["model.embed_tokens.weight"] = Shard(0, v_start, v_len, cfg.vocab_size)
    shards["lm_head.weight"] = Shard(0, v_start, v_len, cfg.vocab_size)
    return shards
