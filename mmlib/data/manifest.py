"""The cohort manifest: one schema for generated cohorts and a user's real data.

A cohort on disk is a folder with

- ``manifest.json``: what this module's :class:`Manifest` describes (validated with pydantic);
- a **subject table** (CSV or Parquet): one row per subject, an id column, typed tabular columns
  with units, label / survival-time / event columns, split and site columns, and one column per
  modality holding a file path *relative to the manifest*;
- optional **long tables** (e.g. timestamped EHR events) keyed by the subject id;
- optional ``truth.json``: the ground-truth card of a generated cohort.

:func:`load_cohort` reads and validates everything before any pipeline runs. Every problem is
reported at once, each naming the file, the line and the column; validation never writes.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

__all__ = [
    "MANIFEST_NAME",
    "Cohort",
    "Column",
    "LongTable",
    "Manifest",
    "ManifestError",
    "Modality",
    "Survival",
    "default_data_dir",
    "load_cohort",
]

MANIFEST_NAME = "manifest.json"
SCHEMA_VERSION = 1
MAX_PROBLEMS_SHOWN = 25

Dtype = Literal["float", "int", "bool", "category", "string", "datetime"]
FileFormat = Literal["nifti", "png", "jpeg", "dicom", "wfdb", "text", "npy", "pt", "h5", "directory"]

_TRUE = {"1", "true", "yes", "y", "t"}
_FALSE = {"0", "false", "no", "n", "f"}


def default_data_dir() -> Path:
    """Where generated cohorts live: ``$MMLIB_DATA_DIR``, else ``data/`` in this checkout.

    Outside a checkout (an installed package) the default is ``~/.cache/mmlib/data``.
    """
    env = os.environ.get("MMLIB_DATA_DIR")
    if env:
        return Path(env).expanduser().resolve()
    repo = Path(__file__).resolve().parents[2]
    if (repo / "pyproject.toml").is_file():
        return repo / "data"
    return Path.home() / ".cache" / "mmlib" / "data"


# --------------------------------------------------------------------------- schema


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Column(_Strict):
    """A typed column of the subject table or of a long table."""

    name: str
    dtype: Dtype
    unit: str | None = Field(None, description="physical unit, e.g. 'years', 'mmHg', 'HU', 'days'")
    description: str = ""
    categories: list[str] | None = Field(None, description="allowed values of a 'category' column")
    nullable: bool = Field(False, description="whether empty cells (missing values) are allowed")
    min: float | None = None
    max: float | None = None


class Modality(_Strict):
    """A column of file paths (relative to the manifest) holding one modality per subject."""

    name: str = Field(description="what the files are, e.g. 'flair', 'lesion_mask', 'ecg', 'report'")
    column: str = Field(description="subject-table column with the relative paths")
    format: FileFormat
    required: bool = Field(True, description="every subject must have this file")
    description: str = ""


class Survival(_Strict):
    """Time-to-event columns; times must be > 0, events 0/1 (1 = event observed)."""

    time: str
    event: str
    unit: Literal["days", "months", "years"] = "days"


class LongTable(_Strict):
    """A table with several rows per subject (e.g. EHR events), keyed by the subject id."""

    name: str
    path: str
    id_column: str = "subject_id"
    columns: list[Column]
    description: str = ""


class Manifest(_Strict):
    """The description of one cohort: see ``data_manifest/schema.md``."""

    schema_version: int = SCHEMA_VERSION
    name: str
    description: str = ""
    subjects: str = Field("subjects.csv", description="subject table, .csv or .parquet, relative to the manifest")
    id_column: str = "subject_id"
    columns: list[Column] = Field(default_factory=list)
    modalities: list[Modality] = Field(default_factory=list)
    labels: list[str] = Field(default_factory=list, description="classification label columns")
    survival: Survival | None = None
    split_column: str | None = None
    site_column: str | None = None
    tables: list[LongTable] = Field(default_factory=list)
    truth: str | None = Field(None, description="ground-truth card (generated cohorts only)")

    @model_validator(mode="after")
    def _references_exist(self) -> Manifest:
        names = [c.name for c in self.columns]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"columns declared twice: {dup}")
        declared = set(names)
        for label in self.labels:
            if label not in declared:
                raise ValueError(f"label {label!r} is not a declared column")
        if self.survival is not None:
            for col in (self.survival.time, self.survival.event):
                if col not in declared:
                    raise ValueError(f"survival column {col!r} is not a declared column")
        for col in (self.split_column, self.site_column):
            if col is not None and col not in declared:
                raise ValueError(f"column {col!r} (split/site) is not a declared column")
        mod_cols = [m.column for m in self.modalities]
        clash = sorted(set(mod_cols) & declared | {c for c in mod_cols if mod_cols.count(c) > 1})
        if clash:
            raise ValueError(f"modality columns must be distinct and not typed columns: {clash}")
        if self.id_column in declared or self.id_column in mod_cols:
            raise ValueError(f"the id column {self.id_column!r} must not be declared again")
        return self

    def column(self, name: str) -> Column:
        for c in self.columns:
            if c.name == name:
                return c
        raise KeyError(f"manifest {self.name!r} declares no column {name!r}")

    def modality(self, name: str) -> Modality:
        for m in self.modalities:
            if m.name == name:
                return m
        raise KeyError(f"manifest {self.name!r} has no modality {name!r}; it has {[m.name for m in self.modalities]}")

    def subject_columns(self) -> list[str]:
        """The columns of the subject table, in order: id, modalities, typed columns."""
        return [self.id_column, *(m.column for m in self.modalities), *(c.name for c in self.columns)]


# --------------------------------------------------------------------------- errors


class ManifestError(ValueError):
    """A cohort that does not match its manifest; ``problems`` lists every finding."""

    def __init__(self, source: str | os.PathLike, problems: list[str]) -> None:
        self.source = str(source)
        self.problems = list(problems)
        shown = self.problems[:MAX_PROBLEMS_SHOWN]
        more = len(self.problems) - len(shown)
        lines = [f"{self.source}: {len(self.problems)} problem(s)"] + [f"  - {p}" for p in shown]
        if more:
            lines.append(f"  ... and {more} more")
        super().__init__("\n".join(lines))


# --------------------------------------------------------------------------- the loaded cohort


@dataclass
class Cohort:
    """A validated cohort: its manifest, typed subject table, long tables and truth card."""

    root: Path
    manifest: Manifest
    subjects: pd.DataFrame
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    _truth: dict[str, Any] | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def ids(self) -> list[str]:
        return self.subjects[self.manifest.id_column].tolist()

    def __len__(self) -> int:
        return len(self.subjects)

    def path(self, modality: str, subject_id: str) -> Path:
        """Absolute path of one subject's file for ``modality``."""
        col = self.manifest.modality(modality).column
        row = self.subjects.loc[self.subjects[self.manifest.id_column] == subject_id]
        if row.empty:
            raise KeyError(f"cohort {self.name!r} has no subject {subject_id!r}")
        rel = row.iloc[0][col]
        if pd.isna(rel):
            raise KeyError(f"subject {subject_id!r} has no {modality!r} file")
        return self.root / str(rel)

    def paths(self, modality: str) -> list[Path | None]:
        """Absolute paths of ``modality`` for every subject (None where an optional file is absent)."""
        col = self.manifest.modality(modality).column
        return [None if pd.isna(r) else self.root / str(r) for r in self.subjects[col]]

    def split(self, *names: str) -> pd.DataFrame:
        """Subjects whose split column is one of ``names``."""
        col = self.manifest.split_column
        if col is None:
            raise KeyError(f"cohort {self.name!r} has no split column")
        return self.subjects[self.subjects[col].isin(names)]

    @property
    def truth(self) -> dict[str, Any]:
        """The ground-truth card (generated cohorts only)."""
        if self._truth is None:
            if not self.manifest.truth:
                raise KeyError(f"cohort {self.name!r} has no ground-truth card (real data?)")
            self._truth = json.loads((self.root / self.manifest.truth).read_text())
        return self._truth

    def latents(self) -> pd.DataFrame:
        """Per-subject latent variables of the ground-truth card, as a table by subject id."""
        return pd.DataFrame(self.truth["subjects"])


