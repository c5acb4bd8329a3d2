"""Committed output: one Parquet file per unit, written whole or not at all, plus a job manifest.

A unit's file appears under its final name only once every row of the unit is in it (local files are
written to a temporary name and renamed; an S3 object only exists once its upload completes), so a
crash never leaves a partial file that a rerun would take as done. Rows are de-duplicated by their
(unit, row) key, so a retried batch cannot write a row twice. Bookkeeping is per unit, not per row.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.options import OptionsError
from pipeline.storage import StorageOptions, fs_path, is_remote, write_whole_file
from pipeline.units import ROW, UNIT, Unit

MANIFEST = "_manifest.json"
SUMMARY = "_summary.json"


@dataclass
class _Pending:
    unit: Unit
    tables: list[pa.Table] = field(default_factory=list)
    rows_seen: set[int] = field(default_factory=set)


class UnitWriter:
    def __init__(self, output: str, storage: StorageOptions, schema: pa.Schema, metadata: dict[str, str]):
        self.output = output.rstrip("/")
        self.fs = storage.filesystem(output)
        self.root = fs_path(self.output)
        self.remote = is_remote(self.output)
        self.schema = schema.with_metadata({**(schema.metadata or {}), **{k: v.encode() for k, v in metadata.items()}})
        self.pending: dict[int, _Pending] = {}
        self.committed: list[int] = []
        self.rows_written = 0
        self.duplicates_dropped = 0

    # -- manifest and resume -----------------------------------------------------------------------

    def path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def read_manifest(self) -> dict[str, Any] | None:
        path = self.path(MANIFEST)
        if not self.fs.exists(path):
            return None
        with self.fs.open(path, "rb") as f:
            return json.loads(f.read())

    def write_json(self, name: str, value: dict[str, Any]) -> None:
        self._write_bytes(name, json.dumps(value, indent=2, sort_keys=True).encode())

    def committed_units(self) -> set[int]:
        if not self.fs.exists(self.root):
            return set()
        done = set()
        for path in self.fs.ls(self.root, detail=False):
            name = os.path.basename(str(path).rstrip("/"))
            if name.startswith("part-") and name.endswith(".parquet"):
                try:
                    done.add(int(name[len("part-"): -len(".parquet")]))
                except ValueError:
                    continue
        return done

    def clear(self) -> None:
        """Remove this job's files (parts, manifest, summary, leftovers), nothing else."""
        if not self.fs.exists(self.root):
            return
        for path in self.fs.ls(self.root, detail=False):
            name = os.path.basename(str(path).rstrip("/"))
            if name.startswith(("part-", ".tmp-")) or name in (MANIFEST, SUMMARY):
                self.fs.rm(path)

    def refuse_changed(self, manifest: dict[str, Any], force: bool) -> dict[str, Any] | None:
        """Raise OptionsError when the output holds a run with other settings or inputs (unless `force`);
        return the previous manifest. Only reads, so the job can call it before it starts any work."""
        previous = self.read_manifest()
        if previous is not None and previous != manifest and not force:
            changed = sorted(k for k in set(previous) | set(manifest) if previous.get(k) != manifest.get(k))
            details = []
            for key in changed:
                if key == "settings":
                    sub = sorted(k for k in set(previous[key]) | set(manifest[key])
                                 if previous[key].get(k) != manifest[key].get(k))
                    details.extend(f"settings.{k}" for k in sub)
                else:
                    details.append(key)
            raise OptionsError(
                f"--output {self.output} holds a run with different {', '.join(details)}; "
                "use a new --output, or --force to delete that output and start again"
            )
        return previous

    def prepare(self, manifest: dict[str, Any], force: bool) -> set[int]:
        """Return the units already committed by an identical earlier run (resume), or start afresh.

        A previous manifest with other settings or inputs is refused unless `force`, which deletes
        the earlier output first.
        """
        if not self.remote:
            os.makedirs(self.root, exist_ok=True)
        previous = self.refuse_changed(manifest, force)
        if previous != manifest and (previous is not None or force):
            self.clear()
        done = self.committed_units() if previous == manifest else set()
        self.write_json(MANIFEST, manifest)
        return done

    # -- rows ------------------------------------------------------------------------------------------

    def add(self, batch: pa.Table, units: dict[int, Unit]) -> list[int]:
        """Buffer rows by unit; commit every unit that became complete. Returns committed unit indices."""
        if batch.num_rows == 0:
            return []
        unit_col = batch.column(UNIT)
        committed = []
        for unit_index in pc.unique(unit_col).to_pylist():
            rows = batch.filter(pc.equal(unit_col, unit_index))
            pending = self.pending.setdefault(unit_index, _Pending(units[unit_index]))
            row_ids = rows.column(ROW).to_pylist()
            keep = [r not in pending.rows_seen for r in row_ids]
            if not all(keep):
                self.duplicates_dropped += keep.count(False)
                rows = rows.filter(pa.array(keep))
            pending.rows_seen.update(row_ids)
            pending.tables.append(rows)
            if len(pending.rows_seen) >= pending.unit.num_rows:
                self._commit(self.pending.pop(unit_index))
                committed.append(unit_index)
        return committed

    def _commit(self, pending: _Pending) -> None:
        table = pa.concat_tables(pending.tables, promote_options="permissive")
        table = table.sort_by(ROW)
        if table.num_rows != pending.unit.num_rows:
            raise RuntimeError(f"unit {pending.unit.index}: {table.num_rows} rows, expected {pending.unit.num_rows}")
        table = self._conform(table)
        name = pending.unit.filename
        if self.remote:
            # An S3 object becomes visible only when its upload completes: writing in place is atomic.
            with self.fs.open(self.path(name), "wb") as f:
                pq.write_table(table, f)
        else:
            tmp = self.path(f".tmp-{uuid.uuid4().hex}-{name}")
            pq.write_table(table, tmp)
            os.replace(tmp, self.path(name))
        self.committed.append(pending.unit.index)
        self.rows_written += table.num_rows

    def _conform(self, table: pa.Table) -> pa.Table:
        columns = []
        for field_ in self.schema:
            if field_.name in table.column_names:
                columns.append(table.column(field_.name).cast(field_.type))
            else:
                columns.append(pa.nulls(table.num_rows, field_.type))
        return pa.Table.from_arrays(columns, schema=self.schema)

    def _write_bytes(self, name: str, data: bytes) -> None:
        write_whole_file(self.fs, self.path(name), data, self.remote)


def output_schema(input_schema: pa.Schema, id_column: str, id_generated: bool, keep_columns: tuple[str, ...],
                  save_token_ids: bool) -> pa.Schema:
    fields = [pa.field(id_column, pa.string()) if id_generated else input_schema.field(id_column)]
    fields += [
        pa.field("caption", pa.string()),
        pa.field("error", pa.string()),
        pa.field("finish_reason", pa.string()),
        pa.field("num_prompt_tokens", pa.int32()),
        pa.field("num_generated_tokens", pa.int32()),
        pa.field("model", pa.string()),
    ]
    if save_token_ids:
        fields.append(pa.field("output_token_ids", pa.list_(pa.int32())))
    fields += [input_schema.field(c) for c in keep_columns if c != id_column]
    return pa.schema(fields)

