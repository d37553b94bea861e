"""Claims across seeds: the side-by-side table, its refusals, the CLI and one end-to-end replicate."""

import json
import subprocess
import textwrap
from pathlib import Path

import pandas as pd
import pytest

from mmlib import replicates
from mmlib.__main__ import main

ROOT = Path(__file__).resolve().parents[1]
PROFILE = {"name": "quick", "epochs": 3}


def _run_dir(root, seed, verdicts, *, notebook="pX_demo", profile=PROFILE, threads=2, status="complete",
             commit="a" * 40, dirty=False, columns=("claim", "paper reported", "this run", "held"),
             data_dir="../data", device="auto"):
    d = root / f"seed{seed}" / notebook
    (d / "tables").mkdir(parents=True)
    record = {"notebook": notebook, "status": status, "seed": seed, "profile": profile,
              "git": {"commit": commit, "dirty": dirty}, "execution": {"threads": threads},
              "params": {"seed": seed, "data_dir": data_dir, "device": device}}
    (d / "run.json").write_text(json.dumps(record))
    rows = [{"claim": c, "paper reported": f"paper says {c}", "this run": f"seed {seed}", "held": v}
            for c, v in verdicts.items()]
    pd.DataFrame(rows, columns=list(columns)).to_csv(d / "tables" / "claims.csv", index=False)
    return d


def test_verdicts_line_up_by_seed_and_only_unanimous_claims_count_as_stable(tmp_path):
    d2 = _run_dir(tmp_path, 2, {"A": "yes", "B": "no", "C": "partly: ahead, but the CI reaches 0", "D": "yes",
                                "E": "not tested"})
    d0 = _run_dir(tmp_path, 0, {"A": "yes", "B": "yes", "C": "partly: on 3 of 5 metrics", "E": "not tested"})
    d1 = _run_dir(tmp_path, 1, {"A": "yes", "B": "yes", "C": "partly", "E": "not tested"}, commit="b" * 40,
                  dirty=True)
    t = replicates.claims_by_seed([d2, d0, d1])  # given out of order: columns follow the seeds
    assert list(t.columns) == ["claim", "paper reported", "seed 0", "seed 1", "seed 2", "verdicts",
                               "same at every seed"]
    assert t["claim"].tolist() == ["A", "B", "C", "E", "D"]  # seed 0's order; D (seed 2 only) last
    rows = t.set_index("claim")
    assert rows.loc["B", ["seed 0", "seed 1", "seed 2"]].tolist() == ["yes", "yes", "no"]
    assert rows.loc["B", "verdicts"] == "yes 2, no 1"
    assert rows.loc["D", "verdicts"] == "- 2, yes 1"
    assert rows.loc["C", ["seed 0", "seed 2"]].tolist() == ["partly", "partly"]  # the verdict, not its reason
    assert rows["same at every seed"].to_dict() == {"A": "yes", "B": "no", "C": "yes", "E": "yes", "D": "no"}
    assert rows.loc["A", "paper reported"] == "paper says A"
    assert t.attrs["seeds"] == [0, 1, 2]
    assert t.attrs["commits"] == {0: "a" * 40, 1: "b" * 40 + "+dirty", 2: "a" * 40}
    caption = replicates.claims_caption(t)
    assert "2 of 4 tested claims reach the same verdict at every seed (1 not tested at any seed)" in caption and "seed 1: bbbbbbbbbbbb" in caption and "2 thread(s)" in caption


@pytest.mark.parametrize("change, needle", [
    ({"notebook": "pY_other"}, "notebook"),
    ({"profile": {"name": "quick", "epochs": 4}}, "fields ['epochs']"),
    ({"threads": 1}, "threads"),
])
def test_runs_that_differ_in_more_than_the_seed_are_refused_naming_both_folders(tmp_path, change, needle):
    a = _run_dir(tmp_path, 0, {"A": "yes"})
    b = _run_dir(tmp_path / "other", 1, {"A": "no"}, **change)
    with pytest.raises(ValueError, match="only the seed may differ") as info:
        replicates.claims_by_seed([a, b])
    assert needle in str(info.value) and str(a) in str(info.value) and str(b) in str(info.value)