# --------------------------------------------------------------------------- validation


def _where(table: str, line: int, sid: Any, id_column: str) -> str:
    return f"{table} line {line} ({id_column}={sid!r})"


def _coerce(series: pd.Series, col: Column) -> tuple[pd.Series, pd.Series]:
    """Typed values and a mask of cells that do not parse as ``col.dtype``."""
    raw = series
    missing = raw.isna() | (raw.astype(str).str.strip() == "")
    if col.dtype in ("float", "int"):
        values = pd.to_numeric(raw.where(~missing), errors="coerce")
        bad = values.isna() & ~missing
        if col.dtype == "int":
            frac = values.notna() & (values != np.floor(values.fillna(0)))
            bad |= frac
            values = values.astype("Int64") if not bad.any() else values
        else:
            values = values.astype(float)
        return values, bad
    if col.dtype == "bool":
        text = raw.astype(str).str.strip().str.lower()
        ok = text.isin(_TRUE | _FALSE)
        values = pd.Series(pd.NA, index=raw.index, dtype="boolean")
        values[text.isin(_TRUE)] = True
        values[text.isin(_FALSE)] = False
        return values, ~ok & ~missing
    if col.dtype == "datetime":
        values = pd.to_datetime(raw.where(~missing), errors="coerce")
        return values, values.isna() & ~missing
    text = raw.where(~missing).astype("string").str.strip()
    if col.dtype == "category":
        bad = pd.Series(False, index=raw.index)
        if col.categories is not None:
            bad = ~text.isin(col.categories) & ~missing
        bad = bad.fillna(False).astype(bool)
        cats = col.categories if col.categories is not None else sorted(text.dropna().unique())
        return text.where(~bad).astype(pd.CategoricalDtype(cats)), bad
    return text, pd.Series(False, index=raw.index)


