"""Splitting the input into commit units and read tasks, from Parquet footers only.

A unit is a contiguous row range of one input file; its output is one Parquet file whose name depends
only on the unit's position in the (sorted) input, so a rerun finds exactly what is already done.
A read task is one row group; it emits the rows of the units it overlaps that still need work.
"""

from __future__ import annotations

import os
import posixpath
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.storage import StorageError, StorageOptions, is_remote, strip_scheme

# Internal columns carried through every stage.
UNIT, ROW, SOURCE = "_unit", "_row", "_source"


@dataclass(frozen=True)
class InputFile:
    index: int
    uri: str
    name: str  # used in generated ids: unique among the inputs
    num_rows: int
    row_group_rows: tuple[int, ...]
    size: int
    columns: tuple[str, ...]


@dataclass(frozen=True)
class Unit:
    index: int
    file_index: int
    row_start: int
    row_end: int

    @property
    def num_rows(self) -> int:
        return self.row_end - self.row_start

    @property
    def filename(self) -> str:
        return f"part-{self.index:06d}.parquet"


@dataclass(frozen=True)
class ReadTask:
    file_index: int
    uri: str
    name: str
    row_group: int
    row_offset: int  # row index (in the file) of the row group's first row
    # (unit index, first row, end row) ranges of this row group that must be read
    ranges: tuple[tuple[int, int, int], ...]


def _open(uri: str, storage: StorageOptions):
    fs = storage.filesystem(uri)
    return fs.open(strip_scheme(uri) if is_remote(uri) else uri, "rb")


def read_footer(uri: str, storage: StorageOptions) -> tuple[pq.FileMetaData, pa.Schema, int]:
    try:
        with _open(uri, storage) as f:
            parquet = pq.ParquetFile(f)
            size = f.size if hasattr(f, "size") else os.path.getsize(uri)
            return parquet.metadata, parquet.schema_arrow, int(size)
    except Exception as exc:  # truncated files, non-Parquet files, permissions, network
        raise StorageError(f"input file {uri} cannot be read as Parquet ({type(exc).__name__}: {exc})") from None


def _unique_names(uris: list[str]) -> list[str]:
    base = [posixpath.basename(strip_scheme(u)) for u in uris]
    if len(set(base)) == len(base):
        return base
    paths = [strip_scheme(u) for u in uris]
    root = posixpath.commonpath(paths) if len(paths) > 1 else posixpath.dirname(paths[0])
    return [posixpath.relpath(p, root) for p in paths]


def describe_inputs(uris: list[str], storage: StorageOptions) -> list[InputFile]:
    with ThreadPoolExecutor(max_workers=min(16, max(1, len(uris)))) as pool:
        footers = list(pool.map(lambda u: read_footer(u, storage), uris))
    names = _unique_names(uris)
    files = []
    for i, (uri, name, (meta, schema, size)) in enumerate(zip(uris, names, footers)):
        rgs = tuple(meta.row_group(r).num_rows for r in range(meta.num_row_groups))
        files.append(InputFile(i, uri, name, meta.num_rows, rgs, size, tuple(schema.names)))
    return files


def plan_units(files: list[InputFile], rows_per_unit: int, limit: int | None = None) -> list[Unit]:
    units: list[Unit] = []
    remaining = limit
    for f in files:
        start = 0
        while start < f.num_rows and (remaining is None or remaining > 0):
            end = min(start + rows_per_unit, f.num_rows)
            if remaining is not None:
                end = min(end, start + remaining)
                remaining -= end - start
            units.append(Unit(len(units), f.index, start, end))
            start = end
    return units


def plan_reads(files: list[InputFile], units: list[Unit]) -> list[ReadTask]:
    """One task per row group that overlaps at least one of `units`."""
    by_file: dict[int, list[Unit]] = {}
    for u in units:
        by_file.setdefault(u.file_index, []).append(u)
    tasks = []
    for f in files:
        file_units = by_file.get(f.index, [])
        offset = 0
        for rg, rows in enumerate(f.row_group_rows):
            rg_end = offset + rows
            ranges = tuple(
                (u.index, max(u.row_start, offset), min(u.row_end, rg_end))
                for u in file_units
                if u.row_start < rg_end and u.row_end > offset
            )
            if ranges:
                tasks.append(ReadTask(f.index, f.uri, f.name, rg, offset, ranges))
            offset = rg_end
    return tasks


def read_task_rows(task: dict, columns: list[str], id_column: str | None, storage: StorageOptions,
                   batch_rows: int = 256):
    """Yield pyarrow tables with the wanted rows of one row group plus unit/row/source/id columns."""
    task = ReadTask(**{**task, "ranges": tuple(tuple(r) for r in task["ranges"])})
    try:
        with _open(task.uri, storage) as f:
            parquet = pq.ParquetFile(f)
            row = task.row_offset
            for batch in parquet.iter_batches(batch_size=batch_rows, row_groups=[task.row_group], columns=columns):
                table = pa.Table.from_batches([batch])
                yield from _select_ranges(table, row, task, id_column)
                row += table.num_rows
    except StorageError:
        raise
    except OSError as exc:
        raise StorageError(f"input file {task.uri} row group {task.row_group} cannot be read: {exc}") from exc


def _select_ranges(table: pa.Table, first_row: int, task: ReadTask, id_column: str | None):
    last_row = first_row + table.num_rows
    for unit, start, end in task.ranges:
        lo, hi = max(start, first_row), min(end, last_row)
        if lo >= hi:
            continue
        part = table.slice(lo - first_row, hi - lo)
        rows = pa.array(range(lo, hi), pa.int64())
        part = part.append_column(UNIT, pa.array([unit] * (hi - lo), pa.int64()))
        part = part.append_column(ROW, rows)
        part = part.append_column(SOURCE, pa.array([task.uri] * (hi - lo), pa.string()))
        if id_column is None:
            part = part.append_column("id", pa.array([f"{task.name}:{r}" for r in range(lo, hi)], pa.string()))
        yield part


def read_tasks_batch(batch: pa.Table, columns: list[str], id_column: str | None, storage: StorageOptions):
    """Ray Data map_batches function: the rows of each read task (a `read_task_dicts` row) in `batch`."""
    for task in batch.to_pylist():
        yield from read_task_rows(task, columns, id_column, storage)


def read_task_dicts(tasks: list[ReadTask]) -> list[dict]:
    return [asdict(t) for t in tasks]
