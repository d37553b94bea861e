import re
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
import torch

from mmlib import index, results


def _make_run(root: Path, name: str, with_pvr: bool) -> None:
    run = results.Run(root / name, notebook=name, title=f"Title of {name}", params={"profile": "quick"},
                      seed=0, device=torch.device("cpu"))
    with run.stage("train"):
        pass
    run.table(pd.DataFrame({"model": ["x"], "auc": [0.75]}), "table2", caption="AUC per model")
    fig = plt.figure()
    run.figure(fig, "fig3", caption="trainable parameters", close=True)
    if with_pvr:
        run.paper_vs_run([
            {"quantity": "test AUC", "paper reported": "0.715", "this run": 0.70, "held on this data": "yes"},
            {"quantity": "vision share", "paper reported": "92.20%", "this run": 0.4, "held on this data": "no"},
        ])
    run.finish()


def _links(page: str) -> list[str]:
    return re.findall(r"(?:href|src)='([^']+)'", page)


def test_index_links_every_table_and_figure_and_resolves_offline(tmp_path):
    _make_run(tmp_path, "00_overview", with_pvr=False)
    _make_run(tmp_path, "p2_demo", with_pvr=True)
    (tmp_path / "00_overview" / "00_overview.html").write_text("<html></html>")
    page = index.build_index(tmp_path).read_text()

    links = _links(page)
    for name in ("00_overview", "p2_demo"):
        assert f"{name}/tables/table2.csv" in links
        assert f"{name}/tables/table2.md" in links
        assert f"{name}/figures/fig3.png" in links
        assert f"{name}/figures/fig3.svg" in links
        assert f"{name}/run.json" in links
        assert f"Title of {name}" in page
    assert "00_overview/00_overview.html" in links
    # Every link is relative and points at a file that exists: the page works offline.
    for link in links:
        if link.startswith("#"):
            continue
        assert not re.match(r"^[a-z]+://", link), link
        assert (tmp_path / link).exists(), link
    assert "http://" not in page and "https://" not in page
    # the thread count the tables were computed with (CPU results depend on it)
    assert page.count(f"{torch.get_num_threads()} CPU threads") == 2


def test_index_shows_paper_vs_run_first_with_verdicts(tmp_path):
    _make_run(tmp_path, "p2_demo", with_pvr=True)
    page = index.build_index(tmp_path).read_text()
    section = page[page.index("id='p2_demo'"):]
    assert section.index("Paper reported vs this run") < section.index("<h3>table2</h3>")
    assert "<td class='held-yes'>yes</td>" in section and "<td class='held-no'>no</td>" in section
    assert "92.20%" in section
    # paper_vs_run is shown once, not again among the ordinary tables
    assert "<h3>paper_vs_run</h3>" not in section


def test_index_reports_failed_notebooks(tmp_path):
    _make_run(tmp_path, "p1_demo", with_pvr=False)
    failed = tmp_path / "p1_demo.failed"
    failed.mkdir()
    (failed / "ERROR.txt").write_text("p1_demo: cell 4 `x = 1/0` raised ZeroDivisionError: division by zero\n")
    (failed / "p1_demo.html").write_text("<html></html>")
    only_failed = tmp_path / "p3_demo.failed"
    only_failed.mkdir()
    (only_failed / "ERROR.txt").write_text("p3_demo: cell 2 raised KeyError\n")
    (tmp_path / "p4_demo.running").mkdir()  # an execution in progress is not listed

    runs = {r["name"]: r for r in index.collect_runs(tmp_path)}
    assert set(runs) == {"p1_demo", "p3_demo"}
    page = index.build_index(tmp_path).read_text()
    assert "last run failed" in page and "ZeroDivisionError: division by zero" in page
    assert "p1_demo.failed/p1_demo.html" in _links(page)
    assert "cell 2 raised KeyError" in page
    assert "p4_demo" not in page


def test_index_of_empty_results_says_what_to_do(tmp_path):
    page = index.build_index(tmp_path / "results").read_text()
    assert "make reproduce" in page


def test_index_shows_the_replicate_tables_with_each_verdict_coloured(tmp_path):
    from mmlib import replicates

    for seed, held in ((0, "yes"), (1, "no")):
        run = results.Run(tmp_path / f"seed{seed}" / "p9_demo", notebook="p9_demo", seed=seed, profile="quick")
        run.table(pd.DataFrame({"claim": ["fusion helps"], "held": [held]}), "claims")
        run.finish()
    table = replicates.claims_by_seed([tmp_path / "seed0" / "p9_demo", tmp_path / "seed1" / "p9_demo"])
    replicates.write_claims_table(table, tmp_path / "replicates")
    page = index.build_index(tmp_path).read_text()
    assert "Do the verdicts replicate?" in page and "0 of 1 tested claims reach the same verdict" in page
    row = re.search(r"<td>fusion helps</td>(.*?)</tr>", page).group(1)
    assert re.findall(r"class='(held-\w+)'", row) == ["held-yes", "held-no", "held-no"]
    assert "replicates/p9_demo_claims_by_seed.csv" in _links(page)
    assert "Do the verdicts replicate?" not in index.build_index(tmp_path / "seed0").read_text()