def _check_columns(
    df: pd.DataFrame, columns: Iterable[Column], table: str, id_column: str, problems: list[str]
) -> pd.DataFrame:
    typed = df.copy()
    for col in columns:
        if col.name not in df.columns:
            problems.append(f"{table}: column {col.name!r} is declared in the manifest but missing")
            continue
        values, bad = _coerce(df[col.name], col)
        for idx in np.flatnonzero(bad.to_numpy()):
            cell = df[col.name].iloc[idx]
            expect = f"one of {col.categories}" if col.dtype == "category" else f"a {col.dtype}"
            problems.append(
                f"{_where(table, idx + 2, df[id_column].iloc[idx], id_column)}, column {col.name!r}: "
                f"{cell!r} is not {expect}"
            )
        if not col.nullable:
            missing = values.isna().to_numpy() & ~bad.to_numpy()
            for idx in np.flatnonzero(missing):
                problems.append(
                    f"{_where(table, idx + 2, df[id_column].iloc[idx], id_column)}, column {col.name!r}: "
                    "missing value (NaN/empty) where the manifest does not allow one (nullable: false)"
                )
        if col.dtype in ("float", "int") and (col.min is not None or col.max is not None):
            num = values.astype(float)
            lo = -math.inf if col.min is None else col.min
            hi = math.inf if col.max is None else col.max
            out = (num < lo) | (num > hi)
            for idx in np.flatnonzero(out.fillna(False).to_numpy()):
                problems.append(
                    f"{_where(table, idx + 2, df[id_column].iloc[idx], id_column)}, column {col.name!r}: "
                    f"{num.iloc[idx]:g} is outside [{lo:g}, {hi:g}]"
                    + (f" {col.unit}" if col.unit else "")
                )
        typed[col.name] = values
    return typed


