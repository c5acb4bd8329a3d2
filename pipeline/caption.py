"""The caption job: Parquet in -> CPU preprocessing pool -> accelerator generation pool -> Parquet out.

`build_caption_dataset` is the reusable part (any Ray Data user can call it on their own dataset);
`run_caption_job` adds what a long batch job needs around it: validation before work, commit units,
resume, and a summary.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pyarrow as pa

from pipeline.options import CaptionOptions, OptionsError, check_columns, resolve_device, validate
from pipeline.stages import (
    NUM_IMAGES,
    T_GEN,
    T_PRE,
    VQ_ENCODED,
    VQ_REUSED,
    GenerateConfig,
    GenerateStage,
    PreprocessConfig,
    PreprocessStage,
    error_type,
)
from pipeline.storage import StorageError, list_parquet_inputs
from pipeline.units import describe_inputs, plan_reads, plan_units, read_task_dicts, read_tasks_batch
from pipeline.writer import SUMMARY, UnitWriter, output_schema

REPO_ROOT = Path(__file__).resolve().parent.parent


def ensure_ray(num_cpus: int | None = None) -> None:
    """Connect to the cluster the job was submitted to, or start a local one on loopback."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
        return
    pythonpath = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
    ray.init(
        address="local",  # an embedded cluster, never one that happens to run on this machine
        num_cpus=num_cpus,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        runtime_env={"env_vars": {"PYTHONPATH": pythonpath, "RAY_AUTH_MODE": "disabled"}},
    )


def _starts_local_ray() -> bool:
    """Whether `ensure_ray` would start an embedded cluster (no cluster to join, none connected)."""
    ray = sys.modules.get("ray")
    connected = ray is not None and hasattr(ray, "is_initialized") and ray.is_initialized()
    return not connected and not os.environ.get("RAY_ADDRESS")


def _local_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def gpus_per_node() -> list[float]:
    import ray

    return [n["Resources"].get("GPU", 0.0) for n in ray.nodes() if n.get("Alive")]


def _rank_resources(options: CaptionOptions) -> dict[str, float]:
    if options.resolved_device == "cuda":
        return {"num_gpus": 1, "num_cpus": 1}
    # CPU ranks: logical shares small enough that a 2-core laptop still has room for reading and
    # preprocessing (Ray Data deadlocks when actors hold every CPU and the read task gets none).
    return {"num_cpus": 1.0 if options.tp == 1 else 0.5}


class TPPlacement:
    """Scheduling for tensor-parallel replicas: one STRICT_PACK placement group of `tp` rank bundles each.

    Ray Data calls this for every replica it starts (restarts included). The groups belong to the
    driver, so they are recorded here and released when the job ends; a driver that builds its own
    pipeline with `build_caption_dataset` calls `release_placement_groups()` once it has consumed it.
    """

    def __init__(self, tp: int, bundle: dict[str, float]):
        resources = {"CPU": bundle.get("num_cpus", 0), "GPU": bundle.get("num_gpus", 0)}
        self.bundles = [{k: v for k, v in resources.items() if v}] * tp
        self.groups: list = []

    def __call__(self) -> dict[str, Any]:
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        pg = ray.util.placement_group(self.bundles, strategy="STRICT_PACK")
        self.groups.append(pg)
        return {"scheduling_strategy": PlacementGroupSchedulingStrategy(pg, placement_group_capture_child_tasks=True)}

    def release(self) -> None:
        import ray

        while self.groups:
            try:
                ray.util.remove_placement_group(self.groups.pop())
            except Exception:  # already gone with its cluster
                pass


_placements: list[TPPlacement] = []


def release_placement_groups() -> None:
    """Free the placement groups of tensor-parallel replicas started by `build_caption_dataset`."""
    while _placements:
        _placements.pop().release()


def preprocess_config(options: CaptionOptions) -> PreprocessConfig:
    return PreprocessConfig(
        model=options.model, id_column=options.id_column, image_column=options.image_column,
        prompt=options.prompt, prompt_column=options.prompt_column, template_columns=options.template_columns,
        text_completion=options.generation.text_completion, max_new_tokens=options.generation.max_new_tokens,
        storage=options.storage, allow_local_paths=options.allow_local_paths,
        max_image_pixels=options.max_image_pixels, max_image_bytes=options.max_image_bytes,
    )


def generate_config(options: CaptionOptions) -> GenerateConfig:
    return GenerateConfig(
        model=options.model, id_column=options.id_column, device=options.resolved_device,
        dtype=options.resolved_dtype, tp=options.tp, batch_size=options.batch_size,
        sampling=options.generation.sampling_params(), save_token_ids=options.save_token_ids,
        torch_threads=options.torch_threads, compile=options.compile, rank_resources=_rank_resources(options),
        vq_cache_size=options.vq_cache_size,
    )


