"""Machinery shared by the cohort generators.

A generator is a structural causal model written as a subclass of :class:`CohortGenerator`:

1. :meth:`~CohortGenerator.plan` draws every subject's latent variables, covariates and outcome
   as one table (cheap: no images), plus the cohort-level truth (the model's parameters) and any
   long tables (e.g. EHR events);
2. :meth:`~CohortGenerator.render_subject` renders one subject's files (volumes, images,
   signals, text) from that row, with the subject's own random stream;
3. :meth:`~CohortGenerator.manifest` says which columns are observed (they go to the subject
   table, typed, see :mod:`mmlib.data.manifest`); every other column of the plan is latent and
   goes to the ground-truth card ``truth.json``.

:meth:`~CohortGenerator.generate` runs this: subjects are rendered one at a time in worker
processes (memory stays bounded whatever N is), each subject's random stream depends only on
(seed, generator, subject index) so the output does not depend on the number of workers, every
file is written to a temporary name and renamed, and a rerun with the same knobs and seed checks
the recorded sha256 of every file and renders only what is missing or damaged.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing as mp
import os
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd

from mmlib.core import Profile, ProfileSet, get_logger, progress
from mmlib.data.manifest import MANIFEST_NAME, Cohort, Manifest, default_data_dir, load_cohort
from mmlib.results import atomic_write_text

__all__ = ["CohortGenerator", "CohortKnobs", "CohortPlan", "SubjectFiles", "recorded_checksums", "sha256_file", "to_jsonable"]

log = get_logger(__name__)

COHORT_RECORD = "cohort.json"
TRUTH_NAME = "truth.json"


@dataclass(frozen=True)
class CohortKnobs(Profile):
    """Base of every generator's knobs; ``name`` is the preset (smoke | quick | full)."""

    n_subjects: int = 100


@dataclass
class CohortPlan:
    """What :meth:`CohortGenerator.plan` returns.

    Attributes:
        subjects: one row per subject; must hold ``subject_id``. Observed columns (those the
            manifest declares) and latent ones side by side.
        truth: the causal model's parameters, in words and numbers (JSON-able).
        tables: long tables by manifest name (each with a ``subject_id`` column), written as CSV.
    """

    subjects: pd.DataFrame
    truth: dict[str, Any]
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def to_jsonable(obj: Any) -> Any:
    """Numpy scalars/arrays and pandas missing values made JSON-friendly (NaN -> None)."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, (np.bool_, bool)):
        return bool(obj)
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return None if not np.isfinite(obj) else float(obj)
    if obj is pd.NA or obj is pd.NaT:
        return None
    return obj


@contextlib.contextmanager
def _exclusive(path: Path, waiting_message: str):
    """Hold an exclusive advisory lock on ``path`` (created if missing) for the block; log
    ``waiting_message`` when another process holds it. Where ``fcntl`` is missing (Windows) the
    block runs unlocked."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info(waiting_message)
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