def _sniff(path: Path, fmt: str) -> str | None:
    """None if ``path`` looks like a readable ``fmt`` file, else what is wrong."""
    if fmt == "wfdb":
        hea = path.with_name(path.name + ".hea") if path.suffix != ".hea" else path
        if not hea.is_file():
            return f"WFDB header {hea.name} not found"
        path = hea
    if fmt == "directory":
        if not path.is_dir():
            return "folder not found" if not path.exists() else "not a folder"
        return None if os.access(path, os.R_OK | os.X_OK) else "folder not readable"
    if not path.exists():
        return "file not found"
    if not path.is_file():
        return "not a file"
    try:
        with open(path, "rb") as fh:
            head = fh.read(348)
    except OSError as exc:
        return f"not readable ({exc.strerror})"
    if not head:
        return "empty file"
    magic_ok = {
        "nifti": head[:2] == b"\x1f\x8b" or head[344:348] in (b"n+1\x00", b"ni1\x00") or head[4:8] == b"n+2\x00",
        "png": head[:8] == b"\x89PNG\r\n\x1a\n",
        "jpeg": head[:3] == b"\xff\xd8\xff",
        "dicom": len(head) >= 132 and head[128:132] == b"DICM" or path.suffix.lower() == ".dcm",
        "npy": head[:6] == b"\x93NUMPY",
        "pt": head[:4] == b"PK\x03\x04",  # torch.save's zip container (read with weights_only=True)
        "h5": head[:8] == b"\x89HDF\r\n\x1a\n",
    }.get(fmt, True)
    return None if magic_ok else f"does not look like a {fmt} file"


def _read_table(path: Path, what: str) -> pd.DataFrame:
    if not path.is_file():
        raise ManifestError(path, [f"{what} not found"])
    try:
        if path.suffix == ".parquet":
            return pd.read_parquet(path)
        return pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[""])
    except Exception as exc:  # pandas raises many kinds here
        raise ManifestError(path, [f"{what} could not be read: {exc}"]) from exc