def preprocess_cpus(options: CaptionOptions) -> float:
    """Logical CPUs of a preprocessing actor. A read step that asks for the same fuses into it."""
    return 0.25 if options.resolved_device == "cpu" else 1


def build_caption_dataset(ds, options: CaptionOptions):
    """Add the preprocessing and generation stages to a Ray dataset.

    `ds` needs the id column and the image column (plus `--prompt-column`/template columns if used);
    relative image paths resolve against a `_source` column when present, else the working directory.
    The result has every input row once, with caption, error, finish_reason and token counts.
    """
    from ray.data import ActorPoolStrategy

    if not options.resolved_device:
        options = resolve_device(options, gpus_per_node())
    ds = ds.map_batches(
        PreprocessStage,
        fn_constructor_kwargs={"config": preprocess_config(options)},
        batch_size=max(1, options.batch_size),
        batch_format="pyarrow",
        compute=ActorPoolStrategy(min_size=options.cpu_workers[0], max_size=options.cpu_workers[1]),
        num_cpus=preprocess_cpus(options),
    )
    rank = _rank_resources(options)
    extra: dict[str, Any] = {}
    if options.tp > 1:
        placement = TPPlacement(options.tp, rank)
        _placements.append(placement)
        extra["ray_remote_args_fn"] = placement
    with warnings.catch_warnings():
        # Ray 2.60 marks ray_remote_args_fn deprecated; ray.data.llm itself still uses it for TP placement.
        warnings.simplefilter("ignore")
        return ds.map_batches(
            GenerateStage,
            fn_constructor_kwargs={"config": generate_config(options)},
            batch_size=options.batch_size * max(1, options.sort_window),
            batch_format="pyarrow",
            compute=generate_actor_pool(options.replicas),
            max_restarts=-1,
            max_task_retries=-1,
            **rank,
            **extra,
        )


def generate_actor_pool(replicas: tuple[int, int]):
    """The generate stage's actor pool: `replicas` (min, max) actors, each running its calls on its main thread.

    An actor runs one call at a time either way; `enable_true_multi_threading` only stops Ray Data from
    moving the call onto a helper thread. On the main thread a batch allocates from glibc's main arena,
    where `keep_freed_memory()` applies; a helper thread gets an arena of its own, which maps and unmaps
    every block above 64 MiB, so each batch faulted its VQ and prefill activations in again (about
    150k page faults/s; on 96 rows the stage was busy 31 s where a plain loop took 19.5 s).
    """
    import inspect

    from ray.data import ActorPoolStrategy

    extra = {}
    # Older Ray has no such switch and always calls on the helper thread.
    if "enable_true_multi_threading" in inspect.signature(ActorPoolStrategy).parameters:
        extra["enable_true_multi_threading"] = True
    return ActorPoolStrategy(min_size=replicas[0], max_size=replicas[1], **extra)


def _manifest(options: CaptionOptions, files, units, extra_settings: dict[str, Any]) -> dict[str, Any]:
    return {
        "version": 1,
        "settings": {**options.job_settings(), **extra_settings},
        "inputs": [{"uri": f.uri, "size": f.size, "num_rows": f.num_rows} for f in files],
        "num_units": len(units),
    }


