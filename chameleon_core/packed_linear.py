"""CPU only: weights of skinny, bandwidth-bound matmuls stored in oneDNN's blocked layout.

Every decode step multiplies a few rows (the live batch) by the (vocab, hidden) lm_head, the largest
matrix the step reads. ATen's `F.linear` streams a row-major weight for such a skinny product at a
fraction of the memory bandwidth; a weight reordered once into oneDNN's blocked layout reads at
several times that (on the 2-core dev machine, 8 rows x 512 x 65536: fp32 25 ms -> 9.5 ms, bf16
8.2 ms -> 4.4 ms). The packed tensor replaces the original, so no memory is added, and the product is
the same sum in another order (fp32 logits agree to a few 1e-6 relative).

The decoder's own linears gain nothing from packing in fp32 at batch 8, so only the head is packed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# oneDNN picks the blocking for this many rows; decode batches are of this order.
_ROWS_HINT = 8


def can_pack(weight: torch.Tensor) -> bool:
    if weight.device.type != "cpu" or weight.dim() != 2 or weight.is_mkldnn:
        return False
    if not torch.backends.mkldnn.is_available():
        return False
    if weight.dtype == torch.float32:
        return True
    return weight.dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`x @ weight.T` for a plain or a packed weight (no bias)."""
    if weight.is_mkldnn:
        return torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")
    return F.linear(x, weight)


def pack_parameter(module: nn.Module, name: str = "weight") -> None:
    """Replace `module.<name>` by its packed form, a (frozen) parameter of the same shape and dtype;
    left as it is where packing is not available."""
    weight = module._parameters[name]
    if can_pack(weight):
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), _ROWS_HINT)
        module._parameters[name] = nn.Parameter(packed, requires_grad=False)