def load_cohort(path: str | os.PathLike, *, check_files: bool = True) -> Cohort:
    """Read and validate a cohort (``manifest.json`` or the folder holding it).

    Checks: the manifest against the schema; missing or unreadable files; duplicate ids; a
    subject with some modalities but not a required one; values of the wrong type; missing
    values where not allowed; values out of range; survival times <= 0 and events other than
    0/1; a split in which a label has a single class; long-table rows whose id is not a subject.

    Raises:
        ManifestError: listing every problem, each with file, line and column.
    """
    path = Path(path)
    mpath = path / MANIFEST_NAME if path.is_dir() else path
    if not mpath.is_file():
        raise ManifestError(mpath, ["manifest not found (a cohort folder holds a manifest.json)"])
    try:
        manifest = Manifest.model_validate_json(mpath.read_text())
    except ValidationError as exc:
        problems = [f"{'.'.join(map(str, e['loc'])) or 'manifest'}: {e['msg']}" for e in exc.errors()]
        raise ManifestError(mpath, problems) from None
    root = mpath.parent
    table_name = manifest.subjects
    df = _read_table(root / table_name, "subject table")
    problems: list[str] = []
    idc = manifest.id_column
    if idc not in df.columns:
        raise ManifestError(root / table_name, [f"id column {idc!r} missing; columns are {list(df.columns)}"])
    df[idc] = df[idc].astype("string")
    for idx in np.flatnonzero(df[idc].isna().to_numpy()):
        problems.append(f"{table_name} line {idx + 2}, column {idc!r}: empty subject id")
    dup = df[idc].duplicated(keep=False) & df[idc].notna()
    for sid in sorted(df.loc[dup, idc].unique()):
        lines = (np.flatnonzero((df[idc] == sid).to_numpy()) + 2).tolist()
        problems.append(f"{table_name}, column {idc!r}: duplicate subject id {sid!r} on lines {lines}")

    typed = _check_columns(df, manifest.columns, table_name, idc, problems)

    # modalities: every path present where required, consistent across modalities, files readable
    present: dict[str, np.ndarray] = {}
    for mod in manifest.modalities:
        if mod.column not in df.columns:
            problems.append(f"{table_name}: modality column {mod.column!r} ({mod.name}) missing")
            continue
        has = df[mod.column].notna().to_numpy() & (df[mod.column].astype(str).str.strip() != "").to_numpy()
        present[mod.name] = has
        if check_files:
            for idx in np.flatnonzero(has):
                rel = str(df[mod.column].iloc[idx]).strip()
                why = _sniff(root / rel, mod.format)
                if why:
                    problems.append(
                        f"{_where(table_name, idx + 2, df[idc].iloc[idx], idc)}, column {mod.column!r}: "
                        f"{mod.name} file {rel!r}: {why}"
                    )
    required = [m for m in manifest.modalities if m.required and m.name in present]
    for mod in required:
        for idx in np.flatnonzero(~present[mod.name]):
            others = [m.name for m in manifest.modalities if m.name in present and present[m.name][idx]]
            has_txt = f"has {', '.join(others)} but " if others else ""
            problems.append(
                f"{_where(table_name, idx + 2, df[idc].iloc[idx], idc)}: subject {has_txt}no {mod.name} "
                f"(column {mod.column!r} is empty and the modality is required)"
            )

    if manifest.survival is not None and not problems_in(problems, manifest.survival.time):
        t = typed[manifest.survival.time].astype(float)
        for idx in np.flatnonzero((t <= 0).fillna(False).to_numpy()):
            problems.append(
                f"{_where(table_name, idx + 2, df[idc].iloc[idx], idc)}, column {manifest.survival.time!r}: "
                f"survival time {t.iloc[idx]:g} {manifest.survival.unit} is not > 0"
            )
        e = typed[manifest.survival.event]
        ev = pd.to_numeric(e.astype("object"), errors="coerce")
        for idx in np.flatnonzero((~ev.isin([0, 1]) & ev.notna()).to_numpy()):
            problems.append(
                f"{_where(table_name, idx + 2, df[idc].iloc[idx], idc)}, column {manifest.survival.event!r}: "
                f"event {df[manifest.survival.event].iloc[idx]} is not 0 or 1"
            )

    split = manifest.split_column
    if split is not None and split in typed.columns:
        targets = list(manifest.labels) + ([manifest.survival.event] if manifest.survival else [])
        for label in targets:
            if label not in typed.columns:
                continue
            for name, group in typed.groupby(split, observed=True, dropna=True):
                values = group[label].dropna()
                if values.empty:
                    continue  # an unlabelled split (e.g. a pretraining pool)
                if values.nunique() < 2:
                    what = "event" if manifest.survival and label == manifest.survival.event else "label"
                    problems.append(
                        f"{table_name}, column {label!r}: split {name!r} has a single {what} value "
                        f"({_plain(values.iloc[0])!r} in all {len(values)} labelled subjects)"
                    )

    ids = set(df[idc].dropna())
    tables: dict[str, pd.DataFrame] = {}
    for lt in manifest.tables:
        try:
            tdf = _read_table(root / lt.path, f"long table {lt.name!r}")
        except ManifestError as exc:
            problems.extend(f"{lt.path}: {p}" for p in exc.problems)
            continue
        if lt.id_column not in tdf.columns:
            problems.append(f"{lt.path}: id column {lt.id_column!r} missing")
            continue
        tdf[lt.id_column] = tdf[lt.id_column].astype("string")
        orphans = ~tdf[lt.id_column].isin(ids)
        for idx in np.flatnonzero(orphans.to_numpy())[:MAX_PROBLEMS_SHOWN]:
            problems.append(
                f"{lt.path} line {idx + 2}, column {lt.id_column!r}: subject {tdf[lt.id_column].iloc[idx]!r} "
                f"is not in {table_name}"
            )
        tables[lt.name] = _check_columns(tdf, lt.columns, lt.path, lt.id_column, problems)

    if manifest.truth and check_files and not (root / manifest.truth).is_file():
        problems.append(f"ground-truth card {manifest.truth!r} not found")
    if problems:
        raise ManifestError(mpath, problems)
    keep = [c for c in manifest.subject_columns() if c in typed.columns]
    return Cohort(root=root, manifest=manifest, subjects=typed[keep].reset_index(drop=True), tables=tables)


def _plain(value: Any) -> Any:
    """A numpy scalar as the Python value (for readable messages)."""
    return value.item() if hasattr(value, "item") else value


def problems_in(problems: list[str], column: str) -> bool:
    """Whether ``column`` already has a type problem (then range checks on it are skipped)."""
    return any(f"column {column!r}:" in p and " is not " in p for p in problems)
