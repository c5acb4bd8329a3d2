"""The caption pipeline on a real local Ray cluster: exact row accounting, no drift, TP, and S3."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from datasets import write_caption_dataset, write_multi_image_dataset

from chameleon_core import ChameleonEngine, SamplingParams
from pipeline import CaptionOptions, GenerationSettings, build_caption_dataset, run_caption_job
from pipeline.storage import ImageResolver, StorageOptions

pytestmark = pytest.mark.slow
GEN = GenerationSettings(max_new_tokens=12)


def _options(tiny_ckpt, inputs, output, **kw) -> CaptionOptions:
    base = dict(inputs=tuple(str(p) for p in inputs), output=str(output), model=str(tiny_ckpt), generation=GEN,
                batch_size=4, rows_per_file=10, save_token_ids=True, device="cpu", cpu_workers=(1, 1))
    base.update(kw)
    return CaptionOptions(**base)


def _direct_tokens(engine: ChameleonEngine, prompt: str, images: list[bytes], params: SamplingParams) -> list[int]:
    """What chameleon_core alone generates for one row (the reference for the no-drift checks)."""
    ids = engine.prompt_ids(prompt, len(images))
    crops = [engine.processor.image_preprocessor.crop(b) for b in images]
    filled = engine.fill_images([ids], crops)
    return engine.generate_ids(filled, params).token_ids[0]


@pytest.fixture(scope="module")
def caption_data(tmp_path_factory):
    return write_caption_dataset(tmp_path_factory.mktemp("caption_data"))


def test_every_row_once_with_captions_or_typed_errors(ray_local, tiny_ckpt, caption_data, tmp_path):
    files, expected = caption_data
    assert len(expected) >= 40
    options = _options(tiny_ckpt, [files[0].parent], tmp_path / "out", keep_columns=("note",))
    summary = run_caption_job(options)

    table = pq.read_table(tmp_path / "out")
    ids = table.column("id").to_pylist()
    assert sorted(ids) == sorted(expected), "every input id exactly once"
    assert summary["rows_in"] == summary["rows_out"] == len(expected)
    rows = {r["id"]: r for r in table.to_pylist()}
    for row_id, outcome in expected.items():
        row = rows[row_id]
        assert row["note"] == f"row {row_id}"
        assert row["model"] == Path(tiny_ckpt).name
        if outcome == "ok":
            assert row["error"] is None, (row_id, row["error"])
            assert row["caption"] is not None and row["finish_reason"] in ("stop", "length")
            assert row["num_generated_tokens"] == len(row["output_token_ids"]) >= 1
            assert row["num_prompt_tokens"] > 16
        else:
            assert row["caption"] is None and row["finish_reason"] == "error"
            assert row["error"].startswith(outcome + ":"), (row_id, row["error"])
    assert "bomb" in rows["bad_decompression_bomb"]["error"]
    assert "0 bytes" in rows["bad_zero_bytes"]["error"]
    assert "truncated" in rows["bad_truncated_jpeg"]["error"]
    assert "not found" in rows["bad_missing_path"]["error"]
    bad = sum(1 for v in expected.values() if v != "ok")
    assert summary["rows_with_errors"] == bad
    assert summary["errors_by_type"] == {"ImageDecodeError": 4, "ImageSourceError": 1}
    on_disk = json.loads((tmp_path / "out" / "_summary.json").read_text())
    assert on_disk["rows_out"] == len(expected) and on_disk["stages"]["generate"]["busy_s"] > 0
    parts = sorted(p.name for p in (tmp_path / "out").glob("part-*.parquet"))
    assert len(parts) == summary["units_total"] and all(pq.read_metadata(tmp_path / "out" / p).num_rows <= 10
                                                         for p in parts)
    settings = json.loads(pq.read_schema(tmp_path / "out" / parts[0]).metadata[b"chameleon.settings"])
    assert settings["generation"]["max_new_tokens"] == 12

    # No drift: every good row's tokens equal a direct chameleon_core run on the same image.
    engine = ChameleonEngine.from_pretrained(tiny_ckpt)
    resolver = ImageResolver(StorageOptions())
    source = {r["id"]: (r, str(f)) for f in files for r in pq.read_table(f).to_pylist()}
    for row_id in [k for k, v in expected.items() if v == "ok"][::4]:
        raw, src = source[row_id]
        images = resolver.images(raw["image"], src)
        direct = _direct_tokens(engine, options.prompt, images, GEN.sampling_params())
        assert rows[row_id]["output_token_ids"] == direct, row_id


def test_multi_image_rows_and_prompt_column_match_direct_generation(ray_local, tiny_ckpt, tmp_path):
    data = write_multi_image_dataset(tmp_path / "multi.parquet")
    options = _options(tiny_ckpt, [data], tmp_path / "out", image_column="images", prompt_column="question",
                       keep_columns=("question",))
    run_caption_job(options)
    rows = {r["id"]: r for r in pq.read_table(tmp_path / "out").to_pylist()}
    assert sorted(rows) == ["mismatch", "no_image", "one_image", "two_again", "two_images"]
    assert rows["mismatch"]["error"].startswith("PromptError: prompt: has 0 <image> placeholder(s) but 1 image(s)")
    engine = ChameleonEngine.from_pretrained(tiny_ckpt)
    for raw in pq.read_table(data).to_pylist():
        if raw["id"] == "mismatch":
            continue
        direct = _direct_tokens(engine, raw["question"], raw["images"], GEN.sampling_params())
        assert rows[raw["id"]]["output_token_ids"] == direct, raw["id"]
        assert rows[raw["id"]]["num_prompt_tokens"] == len(engine.prompt_ids(raw["question"], len(raw["images"])))


def test_tp2_on_cpu_gives_the_tokens_of_tp1(ray_local, tiny_ckpt, tmp_path):
    data = write_multi_image_dataset(tmp_path / "multi.parquet")
    common = dict(image_column="images", prompt_column="question")
    run_caption_job(_options(tiny_ckpt, [data], tmp_path / "tp1", **common))
    summary = run_caption_job(_options(tiny_ckpt, [data], tmp_path / "tp2", tp=2, **common))
    assert summary["tp"] == 2
    groups = ray_local.util.placement_group_table().values()
    assert groups and all(g["state"] == "REMOVED" for g in groups), "replica placement groups are released"
    tp1 = {r["id"]: r for r in pq.read_table(tmp_path / "tp1").to_pylist()}
    tp2 = {r["id"]: r for r in pq.read_table(tmp_path / "tp2").to_pylist()}
    assert tp1.keys() == tp2.keys()
    for key in tp1:
        assert tp2[key]["output_token_ids"] == tp1[key]["output_token_ids"], key
        assert tp2[key]["caption"] == tp1[key]["caption"]


def test_sampling_is_reproducible_per_row_id(ray_local, tiny_ckpt, caption_data, tmp_path):
    files, _ = caption_data
    sampled = replace(GEN, temperature=1.0, top_p=0.9, seed=5)
    a = run_caption_job(_options(tiny_ckpt, [files[0]], tmp_path / "a", generation=sampled, batch_size=3))
    b = run_caption_job(_options(tiny_ckpt, [files[0]], tmp_path / "b", generation=sampled, batch_size=5))
    assert a["rows_out"] == b["rows_out"]
    ta = {r["id"]: r["output_token_ids"] for r in pq.read_table(tmp_path / "a").to_pylist()}
    tb = {r["id"]: r["output_token_ids"] for r in pq.read_table(tmp_path / "b").to_pylist()}
    assert ta == tb, "a row's sample must not depend on its batch"


def test_build_caption_dataset_on_a_user_dataset(ray_local, tiny_ckpt, skimage_data):
    import ray

    items = [{"id": i, "image": (skimage_data / n).read_bytes()} for i, n in
             enumerate(["astronaut.png", "camera.png", "logo.png"])]
    items.append({"id": 3, "image": b"not an image"})
    options = _options(tiny_ckpt, ["unused"], "unused")
    out = build_caption_dataset(ray.data.from_items(items), options).take_all()
    assert sorted(r["id"] for r in out) == [0, 1, 2, 3]
    errors = {r["id"]: r["error"] for r in out}
    assert errors[3].startswith("ImageDecodeError") and errors[0] is None
    assert all(isinstance(r["caption"], str) for r in out if r["id"] != 3)
    assert np.all([r["num_prompt_tokens"] for r in out if r["id"] != 3])


_CPU_STAGES_SCRIPT = """
import json, pickle, sys
import pyarrow as pa
from pipeline.units import read_tasks_batch
from pipeline.stages import PreprocessStage

