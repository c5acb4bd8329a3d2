"""Offline VQA evaluation: the caption pipeline with a question in the prompt, scored as rows are written.

`run_vqa_eval` checks the VQA flags and the input schema, runs `run_caption_job` (same stages, same
commit units and resume) with a transform that scores each batch before it is written, then reads the
committed predictions back to write `summary.json` and `report.md`. `--score-only` re-scores existing
predictions with `score_predictions` and never imports Ray or loads a model.

Output layout under --output:
    predictions/   Parquet: id, question, prediction, normalized_prediction, score, error, answers,
                   group columns, then the caption job's columns (finish_reason, token counts, model)
    summary.json   metric, overall and per-group scores (percent), n, n_errors, settings, wall time,
                   VQ encodings done and saved by the image cache
    report.md      the same as readable tables
"""

from __future__ import annotations

import argparse
import io
import json
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.options import IMAGE_PLACEHOLDER, CaptionOptions, OptionsError, check_output_writable
from pipeline.stages import error_type
from pipeline.storage import (
    StorageError,
    StorageOptions,
    fs_path,
    is_remote,
    list_parquet_inputs,
    write_whole_file,
)
from pipeline.vqa_metrics import METRICS, VQA_NORMALIZATIONS, aggregate, parse_answers, score_prediction

DEFAULT_TEMPLATE = "<image>{question}\nAnswer the question using a single word or phrase."
QUESTION_FIELD = "{question}"
DEFAULT_MAX_NEW_TOKENS = 10
# Grouping columns used whenever the input has them (the VQAv2 annotations do).
AUTO_GROUPS = ("question_type", "answer_type")
PREDICTIONS_DIR, SUMMARY_JSON, REPORT_MD = "predictions", "summary.json", "report.md"
# Columns of the predictions files that scoring writes.
QUESTION, PREDICTION, NORMALIZED, SCORE, ERROR, ANSWERS = (
    "question", "prediction", "normalized_prediction", "score", "error", "answers")
SETTINGS_KEY = b"chameleon.settings"


@dataclass(frozen=True)
class ScoringSettings:
    metric: str = "vqa"
    # Only meaningful for --metric vqa; None means the default (official) there.
    vqa_normalization: str | None = None

    @property
    def normalization(self) -> str:
        return self.vqa_normalization or "official"

    def describe(self) -> dict[str, Any]:
        if self.metric == "vqa":
            return {"metric": "vqa", "vqa_normalization": self.normalization}
        return {"metric": self.metric}

    def label(self) -> str:
        return f"vqa ({self.normalization} normalization)" if self.metric == "vqa" else self.metric


@dataclass(frozen=True)
class VQAOptions:
    output: str
    scoring: ScoringSettings = field(default_factory=ScoringSettings)
    question_column: str = QUESTION
    answers_column: str = ANSWERS
    group_by: tuple[str, ...] = ()
    # The model run (its `output` is replaced by <output>/predictions); None with `score_only`.
    inference: CaptionOptions | None = None
    # Predictions to re-score without running the model: a Parquet file or folder.
    score_only: str | None = None
    storage: StorageOptions = field(default_factory=StorageOptions)
    force: bool = False


# -- flags -----------------------------------------------------------------------------------------------