def run_caption_job(
    options: CaptionOptions,
    log: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True),
    transform: Callable[[pa.Table], pa.Table] | None = None,
    num_cpus: int | None = None,
    output_fields: Callable[[pa.Schema], pa.Schema] | None = None,
    extra_settings: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Validate, plan, run and commit. Raises OptionsError (exit code 2) before any work on bad input.

    `transform` may add columns to each output batch before it is written (the VQA job scores there);
    `output_fields` maps the caption output schema to the one written (columns absent from it are
    dropped), and `extra_settings` join the settings a resumed run must match (e.g. the VQA metric).
    """
    extra_settings = extra_settings or {}
    started = time.perf_counter()
    validate(options)
    try:
        uris = list_parquet_inputs(list(options.inputs), options.storage)
        files = describe_inputs(uris, options.storage)
    except StorageError as exc:
        raise OptionsError(str(exc)) from None
    for f in files:
        check_columns(list(f.columns), options, f.uri)
    has_id = [options.id_column in f.columns for f in files]
    if any(has_id) and not all(has_id):
        missing = next(f.uri for f, h in zip(files, has_id) if not h)
        raise OptionsError(f"--id-column {options.id_column}: present in some inputs but not in {missing}")
    id_generated = not all(has_id)
    if id_generated:
        log(f"no '{options.id_column}' column: ids are '<file name>:<row index>'")
        options = replace(options, id_column="id")

    units = plan_units(files, options.rows_per_file, options.limit)
    input_schema = _input_schema(files[0], options)
    if _starts_local_ray():
        # The local cluster started below gets the GPUs torch sees here, so the device resolves now:
        # --device cuda without a GPU, a --tp above them, or a resume with other settings is refused
        # before Ray starts.
        local = resolve_device(options, [float(_local_gpus())], where="this machine (no RAY_ADDRESS cluster)")
        writer, manifest = _writer(local, files, units, input_schema, id_generated, output_fields, extra_settings)
        writer.refuse_changed(manifest, options.force)
    ensure_ray(num_cpus)
    options = resolve_device(options, gpus_per_node())

    writer, manifest = _writer(options, files, units, input_schema, id_generated, output_fields, extra_settings)
    done = writer.prepare(manifest, options.force)
    pending = [u for u in units if u.index not in done]
    log(f"{len(units)} units ({sum(u.num_rows for u in units)} rows) from {len(files)} file(s); "
        f"{len(done)} already committed, {len(pending)} to do; device={options.resolved_device} "
        f"dtype={options.resolved_dtype} tp={options.tp}")

    stats = _RunStats()
    if pending:
        try:
            stats = _execute(options, files, pending, writer, id_generated, transform, log)
        finally:
            release_placement_groups()
    summary = _summary(options, units, done, writer, stats, time.perf_counter() - started)
    writer.write_json(SUMMARY, summary)
    return summary


def _writer(options: CaptionOptions, files, units, input_schema: pa.Schema, id_generated: bool, output_fields,
            extra_settings):
    """The output's writer and the manifest a resumed run must match, for device-resolved `options`."""
    schema = output_schema(input_schema, options.id_column, id_generated, options.keep_columns,
                           options.save_token_ids)
    if output_fields is not None:
        schema = output_fields(schema)
    settings = {**options.job_settings(), **extra_settings}
    metadata = {"chameleon.settings": json.dumps(settings, sort_keys=True)}
    writer = UnitWriter(options.output, options.storage, schema, metadata)
    return writer, _manifest(options, files, units, extra_settings)


def _input_schema(first, options: CaptionOptions) -> pa.Schema:
    import pyarrow.parquet as pq

    from pipeline.units import _open

    with _open(first.uri, options.storage) as f:
        return pq.ParquetFile(f).schema_arrow


class _RunStats:
    def __init__(self):
        self.rows = 0
        self.images = 0
        self.generated_tokens = 0
        self.errors: Counter[str] = Counter()
        self.t_pre = 0.0
        self.t_gen = 0.0
        self.vq_encoded = 0
        self.vq_reused = 0
        self.wall = 0.0
        self.data_stats = ""


def _execute(options, files, pending, writer, id_generated, transform, log) -> _RunStats:
    import ray

    tasks = plan_reads(files, pending)
    columns = sorted({options.image_column, *options.keep_columns, *options.template_columns}
                     | ({options.prompt_column} if options.prompt_column else set())
                     | (set() if id_generated else {options.id_column}))
    ds = ray.data.from_items(read_task_dicts(tasks), override_num_blocks=max(1, min(len(tasks), 1000)))
    ds = ds.map_batches(
        read_tasks_batch,
        fn_kwargs={"columns": columns, "id_column": None if id_generated else options.id_column,
                   "storage": options.storage},
        batch_size=1,
        batch_format="pyarrow",
        # The preprocessing actors' own request: Ray Data then fuses the read into them, so no
        # separate read workers start (each one importing Ray Data, on a 2-core box seconds of the
        # job's start), and rows reach preprocessing without a trip through the object store.
        num_cpus=preprocess_cpus(options),
    )
    ds = build_caption_dataset(ds, options)
    by_index = {u.index: u for u in pending}
    model_name = Path(options.model).name
    stats = _RunStats()
    start = time.perf_counter()
    try:
        _consume(ds, writer, by_index, model_name, transform, stats, log)
    except Exception as exc:
        failure = stage_start_failure(exc)
        if failure is None:
            raise
        raise StageStartError(failure) from None
    stats.wall = time.perf_counter() - start
    if writer.pending:
        raise RuntimeError(f"units never completed: {sorted(writer.pending)[:10]} (rows were lost in Ray Data)")
    try:
        stats.data_stats = ds.stats()
    except Exception:  # stats are informative only
        stats.data_stats = ""
    return stats