def test_bad_runs_are_named(tmp_path):
    a = _run_dir(tmp_path, 0, {"A": "yes"})
    with pytest.raises(ValueError, match="at least two"):
        replicates.claims_by_seed([a])
    twin = _run_dir(tmp_path / "twin", 0, {"A": "no"})
    with pytest.raises(ValueError, match="seed 0 twice"):
        replicates.claims_by_seed([a, twin])
    running = _run_dir(tmp_path, 1, {"A": "yes"}, status="running")
    with pytest.raises(ValueError, match=r"run\.json: status is 'running'"):
        replicates.claims_by_seed([a, running])
    no_held = _run_dir(tmp_path, 2, {"A": "yes"}, columns=("claim", "this run"))
    with pytest.raises(ValueError, match=r"claims\.csv: lacks column\(s\) \['held'\]"):
        replicates.claims_by_seed([a, no_held])
    twice = _run_dir(tmp_path, 3, {"A": "yes"})
    pd.DataFrame({"claim": ["A", "A"], "held": ["yes", "no"]}).to_csv(twice / "tables" / "claims.csv", index=False)
    with pytest.raises(ValueError, match=r"repeats \['A'\]"):
        replicates.claims_by_seed([a, twice])
    no_table = _run_dir(tmp_path, 4, {"A": "yes"})
    (no_table / "tables" / "claims.csv").unlink()
    with pytest.raises(FileNotFoundError, match=str(no_table / "tables" / "claims.csv")):
        replicates.claims_by_seed([a, no_table])


def test_claims_command_writes_the_table_and_fails_cleanly(tmp_path, capsys):
    a = _run_dir(tmp_path, 0, {"A": "yes", "B": "no"})
    b = _run_dir(tmp_path, 1, {"A": "yes", "B": "partly"})
    out = tmp_path / "out"
    assert main(["claims", str(a), str(b), "--out", str(out)]) == 0
    csv = pd.read_csv(out / "pX_demo_claims_by_seed.csv", dtype=str)
    assert csv["same at every seed"].tolist() == ["yes", "no"]
    md = (out / "pX_demo_claims_by_seed.md").read_text()
    assert md.startswith("pX_demo, profile quick") and "1 of 2 tested claims" in md
    assert "1 of 2 tested claims" in capsys.readouterr().out
    assert main(["claims", str(a), str(tmp_path / "nowhere"), "--out", str(out)]) == 2
    assert "nowhere/run.json" in capsys.readouterr().err


def test_any_verdict_table_keyed_by_several_columns_with_a_value_beside_each_verdict(tmp_path, capsys):
    dirs = []
    for seed, (v, ratio) in enumerate([("yes", "1.75445"), ("yes", "1.21"), ("no", "n/a")]):
        d = _run_dir(tmp_path, seed, {"A": "yes"})
        pd.DataFrame({"method": ["CLIP", "CLIP"], "map": ["Grad-CAM", "HiResCAM"], "verdict": ["no", v],
                      "ratio_to_random": ["0.09", ratio]}).to_csv(d / "tables" / "stages.csv", index=False)
        dirs.append(str(d))
    t = replicates.claims_by_seed(dirs, table="stages", key=["method", "map"], verdict="verdict",
                                  value="ratio_to_random")
    assert list(t.columns) == ["method · map", "seed 0", "seed 1", "seed 2", "verdicts", "same at every seed"]
    rows = t.set_index("method · map")
    assert rows.loc["CLIP · HiResCAM", ["seed 0", "seed 1", "seed 2"]].tolist() == ["yes (1.75)", "yes (1.21)",
                                                                                   "no (n/a)"]
    assert rows["verdicts"].tolist() == ["no 3", "yes 2, no 1"]  # the values do not split a verdict
    assert rows["same at every seed"].tolist() == ["yes", "no"]
    assert "1 of 2 tested rows of stages" in replicates.claims_caption(t)
    out = tmp_path / "out"
    assert main(["claims", *dirs, "--out", str(out), "--table", "stages", "--key", "method", "map",
                 "--verdict", "verdict", "--value", "ratio_to_random"]) == 0
    assert (out / "pX_demo_stages_by_seed.md").is_file()
    assert main(["claims", *dirs, "--table", "stages", "--key", "method", "--verdict", "verdict"]) == 2
    assert "method repeats ['CLIP']" in capsys.readouterr().err
    assert main(["claims", *dirs, "--table", "stages", "--key", "method", "map", "--verdict", "verdict",
                 "--ceiling", "grid_ceiling"]) == 2
    assert "--ceiling needs --value" in capsys.readouterr().err


