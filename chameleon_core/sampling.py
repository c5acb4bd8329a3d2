"""Token selection: greedy, or temperature/top-k/top-p sampling with counter-based per-row randomness.

Sampling uses the Gumbel-max trick with noise that is a pure function of (row seed, step, token id).
A row's sample therefore depends only on its own seed, never on which batch or which position in a
batch it lands in, and every tensor-parallel rank draws the same noise without exchanging anything.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch

_MASK32 = 0xFFFFFFFF


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 32
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    seed: int = 0
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def row_seed(seed: int, key: str | bytes) -> int:
    """A 63-bit seed for one row from the job seed and a stable row key (its id, or its prompt)."""
    data = key if isinstance(key, bytes) else key.encode()
    digest = hashlib.blake2b(data, digest_size=8, key=int(seed).to_bytes(8, "little", signed=True)).digest()
    return int.from_bytes(digest, "little") >> 1


def _mix32(x: torch.Tensor) -> torch.Tensor:
    # A 32-bit integer hash in int64 arithmetic; multipliers stay below 2**31 so products never overflow.
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x31848BAB) & _MASK32
    return x ^ (x >> 16)


def uniform_noise(seeds: torch.Tensor, step: int, vocab_size: int) -> torch.Tensor:
    """(B, V) uniforms in (0, 1), a deterministic function of (seed, step, token id)."""
    row = _mix32(_mix32(seeds) ^ (seeds >> 32))
    row = _mix32(row ^ _mix32(torch.full_like(seeds, step) + 0x3C6EF372))
    tokens = (torch.arange(vocab_size, device=seeds.device, dtype=torch.int64) * 0x61C88647) & _MASK32
    bits = _mix32(_mix32(row[:, None] ^ tokens) + 0x5BD1E995)
    return ((bits >> 8).to(torch.float32) + 0.5) / float(1 << 24)


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set logits outside the top-k / nucleus-p set to -inf (always keeping the best token)."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the mass before it already reaches top_p.
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def select_tokens(logits: torch.Tensor, params: SamplingParams, seeds: torch.Tensor | None, step: int) -> torch.Tensor:
    """Next token per row from (B, V) logits."""
    if params.greedy:
        # argmax over bfloat16 runs a slow generic kernel on the CPU (~5x the upcast + fp32 argmax);
        # the upcast is exact, so the chosen token (first maximum) is the same.
        return logits.float().argmax(dim=-1)
    scores = filter_logits(logits.float() / params.temperature, params.top_k, params.top_p)
    gumbel = -torch.log(-torch.log(uniform_noise(seeds, step, scores.shape[-1])))
    return (scores + gumbel).argmax(dim=-1)