config, tasks, columns = pickle.load(open(sys.argv[1], "rb"))
stage = PreprocessStage(config)
rows = []
for table in read_tasks_batch(pa.Table.from_pylist(tasks), columns, config.id_column, config.storage):
    out = stage(table)
    for r in out.select(["id", "_prompt_ids", "_pixels", "error"]).to_pylist():
        rows.append({"id": r["id"], "ids": r["_prompt_ids"], "pixels": (r["_pixels"] or b"").hex(), "error": r["error"]})
print(json.dumps({"torch_imported": "torch" in sys.modules, "rows": rows}))
"""


def test_read_and_preprocessing_run_without_torch(tiny_ckpt, caption_data, tmp_path):
    """The CPU stages in a fresh interpreter, as a Ray worker starts them: the job's own read tasks and
    preprocessing config, real images and corrupt ones. They never import torch (seconds of CPU and
    ~200 MiB per worker), and give what chameleon_core gives for each row."""
    import pickle
    import subprocess
    import sys

    from pipeline.caption import preprocess_config
    from pipeline.options import resolve_device
    from pipeline.units import describe_inputs, plan_reads, plan_units, read_task_dicts

    files, expected = caption_data
    options = resolve_device(_options(tiny_ckpt, files, tmp_path / "out"), [0.0])
    storage = options.storage
    inputs = describe_inputs([str(f) for f in files], storage)
    tasks = read_task_dicts(plan_reads(inputs, plan_units(inputs, options.rows_per_file)))
    (tmp_path / "args.pkl").write_bytes(pickle.dumps((preprocess_config(options), tasks, ["id", "image"])))
    script = tmp_path / "cpu_stages.py"
    script.write_text(_CPU_STAGES_SCRIPT)
    done = subprocess.run([sys.executable, str(script), str(tmp_path / "args.pkl")], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parent.parent, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["torch_imported"] is False
    rows = {r["id"]: r for r in result["rows"]}
    assert sorted(rows) == sorted(expected)

    engine = ChameleonEngine.from_pretrained(tiny_ckpt)
    resolver = ImageResolver(storage)
    inputs_by_id = {r["id"]: (r["image"], str(f)) for f in files for r in pq.read_table(f).to_pylist()}
    for row_id, outcome in expected.items():
        row = rows[row_id]
        if outcome != "ok":
            assert row["error"] is not None and row["error"].startswith(outcome), (row_id, row["error"])
            continue
        assert row["error"] is None, (row_id, row["error"])
        images = resolver.images(*inputs_by_id[row_id])
        assert row["ids"] == engine.prompt_ids(options.prompt, len(images))
        crops = b"".join(engine.processor.image_preprocessor.crop(b).tobytes() for b in images)
        assert bytes.fromhex(row["pixels"]) == crops
