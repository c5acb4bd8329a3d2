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
