"""A static, preallocated key/value cache for one batch of left-aligned-at-the-right rows."""

from __future__ import annotations

import torch


class LayerKV:
    """One layer's key and value buffers, each (B, kv_heads, max_len, head_dim).

    A layer gets its own buffers rather than an index into a shared list: a compiled layer then
    sees the same code and arguments at every depth, so one graph serves all layers. Separate
    buffers rather than one stacked tensor, because a compiled step that writes into a slice of a
    stacked buffer has to copy the whole buffer back every layer, which cost more than the step.
    """

    def __init__(self, k: torch.Tensor, v: torch.Tensor):
        self.k, self.v = k, v

    def update(
        self, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_len: int | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k/v (B, H, T, D) at cache columns `positions` (T,), return the first `kv_len` columns."""
        self.k.index_copy_(2, positions, k)
        self.v.index_copy_(2, positions, v)
        end = self.k.shape[2] if kv_len is None else kv_len
        return self.k[:, :, :end], self.v[:, :, :end]


class StaticKVCache:
    """Keys and values of every layer, preallocated for the prompt plus every new token.

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
        self.layers = [
            LayerKV(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
            for _ in range(num_layers)
        ]

    @property
    def max_len(self) -> int:
        return self.layers[0].k.shape[2]

    @property
    def batch_size(self) -> int:
        return self.layers[0].k.shape[0]

    def keep_rows(self, rows: torch.Tensor) -> None:
        for layer in self.layers:
            layer.k, layer.v = layer.k.index_select(0, rows), layer.v.index_select(0, rows)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.layers for t in (layer.k, layer.v))