def _consume(ds, writer, by_index, model_name: str, transform, stats: _RunStats, log) -> None:
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        batch = batch.append_column("model", pa.array([model_name] * batch.num_rows, pa.string()))
        if transform is not None:
            batch = transform(batch)
        stats.rows += batch.num_rows
        stats.images += sum(batch.column(NUM_IMAGES).to_pylist())
        stats.generated_tokens += sum(v or 0 for v in batch.column("num_generated_tokens").to_pylist())
        stats.errors.update(error_type(e) for e in batch.column("error").to_pylist() if e)
        stats.t_pre += sum(batch.column(T_PRE).to_pylist())
        stats.t_gen += sum(batch.column(T_GEN).to_pylist())
        stats.vq_encoded += sum(batch.column(VQ_ENCODED).to_pylist())
        stats.vq_reused += sum(batch.column(VQ_REUSED).to_pylist())
        for unit in writer.add(batch, by_index):
            log(f"committed {by_index[unit].filename} ({by_index[unit].num_rows} rows)")


class StageStartError(RuntimeError):
    """A stage's actors could not be constructed (e.g. the model failed to load on a worker): the job stops."""


_STAGE_NAMES = {"GenerateStage": "generate", "PreprocessStage": "preprocessing"}


def stage_start_failure(exc: BaseException) -> str | None:
    """The message for Ray's report of an actor whose constructor raised (`exc` or what it wraps):
    "the <stage> stage could not start: <the constructor's error>". None for any other failure.

    Ray passes the constructor's exception on as text only (a remote traceback), whose last line is
    the exception itself, e.g. a CheckpointError naming the file and tensor.
    """
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if getattr(exc, "actor_init_failed", False):
            text = re.sub(r"\x1b\[[0-9;]*m", "", getattr(exc, "error_msg", "") or str(exc))
            lines = [line.strip() for line in text.splitlines() if line.strip()]
            stage = next((name for cls, name in _STAGE_NAMES.items() if cls in text), "a pipeline")
            return f"the {stage} stage could not start: {lines[-1] if lines else type(exc).__name__}"
        exc = exc.__cause__ or exc.__context__
    return None


def _summary(options, units, done, writer, stats: _RunStats, wall: float) -> dict[str, Any]:
    rows_in = sum(u.num_rows for u in units)
    rows_out = sum(u.num_rows for u in units if u.index in done) + writer.rows_written
    run = max(stats.wall, 1e-9)
    return {
        "output": options.output,
        "model": Path(options.model).name,
        "device": options.resolved_device,
        "dtype": options.resolved_dtype,
        "tp": options.tp,
        "replicas": list(options.replicas),
        "batch_size": options.batch_size,
        "generation": options.job_settings()["generation"],
        "rows_in": rows_in,
        "rows_out": rows_out,
        "rows_processed_this_run": stats.rows,
        "units_total": len(units),
        "units_skipped": len(done),
        "units_committed_this_run": len(writer.committed),
        "rows_with_errors": sum(stats.errors.values()),
        "errors_by_type": dict(stats.errors.most_common()),
        "duplicates_dropped": writer.duplicates_dropped,
        "wall_time_s": round(wall, 3),
        "pipeline_time_s": round(stats.wall, 3),
        "images": stats.images,
        "images_per_s": round(stats.images / run, 3),
        # VQ work of this run: images encoded, and image occurrences served from a replica's cache.
        "vq_encodings": stats.vq_encoded,
        "vq_encodings_saved": stats.vq_reused,
        "rows_per_s": round(stats.rows / run, 3),
        "generated_tokens": stats.generated_tokens,
        "generated_tokens_per_s": round(stats.generated_tokens / run, 3),
        "stages": {
            "preprocess": {"busy_s": round(stats.t_pre, 3),
                           "rows_per_busy_s": round(stats.rows / stats.t_pre, 3) if stats.t_pre else None},
            "generate": {"busy_s": round(stats.t_gen, 3),
                         "rows_per_busy_s": round(stats.rows / stats.t_gen, 3) if stats.t_gen else None},
        },
        "storage": options.storage.describe(),
    }


def format_summary(summary: dict[str, Any]) -> str:
    lines = [
        f"rows in {summary['rows_in']}, rows out {summary['rows_out']} "
        f"({summary['rows_processed_this_run']} this run, {summary['units_skipped']} unit(s) resumed)",
        f"errors: {summary['rows_with_errors']} {summary['errors_by_type'] or ''}".rstrip(),
        f"wall {summary['wall_time_s']:.1f}s; pipeline {summary['pipeline_time_s']:.1f}s: "
        f"{summary['images_per_s']:.2f} images/s, {summary['rows_per_s']:.2f} rows/s, "
        f"{summary['generated_tokens_per_s']:.1f} generated tokens/s",
        f"VQ encodings {summary['vq_encodings']}, saved by the image cache {summary['vq_encodings_saved']}",
    ]
    for name, stage in summary["stages"].items():
        rate = stage["rows_per_busy_s"]
        lines.append(f"stage {name:<10} busy {stage['busy_s']:8.2f}s  "
                     f"{'-' if rate is None else f'{rate:.2f}'} rows per busy second")
    return "\n".join(lines)
