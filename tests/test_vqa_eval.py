"""VQA evaluation (pipeline/vqa.py, jobs/vqa_eval.py): end to end on the tiny checkpoint, exact re-scoring
of known predictions, the VQ encoding cache counted in the summary, and invalid flags exiting with 2."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from datasets import skimage_dir

from pipeline import CaptionOptions, GenerationSettings
from pipeline.cli import EXIT_BAD_INPUT, exit_on_bad_input
from pipeline.options import OptionsError
from pipeline.vqa import ScoringSettings, VQAOptions, run_vqa_eval, score_rows
from pipeline.vqa_metrics import score_prediction

REPO = Path(__file__).resolve().parent.parent
JOB = REPO / "jobs" / "vqa_eval.py"
IMAGES = ["astronaut.png", "coffee.png", "camera.png", "rocket.jpg"]
ANSWER = pa.struct([("answer", pa.string()), ("answer_confidence", pa.string()), ("answer_id", pa.int64())])


def _vqav2_answers(words: list[str]) -> list[dict]:
    return [{"answer": w, "answer_confidence": "yes", "answer_id": k + 1} for k, w in enumerate(words)]


def write_vqa_dataset(path: Path) -> Path:
    """4 real images x 3 questions (VQAv2 answer structs, question/answer types) + 1 corrupt image row."""
    questions = [("Is there a person?", "is there a", "yes/no", ["yes"] * 10),
                 ("How many objects are there?", "how many", "number", ["2"] * 6 + ["3"] * 4),
                 ("What color is it?", "what color is the", "other", ["red"] * 5 + ["blue"] * 5)]
    rows = []
    for i, name in enumerate(IMAGES):
        data = (skimage_dir() / name).read_bytes()
        for j, (text, qtype, atype, answers) in enumerate(questions):
            rows.append(dict(question_id=100 * i + j, image=data, question=f"{text} ({name})",
                             question_type=qtype, answer_type=atype, answers=_vqav2_answers(answers)))
    rows.append(dict(question_id=999, image=b"\x89PNG this is not an image", question="What is this?",
                     question_type="what is the", answer_type="other", answers=_vqav2_answers(["noise"] * 10)))
    table = pa.table({
        "question_id": pa.array([r["question_id"] for r in rows], pa.int64()),
        "image": pa.array([r["image"] for r in rows], pa.binary()),
        "question": [r["question"] for r in rows],
        "question_type": [r["question_type"] for r in rows],
        "answer_type": [r["answer_type"] for r in rows],
        "answers": pa.array([r["answers"] for r in rows], pa.list_(ANSWER)),
    })
    pq.write_table(table, path, row_group_size=5)
    return path


def _inference(tiny_ckpt, inputs, **kw) -> CaptionOptions:
    base = dict(inputs=tuple(str(p) for p in inputs), output="unused", model=str(tiny_ckpt),
                prompt="<image>{question}\nAnswer the question using a single word or phrase.",
                generation=GenerationSettings(max_new_tokens=6), batch_size=4, rows_per_file=5, device="cpu",
                cpu_workers=(1, 1), id_column="question_id")
    base.update(kw)
    return CaptionOptions(**base)


@pytest.fixture(scope="module")
def vqa_data(tmp_path_factory) -> Path:
    return write_vqa_dataset(tmp_path_factory.mktemp("vqa_data") / "vqa.parquet")


def _job_module():
    spec = importlib.util.spec_from_file_location("vqa_eval_job", JOB)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -- 1. end to end through the real pipeline ---------------------------------------------------------------


@pytest.mark.slow
def test_end_to_end_every_question_once_scored_and_summarised(ray_local, tiny_ckpt, vqa_data, tmp_path):
    out = tmp_path / "eval"
    options = VQAOptions(output=str(out), inference=_inference(tiny_ckpt, [vqa_data]))
    summary = run_vqa_eval(options, log=lambda m: None)

    source = pq.read_table(vqa_data).to_pylist()
    table = pq.read_table(out / "predictions")
    rows = {r["question_id"]: r for r in table.to_pylist()}
    assert table.num_rows == len(source) == 13 and len(rows) == 13, "each question exactly once"
    assert table.column_names[:9] == ["question_id", "question", "prediction", "normalized_prediction", "score",
                                      "error", "answers", "question_type", "answer_type"]
    for raw in source:
        row = rows[raw["question_id"]]
        assert row["question"] == raw["question"]
        assert row["answers"] == [a["answer"] for a in raw["answers"]]
        assert 0.0 <= row["score"] <= 1.0
        if raw["question_id"] == 999:
            assert row["error"].startswith("ImageDecodeError:") and row["prediction"] is None
            assert row["score"] == 0.0
        else:
            assert row["error"] is None and isinstance(row["prediction"], str)
            # The transform scored exactly what vqa_metrics gives for this prediction and these answers.
            expected = score_prediction("vqa", row["prediction"], row["answers"])
            assert (row["score"], row["normalized_prediction"]) == expected

    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    assert summary["metric"] == "vqa" and summary["vqa_normalization"] == "official"
    assert summary["n"] == 13 and summary["n_errors"] == 1 and summary["errors_by_type"] == {"ImageDecodeError": 1}
    mean = sum(r["score"] for r in rows.values()) / 13
    assert summary["overall"] == round(100 * mean, 2)
    assert summary["groups"]["answer_type"]["yes/no"]["n"] == 4
    assert sum(g["n"] for g in summary["groups"]["question_type"].values()) == 13
    assert summary["generation"]["max_new_tokens"] == 6 and summary["model"]["name"] == Path(tiny_ckpt).name
    assert summary["wall_time_s"] > 0
    # 4 images, each asked 3 questions: encoded once each, the other 8 uses come from the cache.
    assert (summary["vq_encodings"], summary["vq_encodings_saved"]) == (4, 8)
    assert summary["inference"]["rows_out"] == 13

    report = (out / "report.md").read_text()
    assert f"| **overall** | 13 | **{summary['overall']:.2f}** |" in report
    assert "## by answer_type" in report and "## by question_type" in report
    assert "failed (scored 0): 1 (ImageDecodeError: 1)" in report
    settings = json.loads(pq.read_schema(next((out / "predictions").glob("part-*.parquet"))).metadata[
        b"chameleon.settings"])
    assert settings["vqa"] == {"metric": "vqa", "vqa_normalization": "official"}

    # Re-scoring the run's own predictions keeps its model and generation settings in the summary.
    rescored = run_vqa_eval(VQAOptions(output=str(tmp_path / "exact"), score_only=str(out / "predictions"),
                                       scoring=ScoringSettings("exact")))
    assert rescored["model"]["name"] == Path(tiny_ckpt).name and rescored["generation"]["max_new_tokens"] == 6
    assert rescored["n"] == 13 and rescored["n_errors"] == 1
    assert rescored["groups"]["answer_type"]["other"]["n"] == 5


@pytest.mark.slow
def test_an_image_asked_five_questions_is_vq_encoded_once(ray_local, tiny_ckpt, skimage_data, tmp_path):
    data = (skimage_data / "chelsea.png").read_bytes()
    path = tmp_path / "one_image.parquet"
    pq.write_table(pa.table({
        "id": [f"q{k}" for k in range(5)],
        "image": [data] * 5,
        "question": [f"Question number {k}?" for k in range(5)],
        "answers": [["cat"]] * 5,
    }), path)
    # batch_size 2 and no sort window: the replica gets the 5 rows as 3 batches (2, 2, 1), so the
    # cache is hit both within a batch and across batches. One replica, so one cache.
    inference = _inference(tiny_ckpt, [path], id_column="id", batch_size=2, sort_window=1, replicas=(1, 1))
    cached = run_vqa_eval(VQAOptions(output=str(tmp_path / "cached"), inference=inference), log=lambda m: None)
    assert (cached["vq_encodings"], cached["vq_encodings_saved"]) == (1, 4)
    assert cached["inference"]["vq_encodings"] == 1, "the caption summary carries the counter too"

    uncached = run_vqa_eval(VQAOptions(output=str(tmp_path / "uncached"),
                                       inference=replace(inference, vq_cache_size=0)), log=lambda m: None)
    # No cache across batches: each of the 3 batches encodes its image once (the 2-row batches reuse it
    # for their second row) -> 3 encodings, 2 saved.
    assert (uncached["vq_encodings"], uncached["vq_encodings_saved"]) == (3, 2)
    a = {r["id"]: r["prediction"] for r in pq.read_table(tmp_path / "cached" / "predictions").to_pylist()}
    b = {r["id"]: r["prediction"] for r in pq.read_table(tmp_path / "uncached" / "predictions").to_pylist()}
    assert a == b and len(a) == 5, "the cache never changes a prediction"


# -- 2. re-scoring known predictions (no model, no Ray) --------------------------------------------------------


def write_known_predictions(path: Path) -> Path:
    pq.write_table(pa.table({
        "id": ["r1", "r2", "r3", "r4", "r5", "r6"],
        "prediction": ["yes", "2", "Two", None, "red", "a dog"],
        "error": [None, None, None, "ImageDecodeError: image: truncated", None, None],
        "answers": [["yes"] * 10, ["2"] * 2 + ["3"] * 8, ["two"] * 10, ["yes"] * 10,
                    ["red"] * 3 + ["blue"] * 7, ["dog"] * 10],
        "answer_type": ["yes/no", "number", "number", "yes/no", "other", "other"],
        "question_type": ["is the", "how many", "how many", "is the", "what color is the", "what is the"],
    }), path)
    return path


def test_score_only_gives_the_hand_computed_scores(tmp_path):
    preds = write_known_predictions(tmp_path / "known.parquet")
    out = tmp_path / "rescored"
    summary = run_vqa_eval(VQAOptions(output=str(out), score_only=str(preds)))
    # VQAv2 official, 10 answers: score = mean over the 10 leave-one-out subsets of min(1, matches / 3).
    # r1 "yes" vs 10 x "yes": 9 matches in every subset -> 1.0
    # r2 "2" vs 2 x "2" + 8 x "3": leaving out a "2" leaves 1 match (1/3), leaving out a "3" leaves 2 (2/3):
    #    (2 * 1/3 + 8 * 2/3) / 10 = 0.6
    # r3 "Two" -> normalized "2"; official compares the 10 identical answers raw ("two") -> 0 matches -> 0.0
    # r4 inference failed -> 0.0 (and counted as an error)
    # r5 "red" vs 3 x "red" + 7 x "blue": (3 * 2/3 + 7 * 3/3) / 10 = 0.9
    # r6 "a dog" -> "dog" (article dropped) vs 10 x "dog" -> 1.0
    scores = {r["id"]: r["score"] for r in pq.read_table(out / "predictions").to_pylist()}
    assert scores == pytest.approx({"r1": 1.0, "r2": 0.6, "r3": 0.0, "r4": 0.0, "r5": 0.9, "r6": 1.0})
    # overall (1 + 0.6 + 0 + 0 + 0.9 + 1) / 6 = 3.5 / 6 = 58.33 %
    assert summary["overall"] == 58.33 and summary["n"] == 6 and summary["n_errors"] == 1
    assert summary["errors_by_type"] == {"ImageDecodeError": 1}
    # yes/no (r1, r4): (1 + 0) / 2 = 50; number (r2, r3): (0.6 + 0) / 2 = 30; other (r5, r6): (0.9 + 1) / 2 = 95
    assert summary["groups"]["answer_type"] == {"yes/no": {"score": 50.0, "n": 2}, "number": {"score": 30.0, "n": 2},
                                                "other": {"score": 95.0, "n": 2}}
    assert summary["groups"]["question_type"] == {
        "is the": {"score": 50.0, "n": 2}, "how many": {"score": 30.0, "n": 2},
        "what color is the": {"score": 90.0, "n": 1}, "what is the": {"score": 100.0, "n": 1}}
    assert summary["mode"] == "score-only" and summary["vq_encodings"] is None
    assert json.loads((out / "summary.json").read_text())["overall"] == 58.33
    report = (out / "report.md").read_text()
    assert "| **overall** | 6 | **58.33** |" in report and "| number | 2 | 30.00 |" in report
    normalized = {r["id"]: r["normalized_prediction"] for r in pq.read_table(out / "predictions").to_pylist()}
    assert normalized == {"r1": "yes", "r2": "2", "r3": "2", "r4": None, "r5": "red", "r6": "dog"}

    # lmms normalizes the answers too: r3 "two" -> "2" now matches all 10 -> 1.0.
    # overall (1 + 0.6 + 1 + 0 + 0.9 + 1) / 6 = 4.5 / 6 = 75; number (0.6 + 1) / 2 = 80
    lmms = run_vqa_eval(VQAOptions(output=str(tmp_path / "lmms"), score_only=str(preds),
                                   scoring=ScoringSettings("vqa", "lmms")))
    assert lmms["overall"] == 75.0 and lmms["groups"]["answer_type"]["number"]["score"] == 80.0
    # exact (lowercase, collapse spaces): r1, r2, r3 ("two" == "two"), r5 match; r6 "a dog" != "dog" -> 4 / 6
    exact = run_vqa_eval(VQAOptions(output=str(tmp_path / "exact"), score_only=str(tmp_path / "rescored" /
                                                                                    "predictions"),
                                    scoring=ScoringSettings("exact")))
    assert exact["overall"] == 66.67 and exact["metric"] == "exact" and "vqa_normalization" not in exact


def test_score_only_does_not_import_ray(tmp_path):
    preds = write_known_predictions(tmp_path / "known.parquet")
    out = tmp_path / "out"
    code = ("import runpy, sys\n"
            "from pipeline.cli import exit_on_bad_input\n"
            f"job = runpy.run_path({str(JOB)!r}, run_name='vqa_eval')\n"
            f"argv = ['--score-only', {str(preds)!r}, '--output', {str(out)!r}]\n"
            "assert exit_on_bad_input(lambda: job['main'](argv)) == 0\n"
            "assert 'ray' not in sys.modules, 'score-only imported ray'\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "58.33" in proc.stdout
    assert (out / "summary.json").exists() and (out / "report.md").exists()


def test_answers_forms_and_failed_rows():
    scoring = ScoringSettings()
    scored = score_rows(
        ["yes", "yes", "yes", None, "yes"],
        [None, None, None, None, "GenerationError: boom"],
        ["yes", [{"answer": "yes", "answer_confidence": "yes", "answer_id": 1}], [1, 2], ["yes"], ["yes"]],
        scoring)
    # A single string is one answer (plain match); a one-struct list likewise; ints are not answers.
    assert scored["score"] == [1.0, 1.0, 0.0, 0.0, 0.0]
    assert scored["answers"][:2] == [["yes"], ["yes"]] and scored["answers"][2] is None
    assert scored["error"][2].startswith("AnswerError:")
    assert scored["error"][3].startswith("MissingPrediction:")
    assert scored["error"][4] == "GenerationError: boom"


# -- 3. invalid flags: exit 2, a message naming the problem, nothing written ---------------------------------


def _bad_cases(tiny_ckpt, vqa_data, tmp_path) -> list[tuple[list[str], str]]:
    run = ["--model", str(tiny_ckpt), "--input", str(vqa_data)]
    int_answers = tmp_path / "int_answers.parquet"
    pq.write_table(pa.table({"image": [b"x"], "question": ["q?"], "answers": [3]}), int_answers)
    no_prediction = tmp_path / "no_prediction.parquet"
    pq.write_table(pa.table({"answers": [["a"]]}), no_prediction)
    return [
        (run + ["--question-column", "query"], "--question-column: column(s) query not found"),
        (run + ["--answers-column", "gold"], "--answers-column: column(s) gold not found"),
        (run + ["--prompt-template", "<image>Describe it."], "must contain {question}"),
        (run + ["--prompt-template", "{question}"], "must contain <image>"),
        (run + ["--group-by", "split"], "--group-by: column(s) split not found"),
        (run + ["--metric", "exact", "--vqa-normalization", "lmms"], "applies to --metric vqa only"),
        (run + ["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
        (run + ["--vq-cache-size", "-1"], "--vq-cache-size must be >= 0"),
        (["--model", str(tiny_ckpt), "--input", str(int_answers)], "column type int64"),
        (["--input", str(vqa_data)], "missing required flag(s): --model"),
        (["--score-only", str(no_prediction)], "--score-only: column(s) prediction not found"),
        (["--score-only", str(vqa_data), "--model", str(tiny_ckpt)], "do not pass --model"),
        (["--score-only", str(tmp_path / "nowhere")], "no such file or directory"),
    ]


def test_invalid_flags_exit_2_with_a_message_and_write_nothing(tiny_ckpt, vqa_data, tmp_path, capsys):
    job = _job_module()
    for k, (argv, message) in enumerate(_bad_cases(tiny_ckpt, vqa_data, tmp_path)):
        out = tmp_path / f"out{k}" / "eval"
        code = exit_on_bad_input(lambda argv=argv, out=out: job.main([*argv, "--output", str(out)]))
        err = capsys.readouterr().err
        assert code == EXIT_BAD_INPUT, (argv, err)
        assert message in err, (argv, err)
        assert not (tmp_path / f"out{k}").exists(), f"{argv} wrote something"
    with pytest.raises(OptionsError, match="--metric 'bleu'"):
        run_vqa_eval(VQAOptions(output=str(tmp_path / "x"), score_only="p", scoring=ScoringSettings("bleu")))
    assert not (tmp_path / "x").exists()


def test_score_only_refuses_to_overwrite_its_input_or_other_predictions(tmp_path):
    preds = write_known_predictions(tmp_path / "known.parquet")
    run_vqa_eval(VQAOptions(output=str(tmp_path / "a"), score_only=str(preds)))
    with pytest.raises(OptionsError, match="inside --output"):
        run_vqa_eval(VQAOptions(output=str(tmp_path / "a"), score_only=str(tmp_path / "a" / "predictions")))
    with pytest.raises(OptionsError, match="already holds predictions"):
        run_vqa_eval(VQAOptions(output=str(tmp_path / "a"), score_only=str(preds)))
    again = run_vqa_eval(VQAOptions(output=str(tmp_path / "a"), score_only=str(preds), force=True))
    assert again["overall"] == 58.33


def _cli_env(tmp: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") and k != "RAY_ADDRESS"}
    env.update(RAY_AUTH_MODE="disabled", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0",
               RAY_TMPDIR=tmp, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    return env


def _kill_leftovers(session: int) -> None:
    """SIGKILL whatever the job's own session left running (its embedded Ray), nothing else."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == session and fields[0] != "Z":
            try:
                os.kill(int(entry), signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.mark.slow
def test_cli_runs_end_to_end_and_rejects_an_unknown_metric(tiny_ckpt, vqa_data, tmp_path):
    tmp = tempfile.mkdtemp(prefix="vqa", dir="/tmp")  # short: Ray's socket paths are limited to ~107 bytes
    bad = subprocess.run([sys.executable, str(JOB), "--model", str(tiny_ckpt), "--input", str(vqa_data),
                          "--output", str(tmp_path / "bad"), "--metric", "bleu"],
                         cwd=REPO, env=_cli_env(tmp), capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "invalid choice: 'bleu'" in bad.stderr
    assert not (tmp_path / "bad").exists()

    out = tmp_path / "cli"
    cmd = [sys.executable, str(JOB), "--model", str(tiny_ckpt), "--input", str(vqa_data), "--output", str(out),
           "--question-id-column", "question_id", "--max-new-tokens", "4", "--device", "cpu", "--cpu-workers", "1",
           "--vqa-normalization", "lmms", "--group-by", "question_type"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=_cli_env(tmp), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        _kill_leftovers(proc.pid)
    assert proc.returncode == 0, stderr[-3000:]
    assert "over 13 questions (1 failed, scored 0)" in stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["vqa_normalization"] == "lmms" and summary["generation"]["max_new_tokens"] == 4
    assert summary["n"] == 13 and summary["n_errors"] == 1 and (out / "report.md").exists()
    assert sorted(pq.read_table(out / "predictions").column("question_id").to_pylist()) == sorted(
        pq.read_table(vqa_data).column("question_id").to_pylist())
