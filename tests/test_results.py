import json

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import torch

from mmlib import core, results


def _run(tmp_path, name="nb"):
    return results.Run(
        tmp_path / name, notebook=name, title="t", params={"profile": "smoke", "seed": 1},
        seed=1, device=torch.device("cpu"), profile=core.Profile(name="smoke"),
    )


def test_table_writes_csv_and_markdown_with_fixed_precision(tmp_path):
    run = _run(tmp_path)
    df = pd.DataFrame({"model": ["a", "b"], "auc": [0.123456789, 2 / 3], "n": [10, 20]})
    csv = run.table(df, "scores", caption="Scores")
    assert csv == tmp_path / "nb" / "tables" / "scores.csv"
    assert csv.read_text() == "model,auc,n\na,0.123457,10\nb,0.666667,20\n"
    md = (tmp_path / "nb" / "tables" / "scores.md").read_text()
    assert md.startswith("Scores\n\n|") and "0.666667" in md
    assert "\r" not in csv.read_text()


def test_same_data_gives_identical_bytes_and_noise_below_precision_is_absorbed(tmp_path):
    base = pd.DataFrame({"x": np.linspace(0.1, 1, 7)})
    a = _run(tmp_path, "a").table(base, "t").read_bytes()
    b = _run(tmp_path, "b").table(base + 1e-12, "t").read_bytes()
    c = _run(tmp_path, "c").table(base + 1e-3, "t").read_bytes()
    assert a == b
    assert a != c


def test_figure_writes_reproducible_png_and_svg(tmp_path):
    outs = []
    for name in ("a", "b"):
        fig, ax = plt.subplots()
        ax.plot([0, 1, 2], [1, 0, 1], label="curve")
        ax.legend()
        png = _run(tmp_path, name).figure(fig, "curve", caption="c", close=True)
        svg = png.with_suffix(".svg")
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert svg.read_text().lstrip().startswith("<?xml")
        outs.append((png.read_bytes(), svg.read_bytes()))
    assert outs[0] == outs[1]


def test_run_json_records_provenance_stages_and_artifacts(tmp_path):
    run = _run(tmp_path)
    rec = json.loads((tmp_path / "nb" / "run.json").read_text())
    assert rec["status"] == "running"
    with run.stage("train"):
        sum(range(10000))
    with run.stage("train"):
        pass
    run.table(pd.DataFrame({"a": [1]}), "t1", caption="cap")
    fig = plt.figure()
    run.figure(fig, "f1", close=True)
    rec = run.finish()
    assert rec == json.loads((tmp_path / "nb" / "run.json").read_text())
    assert rec["status"] == "complete"
    assert rec["seed"] == 1 and rec["params"] == {"profile": "smoke", "seed": 1}
    assert rec["profile"] == {"name": "smoke"}
    assert set(rec["git"]) == {"commit", "dirty"}
    assert len(rec["git"]["commit"]) in (40, len("unknown"))
    env = rec["environment"]
    assert env["device"] == "cpu" and env["packages"]["torch"].startswith(torch.__version__.split("+")[0])
    assert list(rec["stages_s"]) == ["train"] and rec["stages_s"]["train"] >= 0
    arts = {(a["kind"], a["name"]): a for a in rec["artifacts"]}
    assert arts[("table", "t1")]["files"] == ["tables/t1.csv", "tables/t1.md"]
    assert arts[("table", "t1")]["caption"] == "cap"
    assert arts[("figure", "f1")]["files"] == ["figures/f1.png", "figures/f1.svg"]


def test_saving_twice_under_one_name_keeps_one_artifact(tmp_path):
    run = _run(tmp_path)
    run.table(pd.DataFrame({"a": [1]}), "t")
    run.table(pd.DataFrame({"a": [2]}), "t")
    rec = run.finish()
    assert [a["name"] for a in rec["artifacts"]] == ["t"]
    assert (tmp_path / "nb" / "tables" / "t.csv").read_text() == "a\n2\n"


@pytest.mark.parametrize("bad", ["../escape", "a/b", "", " lead", "x y"])
def test_bad_artifact_names_are_refused(tmp_path, bad):
    with pytest.raises(ValueError, match="artifact name"):
        _run(tmp_path).table(pd.DataFrame({"a": [1]}), bad)


def test_table_refuses_non_dataframes(tmp_path):
    with pytest.raises(TypeError, match="'t'.*DataFrame"):
        _run(tmp_path).table([[1, 2]], "t")


def test_paper_vs_run_needs_its_columns(tmp_path):
    run = _run(tmp_path)
    with pytest.raises(ValueError, match="held on this data"):
        run.paper_vs_run([{"quantity": "AUC", "paper reported": "0.7", "this run": 0.6}])
    path = run.paper_vs_run([{"quantity": "AUC", "paper reported": "0.7", "this run": 0.6, "held on this data": "no"}])
    assert path.name == "paper_vs_run.csv"


def test_atomic_write_keeps_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "t.txt"
    results.atomic_write_text(target, "old")
    with pytest.raises(TypeError):
        results.atomic_write_bytes(target, "not bytes")  # fails inside the write
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.txt"], "no temporary file may be left behind"


def test_git_commit_outside_a_repository(tmp_path):
    assert results.git_commit(tmp_path) == {"commit": "unknown", "dirty": None}


def test_environment_table_lists_device_and_versions():
    table = results.environment_table(torch.device("cpu"))
    assert list(table.columns) == ["item", "value"]
    values = dict(zip(table["item"], table["value"], strict=True))
    assert values["device"].startswith("cpu (")
    assert values["torch"] == torch.__version__
    assert values["autocast"] in ("bfloat16", "fp32")
