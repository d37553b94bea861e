"""Bring your own data: real tables turned into cohort folders that :func:`~mmlib.data.load_cohort` reads.

:func:`breast_cancer_cohort` is the worked example: it converts the real breast-cancer survival
data that scikit-survival ships (GEO GSE7390, the TRANSBIG validation series) into a
``manifest.json`` + ``subjects.csv`` folder. Converting your own table follows the same steps
(see the function's docstring). :func:`veterans_cohort` does the same for the Veterans'
Administration lung cancer trial.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from mmlib.data.manifest import MANIFEST_NAME, Cohort, Column, Manifest, Survival, load_cohort
from mmlib.results import atomic_write_text

__all__ = ["breast_cancer_cohort", "stratified_split", "veterans_cohort", "write_cohort"]

#: The categories of the breast-cancer ``grade`` column exactly as the data spell them
#: (``"unkown"`` is the source's own spelling; kept so values round-trip unchanged).
BREAST_CANCER_GRADES = ["well differentiated", "intermediate", "poorly differentiated", "unkown"]


def stratified_split(event: np.ndarray, *, test_fraction: float = 0.3, seed: int = 0) -> np.ndarray:
    """A ``"train"``/``"test"`` label per subject, stratified by the event indicator.

    Uses :func:`sklearn.model_selection.train_test_split` with ``stratify=event``, so both splits
    hold events and censored subjects in (about) the cohort's proportion.

    Args:
        event: ``(N,)`` 0/1 or bool.
        test_fraction: share of subjects in ``"test"``.
        seed: the split's seed (same seed, same split).

    Returns:
        ``(N,)`` array of ``"train"``/``"test"``.
    """
    from sklearn.model_selection import train_test_split

    event = np.asarray(event).astype(int)
    index = np.arange(len(event))
    _, test = train_test_split(index, test_size=test_fraction, stratify=event, random_state=seed)
    split = np.full(len(event), "train", dtype=object)
    split[test] = "test"
    return split


def write_cohort(out_dir: str | os.PathLike, subjects: pd.DataFrame, manifest: Manifest) -> Cohort:
    """Write a tabular cohort folder (subject table + manifest), then load and validate it.

    Each file is written to a temporary name and renamed, the subject table first and the
    manifest last (a folder whose manifest exists is complete), and only when its bytes change,
    so a rerun with the same inputs rewrites nothing. Other files in ``out_dir`` are left alone.

    Args:
        out_dir: the cohort folder (created if absent).
        subjects: one row per subject, holding ``manifest.subject_columns()``.
        manifest: what the folder holds.

    Returns:
        The loaded :class:`~mmlib.data.Cohort`.

    Raises:
        ValueError: if ``subjects`` lacks a manifest column.
        mmlib.data.ManifestError: if the written cohort does not validate.
    """
    out = Path(out_dir)
    cols = manifest.subject_columns()
    missing = [c for c in cols if c not in subjects.columns]
    if missing:
        raise ValueError(f"the subject table lacks the manifest's columns {missing}")
    table = subjects[cols].to_csv(index=False, lineterminator="\n")
    files = {manifest.subjects: table, MANIFEST_NAME: manifest.model_dump_json(indent=2) + "\n"}
    for name, text in files.items():  # manifest last
        target = out / name
        if not (target.is_file() and target.read_text(encoding="utf-8") == text):
            atomic_write_text(target, text)
    return load_cohort(out)


def breast_cancer_cohort(out_dir: str | os.PathLike, *, seed: int = 0, test_fraction: float = 0.3) -> Cohort:
    """The real breast-cancer survival data of scikit-survival as a cohort folder.

    198 node-negative breast-cancer patients (GEO GSE7390, Desmedt et al. 2007): 76 gene
    expression values (Affymetrix probe sets of the 76-gene signature), age, oestrogen-receptor
    status, grade and tumour size; endpoint time to distant metastasis in days (51 events).
    Tabular only: no modality files and no ground-truth card.

    This is also the recipe for converting your own table:

    1. Load the table and give every subject a unique string id (``subject_id``).
    2. Decide each column's type: ``float``/``int`` with a unit, ``category`` with its allowed
       values, ``bool``, ``string``, ``datetime``; write one :class:`~mmlib.data.Column` each.
    3. Survival: a time column (> 0, with its unit) and a 0/1 event column, named in
       :class:`~mmlib.data.Survival`. Classification labels go in ``labels``.
    4. Add a ``split`` column (here: train/test stratified by the event, fixed seed) and name it
       ``split_column``; image/signal/text files go in modality columns as paths relative to the
       folder (:class:`~mmlib.data.Modality`).
    5. Write ``subjects.csv`` and ``manifest.json`` (:func:`write_cohort`) and load the folder
       with :func:`~mmlib.data.load_cohort`, which reports every bad cell by file, line and column.
    6. Pass the folder to a notebook as its ``data_dir``/``manifest`` parameter.

    Args:
        out_dir: the cohort folder (created; rerunning with the same arguments rewrites nothing).
        seed: seed of the stratified split.
        test_fraction: share of subjects in the ``test`` split.

    Returns:
        The loaded, validated :class:`~mmlib.data.Cohort`.
    """
    from sksurv.datasets import load_breast_cancer

    X, y = load_breast_cancer()
    genes = [c for c in X.columns if c not in ("age", "er", "grade", "size")]
    df = pd.DataFrame({"subject_id": [f"gse7390-{i + 1:03d}" for i in range(len(X))]})
    for g in genes:
        df[g] = X[g].to_numpy(dtype=float)
    df["age"] = X["age"].to_numpy(dtype=float)
    df["er"] = X["er"].astype(str).to_numpy()
    df["grade"] = X["grade"].astype(str).to_numpy()
    df["size"] = X["size"].to_numpy(dtype=float)
    df["tdm_days"] = y["t.tdm"].astype(float)
    df["tdm_event"] = y["e.tdm"].astype(int)
    df["split"] = stratified_split(df["tdm_event"].to_numpy(), test_fraction=test_fraction, seed=seed)

    columns = [
        Column(
            name=g,
            dtype="float",
            unit="log2 expression",
            description=f"Affymetrix HG-U133A probe set {g.removeprefix('X')} (76-gene signature)",
        )
        for g in genes
    ]
    columns += [
        Column(name="age", dtype="float", unit="years", description="age at diagnosis", min=0, max=120),
        Column(name="er", dtype="category", categories=["negative", "positive"],
               description="oestrogen-receptor status"),
        Column(name="grade", dtype="category", categories=BREAST_CANCER_GRADES,
               description="histological grade ('unkown' is the source's spelling of unknown)"),
        Column(name="size", dtype="float", unit="cm", description="tumour size", min=0),
        Column(name="tdm_days", dtype="float", unit="days",
               description="time to distant metastasis or censoring (t.tdm)"),
        Column(name="tdm_event", dtype="int", min=0, max=1, description="1 = distant metastasis observed (e.tdm)"),
        Column(name="split", dtype="category", categories=["train", "test"],
               description=f"stratified by tdm_event, seed {seed}, test fraction {test_fraction:g}"),
    ]
    manifest = Manifest(
        name="breast_cancer_gse7390",
        description=(
            "Real data: 198 node-negative breast-cancer patients of the TRANSBIG validation series (GEO GSE7390; "
            "Desmedt et al., Clin Cancer Res 2007), as shipped by scikit-survival (sksurv.datasets.load_breast_cancer)."
        ),
        columns=columns,
        survival=Survival(time="tdm_days", event="tdm_event", unit="days"),
        split_column="split",
    )
    return write_cohort(out_dir, df, manifest)


def veterans_cohort(out_dir: str | os.PathLike, *, seed: int = 0, test_fraction: float = 0.3) -> Cohort:
    """The Veterans' Administration lung cancer trial (137 patients) of scikit-survival as a cohort folder.

    Columns: ``celltype`` (4 categories), ``karnofsky`` (0-100), ``months_from_diagnosis``,
    ``age`` (years), ``prior_therapy`` and ``treatment`` (categories); survival in days
    (128 deaths). Same steps as :func:`breast_cancer_cohort`.
    """
    from sksurv.datasets import load_veterans_lung_cancer

    X, y = load_veterans_lung_cancer()
    df = pd.DataFrame({"subject_id": [f"va-{i + 1:03d}" for i in range(len(X))]})
    df["age"] = X["Age_in_years"].to_numpy(dtype=float)
    df["celltype"] = X["Celltype"].astype(str).to_numpy()
    df["karnofsky"] = X["Karnofsky_score"].to_numpy(dtype=float)
    df["months_from_diagnosis"] = X["Months_from_Diagnosis"].to_numpy(dtype=float)
    df["prior_therapy"] = X["Prior_therapy"].astype(str).to_numpy()
    df["treatment"] = X["Treatment"].astype(str).to_numpy()
    df["survival_days"] = y["Survival_in_days"].astype(float)
    df["death"] = y["Status"].astype(int)
    df["split"] = stratified_split(df["death"].to_numpy(), test_fraction=test_fraction, seed=seed)
    cats = {c: sorted(df[c].unique().tolist()) for c in ("celltype", "prior_therapy", "treatment")}
    manifest = Manifest(
        name="veterans_lung_cancer",
        description=(
            "Real data: Veterans' Administration lung cancer trial (Kalbfleisch & Prentice), "
            "as shipped by scikit-survival."
        ),
        columns=[
            Column(name="age", dtype="float", unit="years", min=0, max=120),
            Column(name="celltype", dtype="category", categories=cats["celltype"]),
            Column(name="karnofsky", dtype="float", unit="points", min=0, max=100,
                   description="Karnofsky performance score"),
            Column(name="months_from_diagnosis", dtype="float", unit="months", min=0),
            Column(name="prior_therapy", dtype="category", categories=cats["prior_therapy"]),
            Column(name="treatment", dtype="category", categories=cats["treatment"]),
            Column(name="survival_days", dtype="float", unit="days"),
            Column(name="death", dtype="int", min=0, max=1, description="1 = died"),
            Column(name="split", dtype="category", categories=["train", "test"],
                   description=f"stratified by death, seed {seed}, test fraction {test_fraction:g}"),
        ],
        survival=Survival(time="survival_days", event="death", unit="days"),
        split_column="split",
    )
    return write_cohort(out_dir, df, manifest)