def test_a_ceiling_is_shown_after_each_value_and_a_run_without_the_column_shows_the_value_alone(tmp_path, capsys):
    dirs = []
    for seed, ceiling in enumerate([("2.2134", "7.21"), ("2.33", "7.64"), None]):
        d = _run_dir(tmp_path, seed, {"A": "yes"})
        stages = pd.DataFrame({"method": ["CLIP", "CLIP"], "stage": ["layer4", "layer3"], "verdict": ["no", "yes"],
                               "ratio_to_random": [f"1.0{seed}", f"3.{seed}"]})
        if ceiling:  # the third run predates the column
            stages["grid_ceiling"] = list(ceiling)
        stages.to_csv(d / "tables" / "stages.csv", index=False)
        dirs.append(str(d))
    t = replicates.claims_by_seed(dirs, table="stages", key=["method", "stage"], verdict="verdict",
                                  value="ratio_to_random", ceiling="grid_ceiling")
    rows = t.set_index("method · stage")
    assert rows.loc["CLIP · layer4", ["seed 0", "seed 1", "seed 2"]].tolist() == [
        "no (1 / 2.21)", "no (1.01 / 2.33)", "no (1.02)"]
    assert rows.loc["CLIP · layer3", ["seed 0", "seed 1"]].tolist() == ["yes (3 / 7.21)", "yes (3.1 / 7.64)"]
    assert "(in brackets: ratio_to_random / grid_ceiling)" in replicates.claims_caption(t)
    plain = replicates.claims_by_seed(dirs, table="stages", key=["method", "stage"], verdict="verdict",
                                      value="ratio_to_random")
    assert plain["seed 0"].tolist() == ["no (1)", "yes (3)"]
    assert "(in brackets: ratio_to_random)" in replicates.claims_caption(plain)
    out = tmp_path / "out"
    assert main(["claims", *dirs, "--out", str(out), "--table", "stages", "--key", "method", "stage",
                 "--verdict", "verdict", "--value", "ratio_to_random", "--ceiling", "grid_ceiling"]) == 0
    assert "no (1.01 / 2.33)" in (out / "pX_demo_stages_by_seed.md").read_text()


def test_replicate_shows_the_ceiling_a_pipeline_declares(tmp_path, monkeypatch):
    nb = tmp_path / "notebooks" / "pX_demo.py"
    nb.parent.mkdir()
    nb.write_text('run.table(claims, "claims")\n')
    monkeypatch.setattr(replicates, "git_commit", lambda: {"commit": "a" * 40, "dirty": False})
    declared = replicates.VerdictTable("stages", ("stage",), "verdict", "ratio_to_random", "grid_ceiling")
    monkeypatch.setattr(replicates, "verdict_tables", lambda notebook: [replicates.CLAIMS, declared])

    def fake_run(notebook, root, *, seed, **kw):
        d = _run_dir(Path(root).parent, seed, {"A": "yes"})
        pd.DataFrame({"stage": ["layer4"], "verdict": ["no"], "ratio_to_random": [f"0.{seed + 5}"],
                      "grid_ceiling": ["2.3"]}).to_csv(d / "tables" / "stages.csv", index=False)
        return d

    monkeypatch.setattr("mmlib.runner.run_notebook", fake_run)
    tables = replicates.replicate(nb, [0, 1], tmp_path / "reps", threads=2)
    assert tables["stages"].loc[0, ["seed 0", "seed 1"]].tolist() == ["no (0.5 / 2.3)", "no (0.6 / 2.3)"]


