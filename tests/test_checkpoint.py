"""Checkpoint layout: both config spellings, sharded files, dtype policy and clear errors for bad folders."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from chameleon_core import ChameleonConfig, ChameleonEngine, CheckpointError, load_model
from chameleon_core.checkpoint import checkpoint_files, parse_dtype
from chameleon_core.packed_linear import Linear, can_pack
from chameleon_core.random_checkpoint import main as random_checkpoint_main


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_config(path: Path, **changes) -> None:
    raw = json.loads((path / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            raw.pop(key, None)
        else:
            raw[key] = value
    (path / "config.json").write_text(json.dumps(raw))


def test_rope_theta_in_both_spellings(tiny_ckpt, tmp_path):
    v4 = _copy(tiny_ckpt, tmp_path / "v4")
    _edit_config(v4, rope_parameters=None, rope_theta=5000.0, rope_scaling=None)
    v5 = _copy(tiny_ckpt, tmp_path / "v5")
    _edit_config(v5, rope_theta=None, rope_parameters={"rope_theta": 5000.0, "rope_type": "default"})
    assert ChameleonConfig.from_pretrained(v4).rope_theta == 5000.0
    assert ChameleonConfig.from_pretrained(v5).rope_theta == 5000.0
    prompt = [[5, 6, 7, 8]]
    a = ChameleonEngine.from_pretrained(v4).prompt_logits(prompt)
    b = ChameleonEngine.from_pretrained(v5).prompt_logits(prompt)
    c = ChameleonEngine.from_pretrained(tiny_ckpt).prompt_logits(prompt)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_legacy_vq_keys_are_read(tiny_ckpt, tmp_path):
    legacy = _copy(tiny_ckpt, tmp_path / "legacy")
    raw = json.loads((legacy / "config.json").read_text())
    vq = raw["vq_config"]
    vq["ch"], vq["ch_mult"], vq["n_embed"], vq["z_channels"] = (
        vq.pop("base_channels"), vq.pop("channel_multiplier"), vq.pop("num_embeddings"), vq.pop("latent_channels"),
    )
    (legacy / "config.json").write_text(json.dumps(raw))
    assert ChameleonConfig.from_pretrained(legacy).vq == ChameleonConfig.from_pretrained(tiny_ckpt).vq


def test_sharded_checkpoint_is_resolved_through_the_index(hf_checkpoints):
    path = hf_checkpoints("gqa")
    files = checkpoint_files(path)
    assert len(set(files.values())) > 1, "the transformers-saved test checkpoint should be sharded"
    assert (path / "model.safetensors.index.json").is_file()
    load_model(path)


def test_dtype_policy_keeps_vq_weights_in_their_stored_dtype(tiny_ckpt):
    model = load_model(tiny_ckpt, dtype="bfloat16")
    assert model.lm_head.weight.dtype == torch.bfloat16
    assert model.model.layers[0].self_attn.q_norm.weight.dtype == torch.bfloat16
    assert model.model.vqmodel.dtype == torch.float32
    assert load_model(tiny_ckpt, dtype="float16", vq_dtype="float16").model.vqmodel.dtype == torch.float16
    assert all(not p.is_meta for p in model.parameters())



@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_linears_are_packed_and_compute_the_same_products(tiny_ckpt, dtype):
    """On the CPU every loaded projection (the decoder's seven per layer and the lm_head) lives in
    oneDNN's layout; each holds exactly the checkpoint's values and gives F.linear's output up to
    summation order, in eager code and inside a compiled graph."""
    model = load_model(tiny_ckpt, dtype=dtype)
    linears = {name: m for name, m in model.named_modules() if isinstance(m, Linear)}
    assert len(linears) == 7 * model.config.num_hidden_layers + 1
    gen = torch.Generator().manual_seed(0)
    with safe_open(str(tiny_ckpt / "model.safetensors"), framework="pt") as f:
        for name, module in linears.items():
            stored = f.get_tensor(f"{name}.weight").to(dtype)
            packed = module.weight
            assert module.packed == packed.is_mkldnn == can_pack(stored), name
            if dtype == torch.float32:  # bf16 packing also needs CPU support (AVX-512); fp32 needs only oneDNN
                assert packed.is_mkldnn, f"{name}: the CPU wheel of torch ships oneDNN, fp32 should be packed"
            assert packed.shape == stored.shape and packed.dtype == dtype
            assert torch.equal(packed.to_dense(), stored), name
            hidden = torch.randn(2, 3, stored.shape[1], generator=gen).to(dtype)
            want = F.linear(hidden.float(), stored.float())
            got = module(hidden).float()
            assert got.shape == (2, 3, stored.shape[0])
            tol = 1e-4 if dtype == torch.float32 else 1e-2 * want.abs().max().item()  # bf16: output rounding
            assert (got - want).abs().max().item() < tol, name

    head = linears["lm_head"]
    if head.packed:  # a compiled graph reaches the packed weight through the custom op: the same oneDNN call
        compiled = torch.compile(head.forward, dynamic=True)
        hidden = torch.randn(5, head.weight.shape[1], generator=gen).to(dtype)
        with torch.inference_mode():
            assert torch.equal(compiled(hidden), head(hidden))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_loaded_model_keeps_no_view_of_the_checkpoint_files(hf_checkpoints):
    """Parameters own their memory: no weight file stays memory-mapped once loading returns, so the
    pages read from it (including those of weights repacked since) leave the process."""
    folder = hf_checkpoints("gqa")  # sharded: several files
    model = load_model(folder)
    mapped = [line for line in Path("/proc/self/maps").read_text().splitlines() if str(folder) in line]
    assert mapped == [], mapped
    assert all(p.device.type == "cpu" and not p.is_meta for p in model.parameters())


def test_random_checkpoint_cli_bfloat16(tmp_path):
    assert random_checkpoint_main([str(tmp_path / "ck"), "--preset", "tiny", "--dtype", "bfloat16",
                                   "--seed", "3", "--kv-heads", "1"]) == 0
    with safe_open(str(tmp_path / "ck" / "model.safetensors"), framework="pt") as f:
        assert f.get_tensor("lm_head.weight").dtype == torch.bfloat16
    config = ChameleonConfig.from_pretrained(tmp_path / "ck")
    assert config.num_key_value_heads == 1
    vocab = config.vocabulary_map
    for name in ("<s>", "<pad>", "</s>", "<unk>", "<eoss>", "<racm3:break>", "<reserved08706>", "<image>"):
        assert name in vocab
    codes = sorted(v for k, v in vocab.items() if k.startswith("IMGIMG"))
    assert len(codes) == config.vq.num_embeddings and codes[0] != 4, "ids must differ from the real checkpoint's"
    assert vocab == json.loads((tmp_path / "ck" / "tokenizer.json").read_text())["model"]["vocab"] | {
        t["content"]: t["id"] for t in json.loads((tmp_path / "ck" / "tokenizer.json").read_text())["added_tokens"]
    }


def test_missing_shard_is_named(hf_checkpoints, tmp_path):
    broken = _copy(hf_checkpoints("mha"), tmp_path / "broken")
    index = json.loads((broken / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[1]
    (broken / victim).unlink()
    with pytest.raises(CheckpointError, match=f"shard file.*{victim}.*missing"):
        load_model(broken)


def test_wrong_shape_is_named(tiny_ckpt, tmp_path):
    broken = _copy(tiny_ckpt, tmp_path / "broken")
    path = broken / "model.safetensors"
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors["model.layers.1.mlp.up_proj.weight"] = tensors["model.layers.1.mlp.up_proj.weight"][:-1]
    save_file(tensors, str(path))
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.up_proj\.weight has shape \(127, 64\), "
                                              r"expected \(128, 64\)"):
        load_model(broken)


def test_missing_and_unexpected_tensors_are_named(tiny_ckpt, tmp_path):
    broken = _copy(tiny_ckpt, tmp_path / "broken")
    path = broken / "model.safetensors"
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    del tensors["model.norm.weight"]
    save_file(tensors, str(path))
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\) model\.norm\.weight"):
        load_model(broken)
    tensors["model.norm.weight"] = torch.ones(64)
    tensors["model.layers.0.self_attn.rotary.inv_freq"] = torch.ones(8)
    tensors["model.vqmodel.decoder.conv_in.weight"] = torch.ones(1)  # VQ extras are tolerated
    save_file(tensors, str(path))
    with pytest.raises(CheckpointError, match=r"unexpected tensor\(s\) model\.layers\.0\.self_attn\.rotary"):
        load_model(broken)


def test_config_of_another_model_type(tiny_ckpt, tmp_path):
    other = _copy(tiny_ckpt, tmp_path / "llama")
    _edit_config(other, model_type="llama")
    with pytest.raises(CheckpointError, match="model_type is 'llama', expected 'chameleon'"):
        ChameleonEngine.from_pretrained(other)


def test_unknown_dtype(tiny_ckpt):
    with pytest.raises(CheckpointError, match="unknown dtype 'float8'"):
        load_model(tiny_ckpt, dtype="float8")
    assert parse_dtype("bf16") == torch.bfloat16


def test_pickle_only_folder_is_refused(tiny_ckpt, tmp_path):
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(tiny_ckpt / "config.json", pickled / "config.json")
    (pickled / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(CheckpointError, match="only pickle weights found.*never loaded"):
        load_model(pickled)


def test_folder_without_weights_or_config(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        load_model(tmp_path)
