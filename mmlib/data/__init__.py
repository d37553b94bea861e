"""Cohorts on disk: the manifest schema, validation and loading (:mod:`mmlib.data.manifest`),
and readers for the real formats (:mod:`mmlib.data.readers`)."""

from mmlib.data.manifest import (
    Cohort,
    Column,
    LongTable,
    Manifest,
    ManifestError,
    Modality,
    Survival,
    default_data_dir,
    load_cohort,
)

__all__ = [
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