def add_vqa_flags(parser: argparse.ArgumentParser) -> None:
    vqa = parser.add_argument_group("VQA")
    vqa.add_argument("--question-column", default=QUESTION,
                     help="question text column; fills {question} in --prompt-template (default: question)")
    vqa.add_argument("--answers-column", default=ANSWERS,
                     help="reference answers: a list of strings, the VQAv2 list of {answer, answer_confidence, "
                          "answer_id} structs, or one string (default: answers)")
    vqa.add_argument("--question-id-column", default=None, metavar="COL",
                     help="question id column (e.g. question_id); overrides --id-column; without either, ids "
                          "are '<file name>:<row index>'")
    vqa.add_argument("--group-by", nargs="*", default=[], metavar="COL",
                     help="columns to report per-value scores for, besides question_type and answer_type "
                          "(used automatically when present)")
    vqa.add_argument("--metric", default="vqa", choices=sorted(METRICS),
                     help="vqa = VQAv2 accuracy (min(#matching humans / 3, 1), leave-one-out averaged); exact "
                          "= case/space-insensitive match; anls = normalized Levenshtein similarity (DocVQA); "
                          "relaxed = numbers within 5%% else exact (ChartQA) (default: vqa)")
    vqa.add_argument("--vqa-normalization", default=None, choices=list(VQA_NORMALIZATIONS),
                     help="with --metric vqa: official = the VQAv2 evaluator (prediction normalized, human "
                          "answers only punctuation-processed); lmms = lmms-eval style, the same full "
                          "normalization on both sides (default: official)")
    vqa.add_argument("--score-only", default=None, metavar="PREDICTIONS",
                     help="re-score existing predictions (a Parquet file or folder with 'prediction' and "
                          "answers columns) without running the model or starting Ray; writes summary.json, "
                          "report.md and predictions/ under --output")


def vqa_options_from_args(args: argparse.Namespace) -> VQAOptions:
    """VQAOptions from the flags of jobs/vqa_eval.py (the shared flags plus `add_vqa_flags`)."""
    from pipeline.cli import options_from_args

    if not args.output:
        raise OptionsError("missing required flag(s): --output")
    storage = StorageOptions.from_env(args.s3_endpoint, args.s3_key, args.s3_secret, args.s3_region)
    common = dict(
        output=args.output, scoring=ScoringSettings(args.metric, args.vqa_normalization),
        question_column=args.question_column, answers_column=args.answers_column,
        group_by=tuple(args.group_by), storage=storage, force=args.force,
    )
    if args.score_only:
        given = [flag for flag, value in (("--input", args.input), ("--model", args.model)) if value]
        if given:
            raise OptionsError(f"--score-only re-scores existing predictions; do not pass {', '.join(given)}")
        return VQAOptions(score_only=args.score_only, **common)
    id_column = args.question_id_column or args.id_column
    return VQAOptions(inference=options_from_args(args, id_column=id_column), **common)


# -- checks (exit code 2, before anything is written) ------------------------------------------------------


def check_scoring(scoring: ScoringSettings) -> None:
    if scoring.metric not in METRICS:
        raise OptionsError(f"--metric {scoring.metric!r}: choose one of {', '.join(sorted(METRICS))}")
    if scoring.vqa_normalization is not None:
        if scoring.vqa_normalization not in VQA_NORMALIZATIONS:
            raise OptionsError(f"--vqa-normalization {scoring.vqa_normalization!r}: choose one of "
                               f"{', '.join(VQA_NORMALIZATIONS)}")
        if scoring.metric != "vqa":
            raise OptionsError(f"--vqa-normalization applies to --metric vqa only (got --metric {scoring.metric})")


def check_template(template: str) -> None:
    missing = [part for part in (QUESTION_FIELD, IMAGE_PLACEHOLDER) if part not in template]
    if missing:
        raise OptionsError(f"--prompt-template {template!r}: must contain {' and '.join(missing)}")


def _is_text(typ: pa.DataType) -> bool:
    return pa.types.is_string(typ) or pa.types.is_large_string(typ)


def check_answers_type(typ: pa.DataType, flag: str, source: str) -> None:
    """A string, a list of strings, or a list of structs with a string `answer` (VQAv2)."""
    ok = _is_text(typ)
    if pa.types.is_list(typ) or pa.types.is_large_list(typ):
        item = typ.value_type
        ok = _is_text(item) or (pa.types.is_struct(item) and item.get_field_index("answer") >= 0
                                and _is_text(item.field("answer").type))
    if not ok:
        raise OptionsError(f"{flag}: column type {typ} in {source} is not supported; expected a string, a list "
                           "of strings, or a list of {answer, ...} structs")


