# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     notebook_metadata_filter: kernelspec,jupytext,-jupytext.text_representation.jupytext_version
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#   kernelspec:
#     display_name: Python (mmlib)
#     language: python
#     name: mmlib
# ---

# %% [markdown]
# # mmlib — a reproducible companion to five multimodal medical-AI papers
#
# This companion re-implements five papers that combine medical images with tables, signals,
# text or genomics, and runs each of them end to end in a notebook (the list, with each
# notebook's status, is computed below).
#
# The papers' data cannot be shared, so every pipeline runs by default on **generated cohorts
# with planted, known ground truth**, written in the real file formats. Knowing the truth lets
# the notebooks check what the papers could not: whether an explanation finds the planted
# lesion, whether a modality's measured contribution matches its planted share.
#
# This notebook reports the machine it runs on, lists the pipelines, checks mixed precision on
# this device, and takes a first look at **real** survival data (the Veterans' lung cancer
# trial that scikit-survival ships), with the c-index and bootstrap functions of
# `mmlib.metrics` that the survival pipelines build on.

# %% tags=["parameters"]
profile = "quick"  # smoke | quick | full
seed = 0
device = "auto"  # auto | cpu | cuda | cuda:N
data_dir = "../data"
out_dir = "../results/00_overview"

# %%
import matplotlib.pyplot as plt
import pandas as pd

from mmlib import core, papers, results
from mmlib.pipelines import overview

prof = overview.PROFILES.get_profile(profile)
dev = core.select_device(device)
core.seed_everything(seed)
run = results.Run(
    out_dir,
    notebook="00_overview",
    title="Overview: environment, pipelines, precision check, real survival data",
    params=dict(profile=profile, seed=seed, device=device, data_dir=data_dir, out_dir=out_dir),
    seed=seed,
    device=dev,
    profile=prof,
)
prof

# %% [markdown]
# ## The machine
# Device, mixed precision and the versions of the packages every result depends on. The same
# record is saved in `run.json` beside every notebook's results.

# %%
environment = results.environment_table(dev)
run.table(environment, "environment", caption="Device and package versions of this run")
environment

# %% [markdown]
# ## The pipelines
# One notebook per paper; a paper's notebook becomes `available` once its pipeline has landed.

# %%
status = papers.pipeline_status(".")
run.table(status, "pipelines", caption="The five papers and the status of their notebooks")
status[["paper", "title", "modalities", "notebook", "status"]]

# %% [markdown]
# ## Mixed precision on this device
# The pipelines train under bf16 autocast where the hardware runs it natively (see
# `benchmarks/bench_precision.py` for the speed). Here: how far bf16 outputs of a 3D
# convolution and a projection layer lie from fp32 on seeded inputs.

# %%
with run.stage("precision check"):
    precision = overview.precision_check(dev, seed=seed, volume_size=prof.volume_size)
run.table(precision, "precision_check", caption="bf16 autocast vs fp32, error relative to the largest fp32 output")
precision

# %% [markdown]
# ## A first look at real survival data
# The Veterans' Administration lung cancer trial (137 patients, standard vs test
# chemotherapy). Two classic findings of this trial should reappear: the treatment arms do not
# differ, and the Karnofsky performance score separates survival strongly.

# %%
with run.stage("survival"):
    surv = overview.veterans_survival(n_bootstrap=prof.n_bootstrap, seed=seed)
run.table(surv["km"], "km_summary", caption="Kaplan-Meier summary per group (median survival and survival at 90/180/365 days)")
run.table(surv["logrank"], "logrank", caption="Log-rank tests between groups")
run.table(surv["cindex"], "cindex", caption="Harrell's c-index of single baseline covariates, percentile bootstrap 95% CI")
run.figure(surv["figure"], "km_curves", caption="Kaplan-Meier curves with 95% log-log confidence bands")
plt.show()
surv["km"]

# %%
surv["cindex"]

# %%
lr = surv["logrank"].set_index("grouping")["p-value"]
ci = surv["cindex"].iloc[0]
print(f"treatment arms differ (log-rank p < 0.05): {lr['treatment'] < 0.05} (p = {lr['treatment']:.3g})")
print(f"Karnofsky groups differ (log-rank p < 0.05): {lr['Karnofsky score'] < 0.05} (p = {lr['Karnofsky score']:.3g})")
print(f"Karnofsky c-index {ci['c-index']:.3f}, 95% CI [{ci['95% CI low']:.3f}, {ci['95% CI high']:.3f}]")

# %% [markdown]
# ## Where to go next
# Each paper's notebook (`p1_…` to `p5_…`, listed above with its status) runs that paper's
# pipeline on its generated cohort. Every notebook saves its tables and figures under
# `results/<notebook>/`, and `results/index.html` links them all.

# %%
record = run.finish()
pd.Series(record["stages_s"], name="seconds")