def test_a_pipeline_declares_its_other_verdict_tables_and_a_run_may_lack_them(tmp_path):
    from mmlib.pipelines import p1

    assert replicates.verdict_tables("p1_stroke_mri_clip_itm") == [replicates.CLAIMS, *p1.VERDICT_TABLES]
    assert replicates.verdict_tables("pZ_parity") == [replicates.CLAIMS]
    assert replicates.verdict_tables("00_overview") == [replicates.CLAIMS]
    a = _run_dir(tmp_path, 0, {"A": "yes"})
    pd.DataFrame({"map": ["Grad-CAM"], "verdict": ["no"]}).to_csv(a / "tables" / "maps.csv", index=False)
    b = _run_dir(tmp_path, 1, {"A": "yes"})  # no maps table at all
    c = _run_dir(tmp_path, 2, {"A": "yes"})
    pd.DataFrame({"note": ["no true-positive case"]}).to_csv(c / "tables" / "maps.csv", index=False)
    with pytest.raises(FileNotFoundError, match="wrote no 'maps' table"):
        replicates.claims_by_seed([a, b], table="maps", key=["map"], verdict="verdict")
    t = replicates.claims_by_seed([a, b, c], table="maps", key=["map"], verdict="verdict", missing_ok=True)
    assert t.iloc[0][["seed 0", "seed 1", "seed 2"]].tolist() == ["no", "-", "-"]
    assert replicates.claims_by_seed([b, c], table="maps", key=["map"], verdict="verdict", missing_ok=True).empty


def test_a_finished_run_is_reused_only_from_the_same_clean_commit_profile_and_threads(tmp_path):
    clean = {"commit": "a" * 40, "dirty": False}
    d = _run_dir(tmp_path, 0, {"A": "yes"})
    assert replicates._reusable(d, "quick", 2, clean)
    assert not replicates._reusable(d, "smoke", 2, clean)
    assert not replicates._reusable(d, "quick", 1, clean)
    assert not replicates._reusable(d, "quick", 2, {"commit": "b" * 40, "dirty": False})
    assert not replicates._reusable(d, "quick", 2, {"commit": "a" * 40, "dirty": True})
    dirty = _run_dir(tmp_path / "d", 0, {"A": "yes"}, dirty=True)
    assert not replicates._reusable(dirty, "quick", 2, clean)
    assert not replicates._reusable(tmp_path / "absent", "quick", 2, clean)


def test_a_run_made_elsewhere_stands_in_for_its_seed_only_when_it_asked_for_the_same_run(tmp_path, monkeypatch):
    nb = tmp_path / "notebooks" / "pX_demo.py"
    nb.parent.mkdir()
    nb.write_text('run.table(claims, "claims")\n')
    monkeypatch.delenv("MMLIB_DATA_DIR", raising=False)
    monkeypatch.setattr(replicates, "git_commit", lambda: {"commit": "a" * 40, "dirty": False})
    ran = []

    def fake_run(notebook, root, *, seed, **kw):
        ran.append(seed)
        return _run_dir(Path(root).parent, seed, {"A": "no"})

    monkeypatch.setattr("mmlib.runner.run_notebook", fake_run)
    reps = tmp_path / "results" / "replicates"
    reproduced = _run_dir(tmp_path / "reproduce", 0, {"A": "yes"})  # what make reproduce left, seed 0
    results = reproduced.parent  # make replicate names the results folder; its run of this notebook is found
    other_data = _run_dir(tmp_path / "mine", 2, {"A": "yes"}, data_dir=str(tmp_path / "my_cohort"))
    tables = replicates.replicate(nb, [0, 1, 2], reps, threads=2,
                                  reuse=[results, other_data, tmp_path / "absent"])
    assert ran == [1, 2]  # seed 0 read where make reproduce left it; seed 2's run used other data
    assert tables["claims"].loc[0, ["seed 0", "seed 1", "seed 2"]].tolist() == ["yes", "no", "no"]
    assert not (reps / "seed0").exists()

    ran.clear()
    cohort = tmp_path / "my_cohort"
    mine = _run_dir(tmp_path / "mine2", 0, {"A": "yes"}, data_dir=str(cohort.resolve()))
    replicates.replicate(nb, [0, 1], tmp_path / "r2", threads=2, data_dir=cohort, reuse=[mine])
    assert ran == [1]  # the same data folder, given explicitly
    ran.clear()
    replicates.replicate(nb, [0, 1], tmp_path / "r3", threads=2, reuse=[reproduced], device="cpu")
    assert ran == [0, 1]  # reproduce ran on 'auto', this asks for the CPU
    ran.clear()
    replicates.replicate(nb, [0, 1], tmp_path / "r4", threads=2, reuse=[reproduced], rerun=True)
    assert ran == [0, 1]


