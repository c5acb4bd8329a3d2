"""Creating the process group of one tensor-parallel replica (gloo on CPU, NCCL on CUDA).

Each rank of a replica is its own process (a Ray actor in the pipeline), and each replica rendezvous
at its own address, so two replicas in one Ray cluster never share any state. All collectives go
through the `TPGroup` object; nothing else in chameleon_core touches torch.distributed's globals.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from chameleon_core.errors import TensorParallelError


@dataclass
class TPGroup:
    rank: int
    world_size: int
    group: dist.ProcessGroup | None
    backend: str

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(tensor, group=self.group)
        return tensor

    def all_gather_last_dim(self, tensor: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)

    def check_agreement(self, values: list[int], what: str) -> None:
        """Raise unless every rank passed the same `values` (e.g. world size and model shape)."""
        mine = torch.tensor(values, dtype=torch.long)
        if self.backend == "nccl":
            mine = mine.cuda()
        parts = [torch.empty_like(mine) for _ in range(self.world_size)]
        try:
            dist.all_gather(parts, mine, group=self.group)
        except RuntimeError as exc:  # a peer that left, or one that believes in another world size
            raise TensorParallelError(
                f"rank {self.rank}/{self.world_size}: peers did not answer while checking {what} ({exc})"
            ) from exc
        seen = [p.tolist() for p in parts]
        if any(s != seen[0] for s in seen):
            raise TensorParallelError(f"ranks disagree on {what}: {seen} (one list per rank)")

    def close(self) -> None:
        # Tearing down gloo while a peer is still inside its last collective aborts the process
        # ("terminate called without an active exception"), so leave together.
        if dist.is_initialized():
            try:
                dist.barrier(group=self.group)
            except RuntimeError:
                pass  # a peer already gone: nothing left to wait for
            dist.destroy_process_group()


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def init_tp_group(
    rank: int,
    world_size: int,
    address: str,
    device: torch.device | str = "cpu",
    timeout_s: float = 120.0,
) -> TPGroup:
    """Join the replica's process group at `address` ("host:port", served by rank 0).

    A peer that never arrives raises TensorParallelError after `timeout_s` instead of hanging.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise TensorParallelError(f"rank {rank} is not valid for a world size of {world_size}")
    device = torch.device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if dist.is_initialized():
        raise TensorParallelError(
            "this process already belongs to a process group; each tensor-parallel rank needs its own process"
        )
    if backend == "gloo":
        # Keep gloo on loopback when the rendezvous is local (it otherwise picks the hostname's interface).
        host = address.rsplit(":", 1)[0]
        if host in ("127.0.0.1", "localhost"):
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    else:
        torch.cuda.set_device(device)
    try:
        dist.init_process_group(
            backend,
            init_method=f"tcp://{address}",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=timeout_s),
        )
    except Exception as exc:  # DistStoreError, RuntimeError, TimeoutError depending on the failure
        raise TensorParallelError(
            f"rank {rank}/{world_size}: could not form the tensor-parallel group at {address} within "
            f"{timeout_s:.0f}s ({type(exc).__name__}: {exc}); is every rank started with world_size={world_size}?"
        ) from exc
    group = TPGroup(rank, world_size, dist.group.WORLD, backend)
    group.check_agreement([world_size], "the world size")
    return group
