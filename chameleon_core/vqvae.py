"""The VQ-VAE image tokenizer (encoder half only): pixels -> a grid of codebook indices.

Module names mirror `model.vqmodel.*` in the checkpoint. The arithmetic follows the reference encoder
step for step (swish as x*sigmoid(x), scale after the attention matmul, softmax in the activation
dtype, |z|^2 + |e|^2 - 2 z.e distances), because the argmin over codes is sensitive to rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from chameleon_core.config import VQConfig


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


def _swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = _group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _group_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        # Only a 1x1 shortcut appears in Chameleon checkpoints (conv_shortcut is never enabled).
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(_swish(self.norm1(x)))
        h = self.conv2(_swish(self.norm2(h)))
        shortcut = self.nin_shortcut(x) if self.nin_shortcut is not None else x
        return shortcut + h


class AttnBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.norm = _group_norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        B, C, H, W = x.shape
        q = self.q(h).reshape(B, C, H * W).permute(0, 2, 1)
        k = self.k(h).reshape(B, C, H * W)
        v = self.v(h).reshape(B, C, H * W)
        weights = F.softmax(torch.bmm(q, k) * (int(C) ** -0.5), dim=2)
        out = torch.bmm(v, weights.permute(0, 2, 1)).reshape(B, C, H, W)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Asymmetric zero padding: right and bottom only.
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class DownLevel(nn.Module):
    def __init__(self, blocks: list[ResnetBlock], attns: list[AttnBlock], downsample: Downsample | None):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList(attns)
        if downsample is not None:
            self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.block):
            x = block(x)
            if len(self.attn):
                x = self.attn[i](x)
        if hasattr(self, "downsample"):
            x = self.downsample(x)
        return x


class MidBlock(nn.Module):
    def __init__(self, channels: int, with_attention: bool):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels) if with_attention else nn.Identity()
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.base_channels, 3, padding=1)
        levels = []
        channels = cfg.base_channels
        resolution = cfg.resolution
        with_attention = cfg.attn_type == "vanilla"
        for i, mult in enumerate(cfg.channel_multiplier):
            out_channels = cfg.base_channels * mult
            blocks, attns = [], []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResnetBlock(channels, out_channels))
                channels = out_channels
                if with_attention and resolution in cfg.attn_resolutions:
                    attns.append(AttnBlock(channels))
            is_last = i == len(cfg.channel_multiplier) - 1
            levels.append(DownLevel(blocks, attns, None if is_last else Downsample(channels)))
            if not is_last:
                resolution //= 2
        self.down = nn.ModuleList(levels)
        self.mid = MidBlock(channels, with_attention)
        self.norm_out = _group_norm(channels)
        out = 2 * cfg.latent_channels if cfg.double_latent else cfg.latent_channels
        self.conv_out = nn.Conv2d(channels, out, 3, padding=1)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(pixels)
        for level in self.down:
            x = level(x)
        x = self.mid(x)
        return self.conv_out(_swish(self.norm_out(x)))


class VectorQuantizer(nn.Module):
    def __init__(self, num_embeddings: int, embed_dim: int):
        super().__init__()
        self.embedding = nn.Embedding(num_embeddings, embed_dim)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Nearest codebook index for every spatial position, (B, H*W) in row-major order."""
        B, C, H, W = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, C)
        codebook = self.embedding.weight
        distances = (
            torch.sum(flat**2, dim=1, keepdim=True)
            + torch.sum(codebook**2, dim=1)
            - 2 * torch.einsum("bd,dn->bn", flat, codebook.transpose(0, 1))
        )
        return torch.argmin(distances, dim=1).view(B, H * W)


class VQVAE(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.quant_conv = nn.Conv2d(cfg.latent_channels, cfg.embed_dim, 1)
        self.quantize = VectorQuantizer(cfg.num_embeddings, cfg.embed_dim)

    @property
    def dtype(self) -> torch.dtype:
        return self.quant_conv.weight.dtype

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """VQ codes (B, tokens) for images (B, 3, H, W), computed in the VQ weights' own dtype."""
        pixels = pixels.to(device=self.quant_conv.weight.device, dtype=self.dtype)
        return self.quantize(self.quant_conv(self.encoder(pixels)))