def test_make_replicate_runs_the_notebook_once_per_seed_and_tabulates_its_verdicts(tmp_path):
    nb = tmp_path / "notebooks" / "pZ_parity.py"
    nb.parent.mkdir()
    nb.write_text(textwrap.dedent("""
        # %% [markdown]
        # Seed parity decides one verdict; the other holds at every seed.

        # %% tags=["parameters"]
        profile = "quick"
        seed = 0
        device = "auto"
        data_dir = "../data"
        out_dir = "../results/x"

        # %%
        import pandas as pd
        from mmlib import results
        assert seed != 7, "seed 7 fails on purpose"
        run = results.Run(out_dir, notebook="pZ_parity", seed=seed, profile=profile)
        claims = pd.DataFrame({"claim": ["always", "even seed"],
                               "held": ["yes", "yes" if seed % 2 == 0 else "no"]})
        run.table(claims, "claims")
        run.finish()
    """))
    res = tmp_path / "results"
    args = [f"NOTEBOOK_DIR={nb.parent}", f"RESULTS={res}", "PROFILE=smoke", "THREADS=1"]
    missing = _make("replicate", *args)
    assert missing.returncode == 2 and "name the notebooks" in missing.stdout
    dry = _make("-n", "replicate", *args, "NB=pZ")  # make reproduce's run of a seed stands in for it
    assert f"--reuse {res} " in dry.stdout, dry.stdout
    done = _make("replicate", *args, "NB=pZ", "SEEDS=3 0", "JOBS=2")
    assert done.returncode == 0, done.stderr
    assert "1 of 2 tested claims reach the same verdict at every seed." in done.stdout
    spans = []
    for seed in (0, 3):
        record = json.loads((res / "replicates" / f"seed{seed}" / "pZ_parity" / "run.json").read_text())
        assert record["seed"] == seed and record["execution"]["threads"] == 1
        spans.append((record["execution"]["started"], record["execution"]["finished"]))
        assert (res / "replicates" / f"seed{seed}" / "pZ_parity.log").is_file()  # each process's output
    assert max(a for a, _ in spans) < min(b for _, b in spans)  # JOBS=2: the two seeds ran side by side
    bad = _make("replicate", *args, "NB=pZ", "SEEDS=5 7 9", "JOBS=2")
    assert bad.returncode != 0 and "seed 7 failed (exit status 1; see " in bad.stderr, bad.stderr
    assert "seed 5 failed" not in bad.stderr and "seed 9 failed" not in bad.stderr
    for seed in (5, 9):  # the other seeds still ran
        assert (res / "replicates" / f"seed{seed}" / "pZ_parity" / "run.json").is_file()
    t = pd.read_csv(res / "replicates" / "pZ_parity_claims_by_seed.csv", dtype=str).set_index("claim")
    assert t.loc["even seed", ["seed 0", "seed 3"]].tolist() == ["yes", "no"]
    assert t["same at every seed"].tolist() == ["yes", "no"]
    with pytest.raises(ValueError, match="two distinct seeds"):
        replicates.replicate(nb, [1, 1], tmp_path / "reps")
    overview = ROOT / "notebooks" / "00_overview.py"
    with pytest.raises(ValueError, match="never names a 'claims' table"):
        replicates.replicate(overview, [0, 1], tmp_path / "reps")
    assert not (tmp_path / "reps").exists()  # refused before any seed ran


def _make(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "--no-print-directory", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, check=False)
