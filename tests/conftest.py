"""Shared fixtures: checkpoints (ours and transformers-saved), real images, and the environment Ray needs."""

from __future__ import annotations

import os

# Before anything imports ray: no auth token file (it breaks later `ray job submit`), loopback only.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    from chameleon_core.random_checkpoint import write_random_checkpoint

    return write_random_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", "tiny", seed=0)


@pytest.fixture(scope="session")
def hf_checkpoints(tmp_path_factory):
    """Factory: transformers-saved random checkpoints by name (mha, gqa, swin), built once per session."""
    from hf_oracle import save_hf_checkpoint

    made: dict[str, Path] = {}
    specs = {
        "mha": dict(num_key_value_heads=4, seed=1),
        "gqa": dict(num_key_value_heads=2, seed=2),
        "swin": dict(num_key_value_heads=4, swin_norm=True, seed=3),
    }

    def get(name: str) -> Path:
        if name not in made:
            made[name] = save_hf_checkpoint(tmp_path_factory.mktemp(f"hf_{name}"), **specs[name])
        return made[name]

    return get


@pytest.fixture(scope="session")
def skimage_data() -> Path:
    import skimage

    return Path(os.path.dirname(skimage.__file__)) / "data"


@pytest.fixture(scope="session")
def ray_local():
    """An in-process local Ray cluster with 2 CPUs on loopback, shared by the pipeline tests."""
    import ray

    from pipeline.caption import ensure_ray

    ensure_ray(num_cpus=2)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    yield ray
    ray.shutdown()
