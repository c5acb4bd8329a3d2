"""The caption job through its real entry points: `ray job submit` to a `ray start` head, S3 in and out
through a moto server, and every invalid-flag case failing fast with exit code 2 and nothing written."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from datasets import write_caption_dataset
from jobtools import JOB, REPO, VENV_BIN, JobProcess, job_env, moto_s3_server, short_tmpdir, start_ray_head

pytestmark = pytest.mark.slow

BUCKET = "caption-bucket"
S3_KEY = "AKIATESTCAPTIONJOB01"
S3_SECRET = "s3cr3t-Zq8VnW2pLx9RtY4uKe7H-must-never-be-written"
UPLOAD_EXCLUDES = [".venv", ".git", ".bench_cache", ".pytest_cache", ".ruff_cache", "demo_output", "*.egg-info"]


@pytest.fixture(scope="module")
def caption_data(tmp_path_factory):
    return write_caption_dataset(tmp_path_factory.mktemp("caption_data"))


@pytest.fixture(scope="module")
def moto_s3():
    """A moto S3 server on loopback (random port) with one bucket; yields (endpoint, s3fs filesystem)."""
    with moto_s3_server(BUCKET, S3_KEY, S3_SECRET) as server:
        yield server


def _check_rows(rows: dict[str, dict], expected: dict[str, str]) -> None:
    for row_id, outcome in expected.items():
        row = rows[row_id]
        if outcome == "ok":
            assert row["error"] is None, (row_id, row["error"])
            assert isinstance(row["caption"], str) and row["finish_reason"] in ("stop", "length"), row_id
            assert row["num_generated_tokens"] >= 1
        else:
            assert row["caption"] is None and row["finish_reason"] == "error", row_id
            assert row["error"].startswith(outcome + ": "), (row_id, row["error"])


# -- 1. ray job submit against a real head ----------------------------------------------------------------


@pytest.fixture
def ray_head(tmp_path):
    """A `ray start --head --block` cluster of this test only; its processes are killed afterwards."""
    head = start_ray_head(tmp_path / "ray-start.log")
    yield head
    head.stop()


def test_ray_job_submit_end_to_end(ray_head, tiny_ckpt, caption_data, tmp_path):
    files, expected = caption_data
    out = tmp_path / "out"
    cmd = [
        str(VENV_BIN / "ray"), "job", "submit", "--address", ray_head.dashboard_url, "--working-dir", str(REPO),
        "--runtime-env-json", json.dumps({"excludes": UPLOAD_EXCLUDES}), "--",
        "python", "jobs/caption.py", "--model", str(tiny_ckpt), "--input", str(files[0].parent),
        "--output", str(out), "--device", "cpu", "--max-new-tokens", "8", "--batch-size", "4",
        "--rows-per-file", "10", "--keep-columns", "note",
    ]
    proc = subprocess.run(cmd, env=job_env(), capture_output=True, text=True, timeout=300, cwd=REPO)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    assert f"rows in {len(expected)}, rows out {len(expected)}" in log
    assert "succeeded" in log

    # The driver ran on the submitted-to cluster, from the uploaded copy of the repository, which holds
    # the code but not the virtual environment or git history.
    packages = [p for p in Path(ray_head.temp_dir).glob("session_2*/runtime_resources/working_dir_files/_ray_pkg_*")
                if p.is_dir()]
    assert len(packages) == 1, packages
    assert (packages[0] / "jobs" / "caption.py").is_file() and (packages[0] / "pipeline" / "caption.py").is_file()
    assert not (packages[0] / ".venv").exists() and not (packages[0] / ".git").exists()

    table = pq.read_table(out)
    ids = table.column("id").to_pylist()
    assert sorted(ids) == sorted(expected), "every input id exactly once"
    rows = {r["id"]: r for r in table.to_pylist()}
    _check_rows(rows, expected)
    assert all(rows[i]["note"] == f"row {i}" for i in expected)
    summary = json.loads((out / "_summary.json").read_text())
    assert summary["rows_in"] == summary["rows_out"] == len(expected)
    assert summary["rows_processed_this_run"] == len(expected) and summary["units_skipped"] == 0
    assert summary["errors_by_type"] == {"ImageDecodeError": 4, "ImageSourceError": 1}
    assert sorted(p.name for p in out.glob("part-*.parquet")) == [f"part-{i:06d}.parquet"
                                                                   for i in range(summary["units_total"])]
    assert not list(out.glob(".tmp-*"))


# -- 2. S3 in and out through moto ------------------------------------------------------------------------


def test_s3_input_and_output_through_moto(moto_s3, tiny_ckpt, caption_data, tmp_path):
    endpoint, fs = moto_s3
    files, expected = caption_data
    local = files[0].parent
    for f in files:
        fs.put_file(str(f), f"{BUCKET}/in/{f.name}")
    for img in (local / "images").iterdir():  # relative paths resolve against s3://bucket/in/
        fs.put_file(str(img), f"{BUCKET}/in/images/{img.name}")
    # Rows naming absolute local files are refused for a remote input (no --allow-local-paths).
    expected = {k: ("ImageSourceError" if k.startswith("abs_") else v) for k, v in expected.items()}

    args = ["--model", tiny_ckpt, "--input", f"s3://{BUCKET}/in/", "--output", f"s3://{BUCKET}/out/",
            "--s3-endpoint", endpoint, "--s3-key", S3_KEY, "--s3-secret", S3_SECRET, "--s3-region", "us-east-1",
            "--device", "cpu", "--max-new-tokens", "6", "--batch-size", "4", "--rows-per-file", "16"]
    with JobProcess(args, tmp_path / "job.log") as job:
        rc = job.wait(timeout=240)
        log = job.log()
        ray_logs = [p for p in Path(job.ray_tmp).rglob("*") if p.is_file() and "logs" in p.parts]
        leaked_in_ray_logs = [str(p) for p in ray_logs if S3_SECRET.encode() in p.read_bytes()]
    assert rc == 0, log[-6000:]
    assert ray_logs, "the job's Ray session wrote logs"

    names = sorted(p.rsplit("/", 1)[1] for p in fs.ls(f"{BUCKET}/out", detail=False))
    parts = [n for n in names if n.startswith("part-")]
    assert names == sorted(["_manifest.json", "_summary.json", *parts]), names
    assert parts and not any(n.startswith((".tmp-", ".write-probe-")) for n in names)
    table = pq.read_table(f"{BUCKET}/out", filesystem=fs)
    assert sorted(table.column("id").to_pylist()) == sorted(expected), "every input id exactly once"
    rows = {r["id"]: r for r in table.to_pylist()}
    _check_rows(rows, expected)
    assert all("refused for a remote input" in rows[k]["error"] for k in expected if k.startswith("abs_"))
    assert "not found" in rows["bad_missing_path"]["error"]
    assert sum(v == "ok" for v in expected.values()) >= 25
    summary = json.loads(fs.cat_file(f"{BUCKET}/out/_summary.json"))
    assert summary["rows_in"] == summary["rows_out"] == len(expected)
    assert summary["storage"] == {"endpoint_url": endpoint, "region": "us-east-1", "credentials": "set"}

    # The secret appears in no output object (data, Parquet metadata, manifest, summary) and no log.
    secret = S3_SECRET.encode()
    for name in names:
        assert secret not in fs.cat_file(f"{BUCKET}/out/{name}"), name
    for part in parts:
        metadata = pq.ParquetFile(f"{BUCKET}/out/{part}", filesystem=fs).schema_arrow.metadata
        assert b"chameleon.settings" in metadata and not any(secret in v for v in metadata.values())
    assert S3_KEY.encode() not in fs.cat_file(f"{BUCKET}/out/_manifest.json")
    assert S3_SECRET not in log
    assert not leaked_in_ray_logs, f"secret written to Ray logs: {leaked_in_ray_logs}"


# -- 3. invalid flags: exit 2, a message naming the problem, nothing written, Ray never started -----------


INVALID = {
    # name: (extra flags, fragments the error message must contain)
    "missing_image_column": (["--image-column", "picture"],
                             ["--image-column", "picture", "not found", "available columns: id, image, note"]),
    "missing_prompt_column": (["--prompt-column", "question"],
                              ["--prompt-column", "question", "available columns: id, image, note"]),
    "model_without_weights": (["--model", "{nosafetensors}"], ["--model", "no model.safetensors"]),
    "model_without_tokenizer": (["--model", "{notokenizer}"], ["--model", "tokenizer.json"]),
    "cuda_without_gpu": (["--device", "cuda"], ["--device cuda", "no GPU"]),
    "tp_above_gpus": (["--device", "cuda", "--tp", "2"], ["--device cuda", "no GPU", "--tp 2 needs 2 GPUs"]),
    "output_under_a_file": (["--output", "{file}/out"], ["--output", "not writable", "Not a directory"]),
    "output_is_a_file": (["--output", "{file}"], ["--output", "exists and is not a directory"]),
    "output_bucket_missing": (["--output", "s3://no-such-bucket/out/", "--s3-endpoint", "{endpoint}",
                               "--s3-key", S3_KEY, "--s3-secret", S3_SECRET], ["--output s3://no-such-bucket/out/",
                                                                               "not writable"]),
    "batch_size_0": (["--batch-size", "0"], ["--batch-size must be >= 1 (got 0)"]),
    "max_new_tokens_0": (["--max-new-tokens", "0"], ["--max-new-tokens must be >= 1 (got 0)"]),
    "max_new_tokens_above_context": (["--max-new-tokens", "5000"], ["--max-new-tokens 5000", "context of 1024"]),
    "top_p_above_1": (["--top-p", "1.5"], ["--top-p must be in (0, 1] (got 1.5)"]),
    "replicas_min_above_max": (["--replicas", "3,1"], ["--replicas '3,1'", "MIN <= MAX"]),
    "prompt_without_image": (["--prompt", "Describe this picture."], ["--prompt", "<image>"]),
    "missing_input": (["--input", "{missing}"], ["--input", "no such file or directory"]),
}


@pytest.fixture(scope="module")
def invalid_runs(tmp_path_factory, tiny_ckpt, caption_data, moto_s3):
    """Run every invalid case as `python jobs/caption.py ...` at once (3 at a time); results by name."""
    work = tmp_path_factory.mktemp("invalid")
    files, _ = caption_data
    endpoint, _ = moto_s3
    subs = {"file": str(work / "a_file"), "missing": str(work / "no_such_input"), "endpoint": endpoint}
    (work / "a_file").write_text("not a folder")
    for name, drop in (("nosafetensors", "model.safetensors"), ("notokenizer", "tokenizer.json")):
        shutil.copytree(tiny_ckpt, work / name)
        (work / name / drop).unlink()
        subs[name] = str(work / name)

    def run(name: str) -> dict:
        flags, _ = INVALID[name]
        # Default output: a folder whose parents do not exist either; none of them may be left behind.
        args = {"--model": str(tiny_ckpt), "--input": str(files[0].parent),
                "--output": str(work / name / "nested" / "out"), "--device": "cpu"}
        extra = [f.format(**subs) for f in flags]
        args.update(zip(extra[::2], extra[1::2]))  # flag/value pairs replace the defaults
        argv = [a for kv in args.items() for a in kv]
        ray_tmp = short_tmpdir("ri")
        try:
            proc = subprocess.run([sys.executable, str(JOB), *argv], cwd=REPO, capture_output=True, text=True,
                                  timeout=180, env={**job_env(), "RAY_TMPDIR": ray_tmp})
            return {"rc": proc.returncode, "stderr": proc.stderr, "stdout": proc.stdout,
                    "ray_started": bool(list(Path(ray_tmp).iterdir())), "work": work}
        finally:
            shutil.rmtree(ray_tmp, ignore_errors=True)

    with ThreadPoolExecutor(max_workers=3) as pool:
        return dict(zip(INVALID, pool.map(run, INVALID)))


@pytest.mark.parametrize("case", list(INVALID))
def test_invalid_flags_exit_2_and_write_nothing(invalid_runs, case):
    result = invalid_runs[case]
    _, fragments = INVALID[case]
    assert result["rc"] == 2, (result["rc"], result["stderr"][-3000:])
    message = result["stderr"].strip().splitlines()[-1]
    assert message.startswith("error: "), result["stderr"][-3000:]
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    assert "Traceback" not in result["stderr"]
    assert S3_SECRET not in result["stderr"] + result["stdout"]
    assert not result["ray_started"], "the job must fail before starting Ray"
    work: Path = result["work"]
    assert not (work / case).exists(), f"left behind: {list((work / case).rglob('*'))}"
    assert sorted(p.name for p in work.iterdir()) == ["a_file", "nosafetensors", "notokenizer"]
    assert (work / "a_file").read_text() == "not a folder"


# -- 4. a model that passes the up-front checks but cannot load in the generate actor ----------------------


def test_a_model_that_fails_to_load_in_the_actor_fails_the_job(tiny_ckpt, caption_data, tmp_path):
    """The driver checks the model folder (config, weight files, tokenizer) but never reads every tensor,
    so a weight file missing a tensor only fails inside the generate actor's constructor, as a folder
    that differs on a worker node would. The job must then exit with that cause, not wait for an actor
    that can never start."""
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(tiny_ckpt, broken)
    tensors = load_file(broken / "model.safetensors")
    del tensors["lm_head.weight"]
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    files, _ = caption_data
    out = tmp_path / "out"
    args = ["--model", broken, "--input", files[0].parent, "--output", out, "--device", "cpu",
            "--max-new-tokens", "4", "--batch-size", "4"]
    with JobProcess(args, tmp_path / "job.log") as job:
        rc = job.wait(timeout=240)
        log = job.log()
    assert rc == 1, log[-6000:]
    last = log.strip().splitlines()[-1]
    assert last.startswith("error: the generate stage could not start"), log[-6000:]
    assert "missing tensor(s) lm_head.weight" in last and str(broken) in last, last
    assert not list(out.glob("part-*.parquet")) and not list(out.glob(".tmp-*"))
