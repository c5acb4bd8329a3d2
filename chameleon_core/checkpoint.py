"""Streaming safetensors loading into a model built on the meta device (no pickle, no second copy).

A tensor-parallel rank passes `shards`: for each sharded parameter, which slice of the checkpoint
tensor it owns. Only that slice is read (`safe_open(...).get_slice`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from chameleon_core.errors import CheckpointError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# The VQ-VAE part of the checkpoint also holds tensors inference never uses (post_quant_conv, and in some
# conversions decoder or loss weights); they are skipped rather than treated as errors.
VQ_PREFIX = "model.vqmodel."

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        if name in _DTYPES.values():
            return name
        raise CheckpointError(f"unsupported dtype {name}; use one of float32, bfloat16, float16")
    try:
        return _DTYPES[str(name).lower()]
    except KeyError:
        raise CheckpointError(f"unknown dtype {name!r}; use one of float32, bfloat16, float16") from None


@dataclass(frozen=True)
class Shard:
    """This rank's part of a checkpoint tensor: `length` entries from `start` along `dim`."""

    dim: int
    start: int
    length: int
    full_size: int


def checkpoint_files(model_dir: str | Path) -> dict[str, Path]:
    """Tensor name -> safetensors file, from the index when the checkpoint is sharded."""
    model_dir = Path(model_dir)
    index_path = model_dir / INDEX_FILE
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as exc:
            raise CheckpointError(f"{index_path}: not a valid safetensors index ({exc})") from exc
        files = {name: model_dir / filename for name, filename in weight_map.items()}
        missing = sorted({str(p.name) for p in files.values() if not p.is_file()})
        if missing:
            raise CheckpointError(
                f"{model_dir}: shard file(s) {', '.join(missing)} listed in {INDEX_FILE} are missing"
            )
        return files
    single = model_dir / SINGLE_FILE
    if single.is_file():
        with safe_open(str(single), framework="pt") as f:
            return {name: single for name in f.keys()}
    present = sorted(p.name for p in model_dir.iterdir()) if model_dir.is_dir() else []
    if any(name.endswith((".bin", ".pt", ".pth")) for name in present):
        raise CheckpointError(
            f"{model_dir}: only pickle weights found ({', '.join(present)}); convert them to safetensors "
            "(pickle files are never loaded, they can run arbitrary code)"
        )
    raise CheckpointError(f"{model_dir}: no {SINGLE_FILE} or {INDEX_FILE} (found: {', '.join(present) or 'nothing'})")


def load_weights(
    model: nn.Module,
    model_dir: str | Path,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    shards: dict[str, Shard] | None = None,
    keep_dtype_prefixes: tuple[str, ...] = (VQ_PREFIX,),
) -> None:
    """Fill every parameter of `model` (built on the meta device) from the checkpoint, one tensor at a time.

    Parameters under `keep_dtype_prefixes` keep the dtype they are stored in; all others are cast to
    `dtype`. Missing, unexpected and mis-shaped tensors are errors that name the tensor.
    """
    files = checkpoint_files(model_dir)
    shards = shards or {}
    expected = dict(model.named_parameters())
    missing = sorted(set(expected) - set(files))
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise CheckpointError(f"{model_dir}: checkpoint is missing tensor(s) {', '.join(missing[:5])}{more}")
    unexpected = sorted(n for n in set(files) - set(expected) if not n.startswith(VQ_PREFIX))
    if unexpected:
        more = f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else ""
        raise CheckpointError(
            f"{model_dir}: checkpoint has unexpected tensor(s) {', '.join(unexpected[:5])}{more} "
            "(is the config.json from the same model?)"
        )
    by_file: dict[Path, list[str]] = {}
    for name in expected:
        by_file.setdefault(files[name], []).append(name)
    for path, names in sorted(by_file.items()):
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in names:
                tensor = _read_tensor(f, name, path, expected[name], shards.get(name))
                target = tensor.dtype if name.startswith(keep_dtype_prefixes) else dtype
                # Always a copy: a tensor read from the file is a view of its memory map, and one such
                # view kept alive keeps every page read from that file resident, including those of
                # tensors that were converted or repacked since (the CPU's packed linears).
                _assign(model, name, tensor.to(device=device, dtype=target, copy=True))


def _read_tensor(f, name: str, path: Path, param: nn.Parameter, shard: Shard | None) -> torch.Tensor:
    view = f.get_slice(name)
    stored = tuple(view.get_shape())
    want_full = list(param.shape)
    if shard is not None:
        want_full[shard.dim] = shard.full_size
    if stored != tuple(want_full):
        raise CheckpointError(
            f"{path.name}: tensor {name} has shape {stored}, expected {tuple(want_full)} from config.json"
        )
    if shard is None:
        return view[:]
    index = [slice(None)] * len(stored)
    index[shard.dim] = slice(shard.start, shard.start + shard.length)
    return view[tuple(index)]


def _assign(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    module._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
