"""Bring your own data: the real breast-cancer table as a cohort folder, and what validation catches."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pandas as pd
import pytest

from mmlib.data import ManifestError, load_cohort
from mmlib.data.examples import breast_cancer_cohort, veterans_cohort


@pytest.fixture(scope="module")
def bc_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("byo") / "breast_cancer"
    breast_cancer_cohort(root)
    return root


def test_breast_cancer_cohort_loads_typed(bc_dir):
    cohort = load_cohort(bc_dir)
    m = cohort.manifest
    assert len(cohort) == 198 and cohort.subjects["subject_id"].is_unique
    genes = [c for c in m.columns if c.name.startswith("X")]
    assert len(genes) == 76 and all(c.dtype == "float" for c in genes)
    assert all(cohort.subjects[c.name].dtype == float for c in genes)
    assert m.column("age").unit == "years" and m.column("size").unit == "cm"
    assert m.column("er").dtype == "category" and m.modalities == [] and m.truth is None
    t = cohort.subjects[m.survival.time]
    e = cohort.subjects[m.survival.event].astype(int)
    assert m.survival.unit == "days" and (t > 0).all() and int(e.sum()) == 51
    for name in ("train", "test"):
        events = cohort.split(name)[m.survival.event].astype(int)
        assert set(events) == {0, 1}, name
    # the split is stratified: event rates of train and test within a few points
    by_split = cohort.subjects.groupby(m.split_column, observed=True)[m.survival.event]
    rates = by_split.apply(lambda s: s.astype(int).mean())
    assert abs(rates["train"] - rates["test"]) < 0.05


def test_known_prognostic_signal(bc_dir):
    from sksurv.linear_model import CoxPHSurvivalAnalysis
    from sksurv.metrics import concordance_index_censored
    from sksurv.util import Surv

    cohort = load_cohort(bc_dir)
    s = cohort.subjects
    event = s["tdm_event"].astype(bool).to_numpy()
    time = s["tdm_days"].to_numpy()
    # a single known prognostic column: larger tumours metastasise sooner
    c_size = concordance_index_censored(event, time, s["size"].to_numpy())[0]
    assert c_size > 0.55
    # a ridge Cox model on genes + clinical, fitted on train, scored on test
    genes = [c.name for c in cohort.manifest.columns if c.name.startswith("X")]
    er_pos = (s["er"] == "positive").astype(float).rename("er_pos")
    X = pd.concat([s[genes + ["age", "size"]], er_pos], axis=1).to_numpy(float)
    tr = (s["split"] == "train").to_numpy()
    mu, sd = X[tr].mean(0), X[tr].std(0)
    X = (X - mu) / sd
    model = CoxPHSurvivalAnalysis(alpha=10.0).fit(X[tr], Surv.from_arrays(event[tr], time[tr]))
    c_test = concordance_index_censored(event[~tr], time[~tr], model.predict(X[~tr]))[0]
    assert c_test > 0.5


def test_rerun_is_idempotent_and_seed_changes_split(bc_dir, tmp_path):
    files = [bc_dir / "subjects.csv", bc_dir / "manifest.json"]
    before = [p.stat().st_mtime_ns for p in files]
    again = breast_cancer_cohort(bc_dir)
    assert [p.stat().st_mtime_ns for p in files] == before  # nothing rewritten
    assert len(again) == 198
    other = breast_cancer_cohort(tmp_path / "seed1", seed=1)
    assert not other.subjects["split"].equals(again.subjects["split"])
    assert not list(tmp_path.rglob("*.tmp"))


def test_veterans_cohort(tmp_path):
    cohort = veterans_cohort(tmp_path / "va")
    assert len(cohort) == 137 and int(cohort.subjects["death"].astype(int).sum()) == 128
    assert cohort.manifest.column("karnofsky").max == 100


def _mutated(bc_dir, tmp_path, change):
    """A copy of the cohort with ``change(df)`` applied to its subject table (all cells as text)."""
    root = tmp_path / "copy"
    shutil.copytree(bc_dir, root)
    df = pd.read_csv(root / "subjects.csv", dtype=str, keep_default_na=False)
    df = change(df)
    df.to_csv(root / "subjects.csv", index=False)
    return root


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda df: df.assign(tdm_days=df["tdm_days"].where(df.index != 4, "-12")),
         [r"subjects\.csv line 6", "'tdm_days'", "not > 0"]),
        (lambda df: df.assign(X200726_at=df["X200726_at"].where(df.index != 9, "high")),
         [r"subjects\.csv line 11", "'X200726_at'", "'high' is not a float"]),
        (lambda df: df.assign(subject_id=df["subject_id"].where(df.index != 7, df["subject_id"].iloc[2])),
         [r"subjects\.csv", "duplicate subject id 'gse7390-003'", r"lines \[4, 9\]"]),
        (lambda df: df.drop(columns=["age"]),
         [r"subjects\.csv", "column 'age'", "missing"]),
        (lambda df: df.assign(grade=df["grade"].where(df.index != 0, "grade 9")),
         [r"subjects\.csv line 2", "'grade'", "'grade 9' is not one of"]),
    ],
    ids=["negative-time", "non-numeric-gene", "duplicate-id", "missing-column", "unknown-category"],
)
def test_broken_copies_are_reported_by_file_line_and_column(bc_dir, tmp_path, change, expected):
    root = _mutated(bc_dir, tmp_path, change)
    with pytest.raises(ManifestError) as info:
        load_cohort(root)
    message = str(info.value)
    assert str(root / "manifest.json") in message
    for pattern in expected:
        assert re.search(pattern, message), (pattern, message)


def test_broken_manifest_is_reported(bc_dir, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(bc_dir, root)
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["survival"]["time"] = "t_missing"
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match="t_missing"):
        load_cohort(root)
    # the original is untouched by validation of the copy
    assert np.isfinite(load_cohort(bc_dir).subjects["tdm_days"]).all()


def test_real_dataset_cards_have_valid_manifest_examples(repo_root):
    from mmlib.data import Manifest

    real = repo_root / "data_manifest" / "real"
    index = (real / "README.md").read_text()
    cards = sorted(p for p in real.glob("*.md") if p.name != "README.md")
    assert len(cards) >= 9
    for card in cards:
        assert f"]({card.name})" in index, f"{card.name} is not in the index table"
        blocks = re.findall(r"```json\n(.*?)```", card.read_text(), flags=re.DOTALL)
        assert blocks, f"{card.name} has no manifest.json example"
        for block in blocks:
            Manifest.model_validate_json(block)  # raises, naming the field, if the example drifts from the schema


def test_open_cohort_takes_a_users_manifest_folder_or_generates(tmp_path):
    from mmlib.cohorts import open_cohort
    from mmlib.data.examples import breast_cancer_cohort

    own = breast_cancer_cohort(tmp_path / "own")
    mine = open_cohort("stroke_cta", tmp_path / "own", "smoke", seed=0)
    assert mine.name == own.name and len(mine) == 198 and not (tmp_path / "own" / "stroke_cta-smoke-seed0").exists()
    generated = open_cohort("stroke_cta", tmp_path / "gen", "smoke", seed=0, show_progress=False)
    assert generated.name == "stroke_cta" and generated.root == tmp_path / "gen" / "stroke_cta-smoke-seed0"