def _check_present(columns: list[str], wanted: dict[str, list[str]], source: str) -> None:
    for flag, names in wanted.items():
        missing = [c for c in names if c not in columns]
        if missing:
            raise OptionsError(f"{flag}: column(s) {', '.join(missing)} not found in {source}; available "
                               f"columns: {', '.join(columns)}")


def _list_inputs(uris: list[str], storage: StorageOptions, flag: str) -> list[str]:
    try:
        return list_parquet_inputs(uris, storage)
    except StorageError as exc:
        raise OptionsError(str(exc).replace("--input", flag, 1)) from None


def _schema(uri: str, storage: StorageOptions) -> pa.Schema:
    from pipeline.units import read_footer

    try:
        return read_footer(uri, storage)[1]
    except StorageError as exc:
        raise OptionsError(str(exc)) from None


def group_columns(columns: list[str], group_by: tuple[str, ...]) -> list[str]:
    """question_type/answer_type when present, then the --group-by columns, each once."""
    auto = [c for c in AUTO_GROUPS if c in columns]
    return list(dict.fromkeys([*auto, *group_by]))


def check_inputs(options: VQAOptions, uris: list[str], question_column: str | None) -> list[str]:
    """Check every input has the VQA columns and the first one's answers type; return the group columns."""
    from pipeline.units import describe_inputs

    try:
        files = describe_inputs(uris, options.storage)
    except StorageError as exc:
        raise OptionsError(str(exc)) from None
    groups = group_columns(list(files[0].columns), options.group_by)
    for f in files:
        wanted = {"--answers-column": [options.answers_column], "--group-by": list(options.group_by)}
        if question_column:
            wanted = {"--question-column": [question_column], **wanted}
        _check_present(list(f.columns), wanted, f.uri)
        missing_auto = [g for g in groups if g not in f.columns]
        if missing_auto:
            raise OptionsError(f"group column(s) {', '.join(missing_auto)} are in {files[0].uri} but not in {f.uri}")
    schema = _schema(files[0].uri, options.storage)
    check_answers_type(schema.field(options.answers_column).type, "--answers-column", files[0].uri)
    return groups


# -- scoring -------------------------------------------------------------------------------------------


def score_rows(predictions: list[str | None], errors: list[str | None], answers: list[Any],
               scoring: ScoringSettings) -> dict[str, list]:
    """Score, normalized prediction, parsed answers and error per row.

    A row whose inference failed (an error, or no prediction) scores 0; so does a row whose answers
    cannot be parsed, which gets an AnswerError. Failed rows stay in every average.
    """
    out: dict[str, list] = {SCORE: [], NORMALIZED: [], ANSWERS: [], ERROR: []}
    for prediction, error, raw in zip(predictions, errors, answers):
        try:
            parsed: list[str] | None = parse_answers(raw)
        except ValueError as exc:
            parsed, error = None, error or f"AnswerError: {exc}"
        if error is None and prediction is None:
            error = "MissingPrediction: the row has no prediction"
        score, normalized = 0.0, None
        if error is None:
            score, normalized = score_prediction(scoring.metric, prediction, parsed, scoring.normalization)
        out[SCORE].append(float(score))
        out[NORMALIZED].append(normalized)
        out[ANSWERS].append(parsed)
        out[ERROR].append(error)
    return out


def _set(table: pa.Table, name: str, values: pa.Array) -> pa.Table:
    index = table.schema.get_field_index(name)
    if index < 0:
        return table.append_column(name, values)
    return table.set_column(index, name, values)


def _as_text(values: list[Any]) -> list[str | None]:
    return [None if v is None else str(v) for v in values]


def apply_scores(table: pa.Table, predictions: list[str | None], answers_column: str,
                 scoring: ScoringSettings) -> pa.Table:
    """`table` with prediction, normalized_prediction, score, error and answers (list of strings) set."""
    errors = table.column(ERROR).to_pylist() if ERROR in table.column_names else [None] * table.num_rows
    scored = score_rows(predictions, errors, table.column(answers_column).to_pylist(), scoring)
    for name, values in ((PREDICTION, pa.array(predictions, pa.string())),
                         (NORMALIZED, pa.array(scored[NORMALIZED], pa.string())),
                         (SCORE, pa.array(scored[SCORE], pa.float64())),
                         (ERROR, pa.array(scored[ERROR], pa.string())),
                         (ANSWERS, pa.array(scored[ANSWERS], pa.list_(pa.string())))):
        table = _set(table, name, values)
    return table


