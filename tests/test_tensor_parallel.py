"""Tensor parallelism over real gloo process groups on loopback: tp=2 against tp=1 on mixed batches."""

from __future__ import annotations

import multiprocessing as mp

import pytest
import torch
import tp_helpers

from chameleon_core import ChameleonEngine, SamplingParams, TensorParallelError, load_model
from chameleon_core.distributed import TPGroup, free_port
from chameleon_core.random_checkpoint import write_random_checkpoint

LOGIT_TOL = 1e-4
IMAGES = ["astronaut.png", "logo.png", "camera.png"]


def _spawn(target, args_per_rank, timeout=180):
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=target, args=args) for args in args_per_rank]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    for p in procs:
        if p.is_alive():
            p.kill()
            pytest.fail(f"rank process {p.pid} did not finish within {timeout}s")
    return [p.exitcode for p in procs]


@pytest.fixture(scope="module")
def kv1_ckpt(tmp_path_factory):
    """One kv head: with tp=2 the kv head is replicated on both ranks (with its k_norm row)."""
    return write_random_checkpoint(tmp_path_factory.mktemp("kv1") / "ck", "tiny", seed=5, num_key_value_heads=1)


@pytest.mark.parametrize("which", ["mha", "gqa", "swin", "kv-replicated"])
def test_tp2_matches_tp1(which, hf_checkpoints, kv1_ckpt, skimage_data, tmp_path):
    checkpoint = kv1_ckpt if which == "kv-replicated" else hf_checkpoints(which)
    images = [str(skimage_data / name) for name in IMAGES]
    address = f"127.0.0.1:{free_port()}"
    codes = _spawn(tp_helpers.run_rank,
                   [(r, 2, address, str(checkpoint), images, str(tmp_path)) for r in range(2)])
    assert codes == [0, 0]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]

    engine = ChameleonEngine.from_pretrained(checkpoint)
    prompts, _ = tp_helpers.multimodal_batch(engine, images)
    assert len({len(p) for p in prompts}) == 3
    logits = engine.prompt_logits(prompts)
    greedy = engine.generate_ids(prompts, SamplingParams(max_new_tokens=16)).token_ids
    sampled = engine.generate_ids(
        prompts, SamplingParams(max_new_tokens=16, temperature=1.0, top_p=0.95, seed=11)
    ).token_ids

    heads = engine.model.config.num_attention_heads * engine.model.config.head_dim
    real = torch.tensor([[0] * (logits.shape[1] - len(p)) + [1] * len(p) for p in prompts]).bool()
    for r, got in enumerate(ranks):
        assert got["q_proj_rows"] == heads // 2, "each rank holds half of the query heads"
        diff = (got["logits"][real] - logits[real]).abs().max().item()
        assert diff <= LOGIT_TOL, f"rank {r}: max |logit diff| {diff:.3g}"
        assert got["greedy"] == greedy
        assert got["sampled"] == sampled


def test_heads_not_divisible_by_tp(tiny_ckpt):
    # The check runs before any collective, so a group object for rank 0 of 3 is enough to reach it.
    with pytest.raises(TensorParallelError, match=r"num_attention_heads \(4\) is not divisible by the "
                                                  r"tensor-parallel size 3"):
        load_model(tiny_ckpt, tp=TPGroup(rank=0, world_size=3, group=None, backend="gloo"))


def test_missing_peer_times_out_with_a_clear_error(tmp_path):
    address = f"127.0.0.1:{free_port()}"
    codes = _spawn(tp_helpers.join_group, [(0, 2, address, 3.0, str(tmp_path))], timeout=60)
    assert codes == [0]
    message = (tmp_path / "join0.txt").read_text()
    assert message.startswith("TensorParallelError: rank 0/2: could not form the tensor-parallel group")
    assert "within 3s" in message


def test_ranks_with_different_world_sizes_fail(tmp_path):
    address = f"127.0.0.1:{free_port()}"
    codes = _spawn(tp_helpers.join_group,
                   [(0, 2, address, 5.0, str(tmp_path)), (1, 3, address, 5.0, str(tmp_path))], timeout=90)
    assert codes == [0, 0]
    messages = [(tmp_path / f"join{r}.txt").read_text() for r in range(2)]
    assert all(m.startswith("TensorParallelError") for m in messages), messages


def test_invalid_rank_is_refused():
    from chameleon_core.distributed import init_tp_group

    with pytest.raises(TensorParallelError, match="rank 2 is not valid for a world size of 2"):
        init_tp_group(2, 2, "127.0.0.1:1")

