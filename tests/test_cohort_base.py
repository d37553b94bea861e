"""The generation engine: determinism, idempotency, resume after a kill, atomic files."""

from __future__ import annotations

import json
from dataclasses import dataclass

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from mmlib.cohorts.base import CohortGenerator, CohortKnobs, CohortPlan, SubjectFiles, recorded_checksums, sha256_file
from mmlib.core import ProfileSet
from mmlib.data import Column, Manifest, Modality, Survival


@dataclass(frozen=True)
class ToyKnobs(CohortKnobs):
    size: int = 8
    effect: float = 1.0


class Toy(CohortGenerator):
    """A blob whose brightness drives a survival outcome."""

    name = "toy"
    paper = "-"
    description = "test cohort"
    presets = ProfileSet(
        smoke=ToyKnobs(name="smoke", n_subjects=6),
        quick=ToyKnobs(name="quick", n_subjects=12),
        full=ToyKnobs(name="full", n_subjects=40, size=16),
    )
    fail_at: int | None = None

    def plan(self, rng):
        n = self.knobs.n_subjects
        z = rng.normal(size=n)
        time = rng.exponential(365 * np.exp(-self.knobs.effect * z)) + 1
        df = pd.DataFrame(
            {
                "subject_id": [f"sub-{i:03d}" for i in range(n)],
                "age": rng.normal(60, 10, n).round(1),
                "time_days": time.round(1),
                "event": (rng.random(n) < 0.7).astype(int),
                "split": np.where(np.arange(n) % 2 == 0, "train", "test"),
                "z": z,
            }
        )
        return CohortPlan(subjects=df, truth={"effect": self.knobs.effect})

    def render_subject(self, subject, rng, files: SubjectFiles):
        if self.fail_at is not None and subject["subject_id"] == f"sub-{self.fail_at:03d}":
            raise RuntimeError("killed")
        s = self.knobs.size
        vol = (rng.normal(size=(s, s, s)) + subject["z"]).astype(np.float32)
        affine = np.diag([2.0, 2.0, 3.0, 1.0])
        rel = files.nifti(f"images/{subject['subject_id']}.nii.gz", vol, affine)
        return {"image": rel, "mean_intensity": float(vol.mean())}

    def manifest(self):
        return Manifest(
            name="toy",
            columns=[
                Column(name="age", dtype="float", unit="years"),
                Column(name="time_days", dtype="float", unit="days"),
                Column(name="event", dtype="int"),
                Column(name="split", dtype="category", categories=["train", "test"]),
            ],
            modalities=[Modality(name="image", column="image", format="nifti")],
            survival=Survival(time="time_days", event="event"),
            split_column="split",
            truth="truth.json",
        )


def test_same_seed_same_bytes_whatever_the_workers(tmp_path):
    a = Toy("quick").generate(out_dir=tmp_path / "a", seed=3, workers=1, show_progress=False)
    b = Toy("quick").generate(out_dir=tmp_path / "b", seed=3, workers=2, show_progress=False)
    c = Toy("quick").generate(out_dir=tmp_path / "c", seed=4, workers=2, show_progress=False)
    assert recorded_checksums(a.root) == recorded_checksums(b.root)
    assert recorded_checksums(a.root) != recorded_checksums(c.root)
    assert len(a) == 12 and a.subjects["age"].dtype == float


def test_observed_and_latent_columns_are_separated(tmp_path):
    cohort = Toy("smoke").generate(out_dir=tmp_path, seed=0, show_progress=False)
    header = (tmp_path / "subjects.csv").read_text().splitlines()[0].split(",")
    assert "z" not in header and "mean_intensity" not in header
    lat = cohort.latents()
    assert {"subject_id", "z", "mean_intensity"} <= set(lat.columns)
    # the rendered image really carries the latent
    assert np.corrcoef(lat["z"], lat["mean_intensity"])[0, 1] > 0.9


def test_nifti_affine_and_spacing(tmp_path):
    cohort = Toy("smoke").generate(out_dir=tmp_path, seed=0, show_progress=False)
    img = nib.load(cohort.paths("image")[0])
    assert img.header.get_zooms() == (2.0, 2.0, 3.0)
    assert np.allclose(img.affine, np.diag([2.0, 2.0, 3.0, 1.0]))
    assert int(img.header["sform_code"]) == 1 and int(img.header["qform_code"]) == 1