@dataclass(frozen=True)
class PipelineScorer:
    """The transform and output schema handed to `run_caption_job`: caption -> scored prediction."""

    question_column: str
    answers_column: str
    groups: tuple[str, ...]
    scoring: ScoringSettings

    def __call__(self, batch: pa.Table) -> pa.Table:
        batch = apply_scores(batch, batch.column("caption").to_pylist(), self.answers_column, self.scoring)
        questions = _as_text(batch.column(self.question_column).to_pylist())
        return _set(batch, QUESTION, pa.array(questions, pa.string()))

    def schema(self, base: pa.Schema) -> pa.Schema:
        """The predictions columns first, then the caption job's own (without caption, which is
        `prediction` here) and any other kept columns."""
        head = [base.field(0),  # the id column
                pa.field(QUESTION, pa.string()), pa.field(PREDICTION, pa.string()),
                pa.field(NORMALIZED, pa.string()), pa.field(SCORE, pa.float64()),
                pa.field(ERROR, pa.string()), pa.field(ANSWERS, pa.list_(pa.string()))]
        head += [base.field(g) for g in self.groups if g != head[0].name]
        taken = {f.name for f in head} | {"caption", self.question_column, self.answers_column}
        return pa.schema(head + [f for f in base if f.name not in taken])


# -- reading and writing -------------------------------------------------------------------------------


def _join(root: str, name: str) -> str:
    return f"{root.rstrip('/')}/{name}"


def read_predictions(uris: list[str], storage: StorageOptions,
                     columns: list[str] | None = None) -> tuple[pa.Table, dict[str, Any]]:
    """All rows of `uris` (in order) and the chameleon settings stored in the first file, if any."""
    tables, settings = [], {}
    for uri in uris:
        # By path through the filesystem (pyarrow's dataset reader), not ParquetFile on an open file
        # object: with pyarrow 26 the latter makes the process abort at exit now and then
        # ("terminate called without an active exception", apache/arrow#34314).
        table = pq.read_table(fs_path(uri), columns=columns, filesystem=storage.filesystem(uri))
        if not tables and table.schema.metadata and SETTINGS_KEY in table.schema.metadata:
            settings = json.loads(table.schema.metadata[SETTINGS_KEY])
        tables.append(table.replace_schema_metadata(None))
    return pa.concat_tables(tables, promote_options="permissive"), settings


def _write(storage: StorageOptions, uri: str, data: bytes) -> None:
    path, remote = fs_path(uri), is_remote(uri)
    if not remote:
        os.makedirs(os.path.dirname(path), exist_ok=True)
    write_whole_file(storage.filesystem(uri), path, data, remote)


def _parquet_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


def _cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def format_report(summary: dict[str, Any]) -> str:
    """report.md: the headline numbers, then one table overall and one per group column."""
    model = summary.get("model") or {}
    gen = summary.get("generation") or {}
    errors = ", ".join(f"{k}: {v}" for k, v in summary["errors_by_type"].items())
    lines = [
        "# VQA evaluation", "",
        f"- metric: {summary['metric_label']}",
        f"- model: {model.get('name', 'unknown')}"
        + (f" (sha256 {model['sha256']})" if model.get("sha256") else ""),
        f"- generation: max_new_tokens {gen.get('max_new_tokens', '?')}, temperature {gen.get('temperature', '?')}"
        if gen else "- generation: unknown (predictions without settings)",
        f"- questions: {summary['n']}; failed (scored 0): {summary['n_errors']}" + (f" ({errors})" if errors else ""),
        f"- mode: {summary['mode']}; wall time {summary['wall_time_s']:.1f} s",
    ]
    if summary.get("vq_encodings") is not None:
        lines.append(f"- VQ encodings: {summary['vq_encodings']}, saved by the image cache: "
                     f"{summary['vq_encodings_saved']}")
    lines += ["", "Scores are percentages (mean per-question score x 100); failed rows count as 0.", "",
              "| | n | score |", "|---|---:|---:|", f"| **overall** | {summary['n']} | **{summary['overall']:.2f}** |"]
    for column, values in summary["groups"].items():
        lines += ["", f"## by {column}", "", f"| {_cell(column)} | n | score |", "|---|---:|---:|"]
        lines += [f"| {_cell(value)} | {entry['n']} | {entry['score']:.2f} |" for value, entry in values.items()]
    return "\n".join(lines) + "\n"