class SubjectFiles:
    """Writes one subject's files under the cohort folder, atomically, recording sha256.

    Each writer takes a path relative to the cohort folder and returns it (store it in the
    subject's modality column). Files are written under a temporary name in the target folder
    and renamed, so a killed run never leaves a half-written file under a real name.
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.written: dict[str, str] = {}

    @contextlib.contextmanager
    def atomic(self, rel: str, suffix: str):
        """Context manager yielding a temporary path; on success it is renamed to ``rel`` and checksummed."""
        target = self.root / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        # keep the real extension last: nibabel and PIL choose the format from it
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=f".part{suffix}", dir=target.parent)
        os.close(fd)
        try:
            yield Path(tmp)
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        self.written[rel] = sha256_file(target)

    def nifti(self, rel: str, array: np.ndarray, affine: np.ndarray, *, xyzt_units: str = "mm") -> str:
        """A NIfTI-1 file (``.nii.gz``) with ``affine`` as both qform and sform (code 1, scanner)."""
        import nibabel as nib

        img = nib.Nifti1Image(np.asarray(array), np.asarray(affine, dtype=float))
        img.header.set_xyzt_units(xyz=xyzt_units)
        img.set_qform(affine, code=1)
        img.set_sform(affine, code=1)
        with self.atomic(rel, ".nii.gz") as tmp:
            nib.save(img, tmp)
        return rel

    def png(self, rel: str, array: np.ndarray) -> str:
        """An 8- or 16-bit greyscale or RGB PNG."""
        from PIL import Image

        with self.atomic(rel, ".png") as tmp:
            Image.fromarray(np.asarray(array)).save(tmp, format="PNG")
        return rel

    def text(self, rel: str, text: str) -> str:
        with self.atomic(rel, ".txt") as tmp:
            tmp.write_text(text, encoding="utf-8")
        return rel

    def npy(self, rel: str, array: np.ndarray) -> str:
        with self.atomic(rel, ".npy") as tmp, open(tmp, "wb") as fh:
            np.save(fh, np.asarray(array), allow_pickle=False)
        return rel

    def wfdb(
        self,
        rel: str,
        signal: np.ndarray,
        fs: float,
        sig_name: list[str],
        *,
        gain_per_mv: float = 1000.0,
        comments: list[str] | None = None,
    ) -> str:
        """A WFDB record as PTB-XL stores them: format 16, ``gain_per_mv`` adu/mV, baseline 0.

        ``rel`` is the record path without extension; ``rel.dat`` then ``rel.hea`` are written
        (a record whose header exists is complete). The header is written directly:
        ``wfdb.wrsamp`` spends ~0.1 s per record validating fields, more than the whole
        subject takes to simulate. ``wfdb.rdrecord`` reads the result (tested).

        Args:
            signal: (samples, channels) in mV.
        """
        digital = np.clip(np.round(np.asarray(signal, dtype=float) * gain_per_mv), -32767, 32767).astype("<i2")
        if digital.ndim != 2 or digital.shape[1] != len(sig_name):
            raise ValueError(f"{rel}: signal shape {digital.shape} does not match {len(sig_name)} signal names")
        name = rel.rsplit("/", 1)[-1]
        # WFDB checksum: 16-bit sum of each channel's samples
        checks = [(int(c) + 32768) % 65536 - 32768 for c in digital.astype(np.int64).sum(axis=0)]
        lines = [f"{name} {digital.shape[1]} {fs:g} {digital.shape[0]}"]
        lines += [
            f"{name}.dat 16 {gain_per_mv:g}(0)/mV 16 0 {int(digital[0, j])} {checks[j]} 0 {lead}"
            for j, lead in enumerate(sig_name)
        ]
        lines += [f"# {c}" for c in comments or []]
        with self.atomic(f"{rel}.dat", ".dat") as tmp:
            tmp.write_bytes(digital.tobytes())
        with self.atomic(f"{rel}.hea", ".hea") as tmp:
            tmp.write_text("\n".join(lines) + "\n")
        return rel


def recorded_checksums(root: str | os.PathLike) -> dict[str, str]:
    """The sha256 of every file of a generated cohort, as its ``cohort.json`` records them."""
    return json.loads((Path(root) / COHORT_RECORD).read_text())["checksums"]


def _stream_key(name: str) -> int:
    return zlib.crc32(name.encode())


def _verify(root: Path, files: dict[str, str]) -> bool:
    return all((root / rel).is_file() and sha256_file(root / rel) == sha for rel, sha in files.items())


def _render_one(task: tuple[CohortGenerator, Path, int, int, dict[str, Any], dict | None]) -> dict[str, Any]:
    gen, root, seed, index, row, previous = task
    if previous is not None and _verify(root, previous["files"]):
        return {**previous, "reused": True}
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_stream_key(gen.name), 1, index)))
    files = SubjectFiles(root)
    extra = gen.render_subject(row, rng, files) or {}
    return {"index": index, "files": files.written, "extra": to_jsonable(extra), "reused": False}


def _default_workers(n_tasks: int) -> int:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        cores = os.cpu_count() or 1
    return max(1, min(cores, n_tasks))


class CohortGenerator:
    """Base class of the five generators (see the module docstring for the contract).

    Subclasses set ``name``, ``paper``, ``description`` and ``presets`` (a :class:`ProfileSet`
    of their :class:`CohortKnobs` subclass with ``smoke``, ``quick`` and ``full``), and implement
    :meth:`plan`, :meth:`manifest` and, if the cohort has per-subject files, :meth:`render_subject`.

    Example::

        gen = StrokeMRI("quick", lesion_effect=0.0)    # a knob turned off
        cohort = gen.generate(seed=0)                    # -> mmlib.data.Cohort, validated
    """

    name: ClassVar[str]
    paper: ClassVar[str]
    description: ClassVar[str]
    version: ClassVar[str] = "1"
    presets: ClassVar[ProfileSet]

    def __init__(self, preset: str = "quick", **knobs: Any) -> None:
        try:
            self.knobs = self.presets.get_profile(preset, **knobs)
        except ValueError as err:
            raise ValueError(f"cohort {self.name!r}: {err}") from None
        self.overrides = dict(sorted(knobs.items()))

    def __repr__(self) -> str:
        extra = "".join(f", {k}={v!r}" for k, v in self.overrides.items())
        return f"{type(self).__name__}({self.knobs.name!r}{extra})"

    # ---- to implement
    def plan(self, rng: np.random.Generator) -> CohortPlan:
        raise NotImplementedError

    def render_subject(self, subject: dict[str, Any], rng: np.random.Generator, files: SubjectFiles) -> dict[str, Any]:
        """Write one subject's files; return new columns (relative paths, measured quantities)."""
        return {}

    def manifest(self) -> Manifest:
        raise NotImplementedError

    # ---- provided
    def key(self, seed: int) -> str:
        """Identity of one generated cohort: generator, version, knobs and seed."""
        blob = json.dumps(
            {"generator": self.name, "version": self.version, "knobs": to_jsonable(self.knobs.as_dict()), "seed": seed},
            sort_keys=True,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def plan_for_seed(self, seed: int) -> CohortPlan:
        """The plan :meth:`generate` renders for ``seed`` (same random stream), without writing files.

        Two generators whose knobs differ only in the outcome model (e.g. ``ct_ehr``'s
        ``image_share``) give the same subjects, images and tables with other outcomes: what
        the P4 balance sweep relies on (and checks).
        """
        return self.plan(np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_stream_key(self.name), 0))))

    def default_dir(self, data_dir: str | os.PathLike | None, seed: int) -> Path:
        base = Path(data_dir) if data_dir is not None else default_data_dir()
        tag = f"-{hashlib.sha256(json.dumps(to_jsonable(self.overrides), sort_keys=True).encode()).hexdigest()[:8]}"
        return base / f"{self.name}-{self.knobs.name}-seed{seed}{tag if self.overrides else ''}"

    def generate(
        self,
        data_dir: str | os.PathLike | None = None,
        seed: int = 0,
        *,
        out_dir: str | os.PathLike | None = None,
        workers: int | None = None,
        show_progress: bool = True,
    ) -> Cohort:
        """Write the cohort (or check and reuse it) and return it loaded and validated.

        Args:
            data_dir: parent folder (default :func:`~mmlib.data.manifest.default_data_dir`); the
                cohort goes to ``<data_dir>/<name>-<preset>-seed<seed>[-<hash of overrides>]``.
            seed: the cohort's seed; the same seed and knobs give byte-identical files.
            out_dir: exact folder instead of the default name.
            workers: processes rendering subjects (default: the usable cores).
        """
        root = Path(out_dir) if out_dir is not None else self.default_dir(data_dir, seed)
        root.mkdir(parents=True, exist_ok=True)
        # Two notebooks run side by side (make reproduce JOBS=2) may ask for the same cohort: the
        # second waits for the first and then finds it up to date instead of rendering it again.
        with _exclusive(root / ".generate.lock", f"{self.name}: waiting for another process generating {root}"):
            return self._generate_into(root, seed, workers, show_progress)

    def _generate_into(self, root: Path, seed: int, workers: int | None, show_progress: bool) -> Cohort:
        key = self.key(seed)
        record_path = root / COHORT_RECORD
        journal = root / f".journal-{key}.jsonl"
        previous: dict[int, dict] = {}
        if record_path.is_file():
            record = json.loads(record_path.read_text())
            if record.get("key") == key and record.get("complete"):
                if _verify(root, record["checksums"]):
                    log.info("%s: %s is up to date (%d files verified)", self.name, root, len(record["checksums"]))
                    return load_cohort(root)
                log.info("%s: %s has missing or changed files; re-rendering those", self.name, root)
                previous = {int(k): v for k, v in record.get("subjects", {}).items()}
            elif record.get("key") != key:
                log.info("%s: %s holds another version or knobs; regenerating", self.name, root)
                for rel in record.get("checksums", {}):  # only files this generator wrote
                    (root / rel).unlink(missing_ok=True)
                record_path.unlink()
        if journal.is_file():
            for line in journal.read_text().splitlines():
                with contextlib.suppress(json.JSONDecodeError, KeyError):
                    entry = json.loads(line)
                    previous[int(entry["index"])] = entry

        plan = self.plan_for_seed(seed)
        subjects = plan.subjects.reset_index(drop=True)
        if "subject_id" not in subjects.columns:
            raise ValueError(f"{type(self).__name__}.plan() must return a 'subject_id' column")
        rows = subjects.to_dict(orient="records")
        tasks = [(self, root, seed, i, row, previous.get(i)) for i, row in enumerate(rows)]
        n_workers = _default_workers(len(tasks)) if workers is None else max(1, int(workers))
        outputs: dict[int, dict] = {}
        desc = f"{self.name} ({self.knobs.name}, {len(tasks)} subjects)"
        with open(journal, "a") as jfh:
            if n_workers == 1 or len(tasks) <= 1:
                results = map(_render_one, tasks)
                pool = None
            else:
                ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
                pool = ctx.Pool(n_workers)
                results = pool.imap_unordered(_render_one, tasks, chunksize=1)
            try:
                for out in progress(results, desc=desc, total=len(tasks), disable=not show_progress):
                    outputs[out["index"]] = out
                    if not out.pop("reused"):
                        jfh.write(json.dumps({k: out[k] for k in ("index", "files", "extra")}) + "\n")
                        jfh.flush()
            finally:
                if pool is not None:
                    pool.close()
                    pool.join()

        extra = pd.DataFrame([outputs[i]["extra"] for i in range(len(rows))], index=subjects.index)
        dup = sorted(set(extra.columns) & set(subjects.columns))
        if dup:
            raise ValueError(f"{type(self).__name__}.render_subject() returned columns the plan already has: {dup}")
        table = pd.concat([subjects, extra], axis=1)
        manifest = self.manifest()
        observed = manifest.subject_columns()
        missing = [c for c in observed if c not in table.columns]
        if missing:
            raise ValueError(f"{type(self).__name__}: manifest columns not produced by plan/render: {missing}")
        latent = ["subject_id", *[c for c in table.columns if c not in observed]]

        checksums: dict[str, str] = {}
        for i in range(len(rows)):
            checksums.update(outputs[i]["files"])
        files = SubjectFiles(root)
        for lt in manifest.tables:
            df = plan.tables[lt.name]
            with files.atomic(lt.path, ".csv") as tmp:
                df.to_csv(tmp, index=False, float_format="%.6g", lineterminator="\n")
        with files.atomic(manifest.subjects, ".csv") as tmp:
            table[observed].to_csv(tmp, index=False, float_format="%.6g", lineterminator="\n")
        truth = {
            "cohort": self.name,
            "paper": self.paper,
            "description": self.description,
            "generator": f"{type(self).__module__}.{type(self).__name__}",
            "version": self.version,
            "seed": seed,
            "preset": self.knobs.name,
            "knobs": self.knobs.as_dict(),
            "causal_model": plan.truth,
            "subjects": table[latent].to_dict(orient="records"),
        }
        files.text(TRUTH_NAME, json.dumps(to_jsonable(truth), indent=1, sort_keys=False) + "\n")
        files.text(MANIFEST_NAME, manifest.model_dump_json(indent=2, exclude_defaults=False) + "\n")
        checksums.update(files.written)
        record = {
            "key": key,
            "generator": truth["generator"],
            "version": self.version,
            "seed": seed,
            "knobs": truth["knobs"],
            "complete": True,
            "checksums": dict(sorted(checksums.items())),
            "subjects": {str(i): {"index": i, "files": outputs[i]["files"], "extra": outputs[i]["extra"]} for i in range(len(rows))},
        }
        atomic_write_text(record_path, json.dumps(to_jsonable(record), indent=1) + "\n")
        journal.unlink(missing_ok=True)
        for stale in root.glob(".journal-*.jsonl"):
            stale.unlink(missing_ok=True)
        log.info("%s: wrote %d subjects to %s", self.name, len(rows), root)
        return load_cohort(root)
