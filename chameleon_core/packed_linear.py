"""CPU only: linear weights stored in oneDNN's blocked layout.

ATen's `F.linear` on the CPU streams a row-major (out, in) weight at a fraction of the memory bandwidth
when the product is skinny, as in every decode step (a few rows, the live batch), and runs below the
GEMM peak on the prefill's short-K products too. A weight reordered once into oneDNN's blocked layout
does better at both. On the 2-core AMD EPYC dev machine, fp32, the `small` preset's 56 decoder linears
(109 MB, far beyond the caches): 8 rows 17.0 ms -> 6.5 ms, 2136 rows 886 ms -> 706 ms; the 8 x 512 x
65536 lm_head: 31 ms -> 5.9 ms. The packed tensor replaces the original, so no memory is added, and
the product is the same sum in another order (fp32 logits agree to a few 1e-6 relative).

A packed weight is an opaque tensor that inductor cannot read, so inside a compiled graph the product
goes through the custom op `chameleon_core::packed_linear`, which the graph calls as an external
kernel. Eager code calls oneDNN directly (a custom op's Python dispatch would add tens of
microseconds to each of a decode step's ~60 products).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# oneDNN picks the blocking for this many rows; decode batches are of this order, and larger hints
# measured the same for prefill-sized products.
_ROWS_HINT = 8


def can_pack(weight: torch.Tensor) -> bool:
    if weight.device.type != "cpu" or weight.dim() != 2 or weight.is_mkldnn:
        return False
    if not torch.backends.mkldnn.is_available():
        return False
    if weight.dtype == torch.float32:
        return True
    return weight.dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def _onednn_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), weight, None, "none", [], "")


@torch.library.custom_op("chameleon_core::packed_linear", mutates_args=())
def packed_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return _onednn_linear(x, weight)


@packed_linear.register_fake
def _(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


class Linear(nn.Module):
    """A bias-free projection with an (out, in) weight, as in the checkpoint, which `pack` may reorder."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        # A plain attribute, not `weight.is_mkldnn`: compiled graphs trace fake tensors, which do not
        # carry the layout, and guard on the attribute instead.
        self.packed = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.packed:
            return F.linear(x, self.weight)
        if torch.compiler.is_compiling():
            return packed_linear(x, self.weight)
        return _onednn_linear(x, self.weight)

    def pack(self) -> None:
        """Store the weight packed (a frozen parameter of the same shape and dtype) where oneDNN can."""
        if can_pack(self.weight):
            packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach().contiguous(), _ROWS_HINT)
            self.weight = nn.Parameter(packed, requires_grad=False)
            self.packed = True


def pack_linears(model: nn.Module) -> None:
    """Pack the weight of every `Linear` in `model` (a no-op off the CPU)."""
    for module in model.modules():
        if isinstance(module, Linear):
            module.pack()