def build_summary(table: pa.Table, groups: list[str], scoring: ScoringSettings,
                  context: dict[str, Any]) -> dict[str, Any]:
    """Overall and per-group percentages (vqa_metrics.aggregate), error counts, and `context`."""
    scores = table.column(SCORE).to_pylist()
    group_rows = None
    if groups:
        values = {g: table.column(g).to_pylist() for g in groups}
        # Group values are reported as text; a missing value is its own group.
        group_rows = [{g: "(none)" if values[g][i] is None else str(values[g][i]) for g in groups}
                      for i in range(table.num_rows)]
    result = aggregate(scores, group_rows)
    errors = Counter(error_type(e) for e in table.column(ERROR).to_pylist() if e)
    return {
        **scoring.describe(), "metric_label": scoring.label(), "score_scale": "percent",
        "overall": result["overall"], "n": result["n"], "n_errors": sum(errors.values()),
        "errors_by_type": dict(errors.most_common()), "groups": result["groups"], **context,
    }


def write_results(options: VQAOptions, summary: dict[str, Any]) -> None:
    _write(options.storage, _join(options.output, SUMMARY_JSON),
           json.dumps(summary, indent=2, sort_keys=True).encode())
    _write(options.storage, _join(options.output, REPORT_MD), format_report(summary).encode())


# -- the two modes ------------------------------------------------------------------------------------------


def run_vqa_eval(options: VQAOptions, log: Callable[[str], None] | None = None,
                 num_cpus: int | None = None) -> dict[str, Any]:
    """Run the model over the questions (or only re-score, with `score_only`); returns the summary.

    Raises OptionsError (exit code 2) before anything is written when a flag or the input is invalid.
    """
    check_scoring(options.scoring)
    if options.score_only:
        return score_predictions(options)
    if options.inference is None:
        raise OptionsError("nothing to evaluate: give the model run (--input, --model) or --score-only")
    return _run_model(options, log, num_cpus)


def _run_model(options: VQAOptions, log: Callable[[str], None] | None, num_cpus: int | None) -> dict[str, Any]:
    from pipeline.caption import run_caption_job

    started = time.perf_counter()
    base = options.inference
    check_template(base.prompt)
    # The input is listed again by run_caption_job; footers are small, and these checks must come first.
    uris = _list_inputs(list(base.inputs), base.storage, "--input")
    groups = check_inputs(options, uris, options.question_column)
    question = options.question_column
    keep = (*base.keep_columns, question, options.answers_column, *groups)
    caption_options = replace(
        base,
        output=_join(options.output, PREDICTIONS_DIR),
        # The template names {question}; the preprocessing stage fills {<column>} from that column.
        prompt=base.prompt.replace(QUESTION_FIELD, "{" + question + "}"),
        prompt_column=None,
        template_columns=(question,),
        keep_columns=tuple(dict.fromkeys(c for c in keep if c != base.id_column)),
    )
    scorer = PipelineScorer(question, options.answers_column, tuple(groups), options.scoring)
    kwargs = {"log": log} if log is not None else {}
    run = run_caption_job(caption_options, transform=scorer, num_cpus=num_cpus, output_fields=scorer.schema,
                          extra_settings={"vqa": options.scoring.describe()}, **kwargs)
    # Scores come from the committed files, so a resumed run reports every row, not only this run's.
    table, _ = read_predictions(_list_inputs([caption_options.output], options.storage, "--output"),
                                options.storage, [SCORE, ERROR, *groups])
    settings = caption_options.job_settings()
    summary = build_summary(table, groups, options.scoring, {
        "mode": "run",
        "model": settings["model"],
        "generation": settings["generation"],
        "prompt_template": base.prompt,
        "predictions": caption_options.output,
        "wall_time_s": round(time.perf_counter() - started, 3),
        # VQ work of this run (a resumed run counts only the rows it processed).
        "vq_encodings": run["vq_encodings"],
        "vq_encodings_saved": run["vq_encodings_saved"],
        "inference": run,
    })
    write_results(options, summary)
    return summary


