"""How much work a forward pass does, so benchmarks can say how close to the hardware they run.

Prefill is compute-bound: what matters is FLOPs per token against the device's peak (MFU). Decode at
batch sizes that fit a GPU is bandwidth-bound: every step reads all weights once plus each row's KV
cache, so bytes per step against the memory bandwidth (MBU) is the figure of merit.
"""

from __future__ import annotations

from dataclasses import dataclass

from chameleon_core.config import ChameleonConfig

# Dense bf16 tensor-core peak (FLOP/s) and memory bandwidth (B/s) from the vendors' data sheets.
DEVICE_PEAKS: dict[str, tuple[float, float]] = {
    "H200": (989e12, 4.8e12),
    "H100": (989e12, 3.35e12),
    "A100": (312e12, 2.0e12),
}


def device_peaks(device_name: str) -> tuple[float, float] | None:
    for key, peaks in DEVICE_PEAKS.items():
        if key in device_name.upper():
            return peaks
    return None


@dataclass(frozen=True)
class CostModel:
    config: ChameleonConfig
    tp: int = 1

    @property
    def layer_params(self) -> int:
        c = self.config
        attn = c.hidden_size * c.head_dim * (2 * c.num_attention_heads + 2 * c.num_key_value_heads)
        mlp = 3 * c.hidden_size * c.intermediate_size
        return c.num_hidden_layers * (attn + mlp) // self.tp

    @property
    def lm_head_params(self) -> int:
        return self.config.vocab_size * self.config.hidden_size // self.tp

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        c = self.config
        return 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * dtype_bytes // self.tp

    def prefill_flops(self, prompt_lengths: list[int]) -> float:
        """Matmul FLOPs of one prefill: weights per token, causal attention, lm_head on the last token only."""
        c = self.config
        tokens = sum(prompt_lengths)
        weights = 2 * self.layer_params * tokens
        # QK^T and PV over the causal triangle: 2 matmuls x 2 FLOPs x (heads*head_dim) x L^2/2 per layer.
        attention = sum(2 * c.num_hidden_layers * c.num_attention_heads * c.head_dim * n * n for n in prompt_lengths)
        return weights + attention // self.tp + 2 * self.lm_head_params * len(prompt_lengths)

    def decode_bytes_per_step(self, batch: int, context: int, dtype_bytes: int) -> float:
        """Bytes one decode step must read: every weight once plus each row's cached keys and values."""
        weights = (self.layer_params + self.lm_head_params) * dtype_bytes
        return weights + batch * context * self.kv_bytes_per_token(dtype_bytes)

    def decode_flops_per_step(self, batch: int, context: int) -> float:
        c = self.config
        attention = 4 * c.num_hidden_layers * c.num_attention_heads * c.head_dim * context // self.tp
        return batch * (2 * (self.layer_params + self.lm_head_params) + attention)
