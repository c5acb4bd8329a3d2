"""A static, preallocated key/value cache for one batch of left-aligned-at-the-right rows."""

from __future__ import annotations

import torch


class StaticKVCache:
    """Keys and values of every layer, one (B, kv_heads, max_len, head_dim) buffer per layer and kind.

    Separate buffers rather than one stacked tensor: a compiled decode step that writes into a slice
    of a stacked buffer has to copy the whole buffer back every layer, which cost more than the step.

    Rows of a left-padded batch share write positions (the prompt ends at the same column for every
    row), so a step writes one column for the whole batch. `keep_rows` compacts the batch when rows
    finish, so the long tail of a batch does not pay for finished rows.
    """

    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        num_kv_heads: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ):
        shape = (batch_size, num_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]

    @property
    def batch_size(self) -> int:
        return self.k[0].shape[0]

    def update(
        self,
        layer: int,
        positions: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_len: int | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k/v (B, H, T, D) at cache columns `positions` (T,), return the first `kv_len` columns."""
        k_cache, v_cache = self.k[layer], self.v[layer]
        k_cache.index_copy_(2, positions, k)
        v_cache.index_copy_(2, positions, v)
        end = self.max_len if kv_len is None else kv_len
        return k_cache[:, :, :end], v_cache[:, :, :end]

    def keep_rows(self, rows: torch.Tensor) -> None:
        self.k = [k.index_select(0, rows) for k in self.k]
        self.v = [v.index_select(0, rows) for v in self.v]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)
