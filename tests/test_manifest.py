"""Manifest validation: every bad-input case gives an error naming file, line and column."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from mmlib.data import Column, LongTable, Manifest, ManifestError, Modality, Survival, load_cohort
from mmlib.data.manifest import default_data_dir

SCHEMA_FILE = Path(__file__).resolve().parents[1] / "data_manifest" / "schema" / "manifest.schema.json"


def _manifest() -> Manifest:
    return Manifest(
        name="mini",
        columns=[
            Column(name="age", dtype="float", unit="years", min=0, max=120),
            Column(name="sex", dtype="category", categories=["F", "M"]),
            Column(name="smoker", dtype="bool", nullable=True),
            Column(name="label", dtype="int", nullable=True),
            Column(name="time", dtype="float", unit="days"),
            Column(name="event", dtype="int"),
            Column(name="split", dtype="category", categories=["train", "test", "pretrain"]),
            Column(name="site", dtype="string"),
        ],
        modalities=[
            Modality(name="image", column="image_path", format="nifti"),
            Modality(name="mask", column="mask_path", format="nifti"),
            Modality(name="report", column="report_path", format="text", required=False),
        ],
        labels=["label"],
        survival=Survival(time="time", event="event"),
        split_column="split",
        site_column="site",
        tables=[
            LongTable(
                name="events",
                path="events.csv",
                columns=[Column(name="day", dtype="float", unit="days"), Column(name="code", dtype="string")],
            )
        ],
    )


@pytest.fixture
def cohort_dir(tmp_path: Path) -> Path:
    root = tmp_path / "mini"
    (root / "img").mkdir(parents=True)
    rows = []
    for i in range(8):
        sid = f"s{i}"
        nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.int16), np.eye(4)), root / "img" / f"{sid}.nii.gz")
        nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.uint8), np.eye(4)), root / "img" / f"{sid}_mask.nii.gz")
        rows.append(
            {
                "subject_id": sid,
                "image_path": f"img/{sid}.nii.gz",
                "mask_path": f"img/{sid}_mask.nii.gz",
                "report_path": "",
                "age": 50 + i,
                "sex": "FM"[i % 2],
                "smoker": ["yes", "no", ""][i % 3],
                "label": [0, 1, 1, 0][i % 4] if i < 6 else "",
                "time": 100.0 + i,
                "event": [1, 0][i % 2] if i < 4 else [0, 1][i % 2],
                "split": ["train", "train", "test", "test", "train", "test", "pretrain", "pretrain"][i],
                "site": "A",
            }
        )
    pd.DataFrame(rows).to_csv(root / "subjects.csv", index=False)
    pd.DataFrame({"subject_id": ["s0", "s0", "s3"], "day": [-10, -2, -5], "code": ["I10", "E11", "I10"]}).to_csv(
        root / "events.csv", index=False
    )
    (root / "manifest.json").write_text(_manifest().model_dump_json(indent=2))
    return root


def _edit(root: Path, line: int, column: str, value) -> None:
    df = pd.read_csv(root / "subjects.csv", dtype=str, keep_default_na=False)
    df.loc[line - 2, column] = value
    df.to_csv(root / "subjects.csv", index=False)


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def _problems(root: Path) -> str:
    before = _snapshot(root)
    with pytest.raises(ManifestError) as err:
        load_cohort(root)
    assert _snapshot(root) == before, "validation must not write anything"
    return str(err.value)


def test_valid_cohort_loads_typed(cohort_dir):
    cohort = load_cohort(cohort_dir)
    assert len(cohort) == 8 and cohort.ids[0] == "s0"
    df = cohort.subjects
    assert df["age"].dtype == float and str(df["sex"].dtype) == "category"
    assert df["smoker"].isna().sum() == 2 and bool(df["smoker"].iloc[0]) is True
    assert cohort.path("image", "s3") == cohort_dir / "img" / "s3.nii.gz"
    assert cohort.paths("report") == [None] * 8
    assert len(cohort.split("pretrain")) == 2
    assert list(cohort.tables["events"]["subject_id"]) == ["s0", "s0", "s3"]


def test_parquet_subject_table_loads_the_same(cohort_dir):
    df = pd.read_csv(cohort_dir / "subjects.csv", dtype=str, keep_default_na=False, na_values=[""])
    df.to_parquet(cohort_dir / "subjects.parquet")
    m = json.loads((cohort_dir / "manifest.json").read_text())
    m["subjects"] = "subjects.parquet"
    (cohort_dir / "manifest.json").write_text(json.dumps(m))
    pd.testing.assert_frame_equal(load_cohort(cohort_dir).subjects, load_cohort(cohort_dir).subjects)
    assert load_cohort(cohort_dir).subjects["age"].tolist() == [50.0 + i for i in range(8)]


def test_missing_file(cohort_dir):
    (cohort_dir / "img" / "s2_mask.nii.gz").unlink()
    msg = _problems(cohort_dir)
    assert "subjects.csv line 4 (subject_id='s2'), column 'mask_path': mask file 'img/s2_mask.nii.gz': file not found" in msg


def test_unreadable_or_wrong_format_file(cohort_dir):
    (cohort_dir / "img" / "s1.nii.gz").write_bytes(b"")
    (cohort_dir / "img" / "s5.nii.gz").write_text("not an image")
    msg = _problems(cohort_dir)
    assert "line 3 (subject_id='s1'), column 'image_path': image file 'img/s1.nii.gz': empty file" in msg
    assert "line 7 (subject_id='s5'), column 'image_path'" in msg and "does not look like a nifti file" in msg


def test_duplicate_ids(cohort_dir):
    _edit(cohort_dir, 5, "subject_id", "s1")
    assert "subjects.csv, column 'subject_id': duplicate subject id 's1' on lines [3, 5]" in _problems(cohort_dir)


def test_subject_with_one_modality_but_not_the_other(cohort_dir):
    _edit(cohort_dir, 6, "mask_path", "")
    msg = _problems(cohort_dir)
    assert "line 6 (subject_id='s4'): subject has image but no mask (column 'mask_path' is empty" in msg


def test_wrong_types(cohort_dir):
    _edit(cohort_dir, 2, "age", "sixty")
    _edit(cohort_dir, 3, "sex", "X")
    _edit(cohort_dir, 4, "smoker", "sometimes")
    msg = _problems(cohort_dir)
    assert "line 2 (subject_id='s0'), column 'age': 'sixty' is not a float" in msg
    assert "line 3 (subject_id='s1'), column 'sex': 'X' is not one of ['F', 'M']" in msg
    assert "line 4 (subject_id='s2'), column 'smoker': 'sometimes' is not a bool" in msg


def test_nan_where_not_allowed_and_out_of_range(cohort_dir):
    _edit(cohort_dir, 7, "age", "")
    _edit(cohort_dir, 8, "age", "250")
    msg = _problems(cohort_dir)
    assert "line 7 (subject_id='s5'), column 'age': missing value" in msg
    assert "line 8 (subject_id='s6'), column 'age': 250 is outside [0, 120] years" in msg


@pytest.mark.parametrize("bad", ["0", "-3.5"])
def test_non_positive_survival_time(cohort_dir, bad):
    _edit(cohort_dir, 4, "time", bad)
    msg = _problems(cohort_dir)
    assert f"line 4 (subject_id='s2'), column 'time': survival time {float(bad):g} days is not > 0" in msg


def test_event_must_be_zero_or_one(cohort_dir):
    _edit(cohort_dir, 2, "event", "2")
    assert "line 2 (subject_id='s0'), column 'event': event 2 is not 0 or 1" in _problems(cohort_dir)


def test_split_with_a_single_class(cohort_dir):
    # test split = s2, s3, s5: make every label 1
    _edit(cohort_dir, 4, "label", "1")
    _edit(cohort_dir, 5, "label", "1")
    msg = _problems(cohort_dir)
    assert "subjects.csv, column 'label': split 'test' has a single label value (1 in all 3 labelled subjects)" in msg
    # the unlabelled pretraining split is not a problem
    assert "'pretrain'" not in msg


def test_long_table_row_with_unknown_subject(cohort_dir):
    ev = pd.read_csv(cohort_dir / "events.csv", dtype=str)
    ev.loc[1, "subject_id"] = "s99"
    ev.loc[2, "day"] = "yesterday"
    ev.to_csv(cohort_dir / "events.csv", index=False)
    msg = _problems(cohort_dir)
    assert "events.csv line 3, column 'subject_id': subject 's99' is not in subjects.csv" in msg
    assert "events.csv line 4 (subject_id='s3'), column 'day': 'yesterday' is not a float" in msg


def test_manifest_itself_is_checked(cohort_dir):
    good = json.loads((cohort_dir / "manifest.json").read_text())
    (cohort_dir / "manifest.json").write_text(json.dumps({**good, "colums": []}))
    assert "manifest.json: 1 problem(s)\n  - colums: Extra inputs are not permitted" in _problems(cohort_dir)
    (cohort_dir / "manifest.json").write_text(json.dumps({**good, "labels": ["stroke"]}))
    assert "label 'stroke' is not a declared column" in _problems(cohort_dir)


def test_all_problems_are_reported_at_once(cohort_dir):
    _edit(cohort_dir, 2, "age", "x")
    _edit(cohort_dir, 3, "time", "-1")
    (cohort_dir / "img" / "s7.nii.gz").unlink()
    err = pytest.raises(ManifestError, load_cohort, cohort_dir).value
    assert len(err.problems) == 3
    assert str(err).startswith(f"{cohort_dir / 'manifest.json'}: 3 problem(s)")


def test_missing_manifest_and_missing_table(tmp_path):
    with pytest.raises(ManifestError, match="manifest not found"):
        load_cohort(tmp_path)
    (tmp_path / "manifest.json").write_text(_manifest().model_dump_json())
    with pytest.raises(ManifestError, match=r"subjects.csv: 1 problem\(s\)\n  - subject table not found"):
        load_cohort(tmp_path)


def test_copy_of_a_cohort_still_loads(cohort_dir, tmp_path):
    # paths are relative to the manifest, so a cohort folder can move
    moved = shutil.copytree(cohort_dir, tmp_path / "elsewhere" / "mini")
    assert load_cohort(moved / "manifest.json").path("image", "s0") == moved / "img" / "s0.nii.gz"


def test_data_dir_default_and_env(monkeypatch, tmp_path):
    monkeypatch.delenv("MMLIB_DATA_DIR", raising=False)
    assert default_data_dir() == Path(__file__).resolve().parents[1] / "data"
    monkeypatch.setenv("MMLIB_DATA_DIR", str(tmp_path))
    assert default_data_dir() == tmp_path.resolve()


def test_published_json_schema_is_current():
    committed = json.loads(SCHEMA_FILE.read_text())
    assert committed == Manifest.model_json_schema(), "regenerate with: python -m mmlib schema"
