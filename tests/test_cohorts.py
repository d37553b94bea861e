"""Properties every registered generator must have, checked on each of the five."""

from __future__ import annotations

import json

import pytest

from mmlib.cohorts import GENERATORS, generator
from mmlib.cohorts.base import recorded_checksums


@pytest.mark.parametrize("name", sorted(GENERATORS))
def test_same_seed_same_bytes_whatever_the_workers(name, tmp_path):
    one = generator(name, "smoke").generate(out_dir=tmp_path / "one", seed=0, workers=1, show_progress=False)
    two = generator(name, "smoke").generate(out_dir=tmp_path / "two", seed=0, workers=2, show_progress=False)
    other = generator(name, "smoke").generate(out_dir=tmp_path / "other", seed=1, workers=2, show_progress=False)
    assert one.name == name and len(one) == generator(name, "smoke").knobs.n_subjects
    assert recorded_checksums(one.root) == recorded_checksums(two.root)
    a, c = recorded_checksums(one.root), recorded_checksums(other.root)
    assert a["subjects.csv"] != c["subjects.csv"] and a["truth.json"] != c["truth.json"]
    # the first subject's rendered files depend on the seed too (not only the table)
    first = json.loads((one.root / "cohort.json").read_text())["subjects"]["0"]["files"]
    assert first and any(a[f] != c.get(f) for f in first)