def score_predictions(options: VQAOptions) -> dict[str, Any]:
    """Re-score a predictions file or folder into --output; no model and no Ray."""
    started = time.perf_counter()
    check_scoring(options.scoring)
    uris = _list_inputs([options.score_only], options.storage, "--score-only")
    groups = check_inputs(options, uris, None)
    schema = _schema(uris[0], options.storage)
    _check_present(schema.names, {"--score-only": [PREDICTION]}, uris[0])
    target = _join(options.output, PREDICTIONS_DIR)
    _check_target(options, uris, target)

    table, settings = read_predictions(uris, options.storage)
    table = apply_scores(table, table.column(PREDICTION).to_pylist(), options.answers_column, options.scoring)
    if settings:
        settings = {**settings, "vqa": options.scoring.describe()}
        table = table.replace_schema_metadata({SETTINGS_KEY: json.dumps(settings, sort_keys=True).encode()})
    summary = build_summary(table, groups, options.scoring, {
        "mode": "score-only",
        "scored_from": uris,
        "model": settings.get("model"),
        "generation": settings.get("generation"),
        "prompt_template": settings.get("prompt"),
        "predictions": target,
        "wall_time_s": round(time.perf_counter() - started, 3),
        "vq_encodings": None,  # no model ran
        "vq_encodings_saved": None,
    })
    if options.force:
        _clear_parts(options.storage, target)
    _write(options.storage, _join(target, "part-000000.parquet"), _parquet_bytes(table))
    write_results(options, summary)
    return summary


def _check_target(options: VQAOptions, uris: list[str], target: str) -> None:
    """--output is writable, does not hold the predictions being read, and has no other predictions."""
    check_output_writable(CaptionOptions(inputs=(), output=options.output, model="", storage=options.storage))
    root = fs_path(target).rstrip("/") + "/"
    if any(fs_path(u).startswith(root) for u in uris):
        raise OptionsError(f"--score-only {options.score_only} is inside --output {options.output}/{PREDICTIONS_DIR}; "
                           "choose another --output")
    fs = options.storage.filesystem(target)
    existing = [p for p in (fs.ls(fs_path(target), detail=False) if fs.exists(fs_path(target)) else [])
                if str(p).endswith(".parquet")]
    if existing and not options.force:
        raise OptionsError(f"--output {options.output}: {PREDICTIONS_DIR}/ already holds predictions; use another "
                           "--output, or --force to replace them")


def _clear_parts(storage: StorageOptions, target: str) -> None:
    fs = storage.filesystem(target)
    path = fs_path(target)
    if fs.exists(path):
        for p in fs.ls(path, detail=False):
            name = os.path.basename(str(p).rstrip("/"))
            if name.endswith(".parquet") or name in ("_manifest.json", "_summary.json"):
                fs.rm(p)


def format_result(summary: dict[str, Any]) -> str:
    """The line the job prints at the end."""
    line = (f"{summary['metric_label']}: {summary['overall']:.2f} over {summary['n']} questions "
            f"({summary['n_errors']} failed, scored 0); wall {summary['wall_time_s']:.1f}s")
    if summary.get("vq_encodings") is not None:
        line += f"; VQ encodings {summary['vq_encodings']}, saved {summary['vq_encodings_saved']}"
    return line
