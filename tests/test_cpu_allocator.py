"""Loading a model on the CPU makes freed tensor memory reusable without page faults (cpu_allocator)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

# Runs in a fresh interpreter: the allocator setting is process-wide and must start from glibc's defaults.
_SCRIPT = """
import json, resource, sys
import torch
from chameleon_core import load_model

def faults_per_cycle(cycles=6):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(cycles):
        block = torch.empty(64 * 2**20 // 4)  # above glibc's largest mmap threshold (32 MiB)
        block.fill_(1.0)  # touch every page
        del block
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / cycles

default = faults_per_cycle()
load_model(sys.argv[1])
faults_per_cycle(cycles=1)  # the heap grows to hold the block once
print(json.dumps({"default": default, "after_load": faults_per_cycle()}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the policy applies to glibc on Linux")
def test_freed_tensor_memory_is_reused_after_loading_on_cpu(tiny_ckpt):
    from chameleon_core.cpu_allocator import keep_freed_memory

    if not keep_freed_memory():  # harmless here: loading a model in this process sets it anyway
        pytest.skip("the C library is not glibc")
    assert keep_freed_memory() is True  # idempotent
    out = subprocess.run([sys.executable, "-c", _SCRIPT, str(tiny_ckpt)], capture_output=True, text=True, check=True)
    faults = json.loads(out.stdout.strip().splitlines()[-1])
    pages = 64 * 2**20 // 4096
    # glibc's default maps and unmaps such a block every time: every page faults again on each cycle.
    assert faults["default"] > 0.9 * pages
    # Kept in the heap once faulted in, the block's pages are reused.
    assert faults["after_load"] < 0.25 * pages


class _ReallocationProbe:
    """A Ray Data UDF with the generate stage's memory pattern: the policy set in the constructor (as
    `load_model` does there), then each call frees and allocates again a block above 64 MiB, the size
    of a batch's VQ activations. It returns the page faults of the thread that ran the call."""

    BLOCK_BYTES = 96 * 2**20
    WARM_UP_CYCLES, MEASURED_CYCLES = 20, 8

    def __init__(self):
        from chameleon_core.cpu_allocator import keep_freed_memory

        keep_freed_memory()

    def __call__(self, batch):
        import resource

        import torch

        def cycle():
            block = torch.empty(self.BLOCK_BYTES // 4)
            block.fill_(1.0)
            del block

        # Warm up as a stage does over its first batches: small allocations made between cycles split
        # freed blocks, so the heap grows for a while (about ten cycles here) before every block fits.
        for _ in range(self.WARM_UP_CYCLES):
            cycle()
        before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
        for _ in range(self.MEASURED_CYCLES):
            cycle()
        faults = (resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before) / self.MEASURED_CYCLES
        return {"faults_per_cycle": [faults] * len(batch["id"])}


def _faults_in_actor(ray, compute) -> float:
    rows = ray.data.range(1).map_batches(_ReallocationProbe, compute=compute, batch_size=1, num_cpus=1).take_all()
    return rows[0]["faults_per_cycle"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the policy applies to glibc on Linux")
def test_generate_actors_reuse_freed_memory(ray_local):
    from ray import cloudpickle
    from ray.data import ActorPoolStrategy

    from pipeline.caption import generate_actor_pool

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers cannot import tests/
    pages = _ReallocationProbe.BLOCK_BYTES // 4096
    # Ray Data's default pool calls the UDF on a helper thread, whose own glibc arena maps and unmaps
    # such a block every time: the policy does not reach it, and every page faults again.
    assert _faults_in_actor(ray_local, ActorPoolStrategy(size=1)) > 0.9 * pages
    # The generate stage's pool calls it on the actor's main thread, where the freed block is reused.
    assert _faults_in_actor(ray_local, generate_actor_pool((1, 1))) < 0.25 * pages