def test_rerun_verifies_and_repairs(tmp_path):
    Toy("smoke").generate(out_dir=tmp_path, seed=0, show_progress=False)
    before = recorded_checksums(tmp_path)
    victim = tmp_path / "images" / "sub-002.nii.gz"
    mtime = (tmp_path / "images" / "sub-001.nii.gz").stat().st_mtime_ns
    victim.write_bytes(b"corrupted")
    Toy("smoke").generate(out_dir=tmp_path, seed=0, show_progress=False)
    assert recorded_checksums(tmp_path) == before
    assert sha256_file(victim) == before["images/sub-002.nii.gz"]
    # an intact file was verified, not rewritten
    assert (tmp_path / "images" / "sub-001.nii.gz").stat().st_mtime_ns == mtime


def test_killed_run_leaves_no_partial_file_and_resumes(tmp_path):
    gen = Toy("smoke")
    gen.fail_at = 4
    with pytest.raises(RuntimeError, match="killed"):
        gen.generate(out_dir=tmp_path, seed=0, workers=1, show_progress=False)
    assert not (tmp_path / "cohort.json").exists() and not (tmp_path / "subjects.csv").exists()
    assert not list(tmp_path.rglob("*.part*"))
    done = sorted(p.name for p in (tmp_path / "images").iterdir())
    assert done == [f"sub-{i:03d}.nii.gz" for i in range(4)]
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "images").iterdir()}
    cohort = Toy("smoke").generate(out_dir=tmp_path, seed=0, workers=1, show_progress=False)
    assert len(cohort) == 6
    assert all(p.stat().st_mtime_ns == m for p, m in mtimes.items())  # resumed, not redone
    ref = Toy("smoke").generate(out_dir=tmp_path / "ref", seed=0, workers=1, show_progress=False)
    assert recorded_checksums(ref.root) == recorded_checksums(tmp_path)


def test_changed_knobs_regenerate_and_default_dirs_differ(tmp_path):
    a = Toy("smoke").generate(out_dir=tmp_path, seed=0, show_progress=False)
    first = recorded_checksums(a.root)
    b = Toy("smoke", effect=0.0).generate(out_dir=tmp_path, seed=0, show_progress=False)
    assert recorded_checksums(b.root) != first
    assert json.loads((tmp_path / "truth.json").read_text())["causal_model"] == {"effect": 0.0}
    assert Toy("smoke").default_dir(tmp_path, 0).name == "toy-smoke-seed0"
    assert Toy("smoke", effect=0.0).default_dir(tmp_path, 0).name.startswith("toy-smoke-seed0-")


def test_unknown_knob_is_named():
    with pytest.raises(ValueError, match="no field"):
        Toy("quick", effekt=0.0)


def test_a_second_generation_of_the_same_cohort_waits_and_reuses_it(tmp_path, caplog):
    """Notebooks run side by side (make reproduce JOBS=2) may both ask for a cohort: the one that
    finds it being written waits for the lock, then verifies the finished cohort instead of
    rendering it a second time."""
    fcntl = pytest.importorskip("fcntl")
    import logging
    import threading

    Toy("smoke").generate(out_dir=tmp_path, seed=0, show_progress=False)
    before = recorded_checksums(tmp_path)
    mtime = (tmp_path / "subjects.csv").stat().st_mtime_ns
    done = []
    with caplog.at_level(logging.INFO, logger="mmlib.cohorts.base"), open(tmp_path / ".generate.lock", "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)  # another process is generating
        worker = threading.Thread(target=lambda: done.append(
            Toy("smoke").generate(out_dir=tmp_path, seed=0, show_progress=False)))
        worker.start()
        worker.join(timeout=1.5)
        assert worker.is_alive() and not done, "generate must wait while another process holds the cohort"
        fcntl.flock(fh, fcntl.LOCK_UN)
        worker.join(timeout=60)
    assert not worker.is_alive() and len(done) == 1
    messages = [r.getMessage() for r in caplog.records]
    assert any("waiting for another process" in m for m in messages)
    assert any("up to date" in m for m in messages)
    assert recorded_checksums(tmp_path) == before
    assert (tmp_path / "subjects.csv").stat().st_mtime_ns == mtime, "the finished cohort was rewritten"
