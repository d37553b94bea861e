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
# # A tour of the generated cohorts
#
# The five papers' data cannot be shared, so each pipeline runs by default on a **generated
# cohort**. Each cohort comes from a structural causal model whose parameters we know: which image
# region, which table columns and which signal drive the outcome, and how strongly. The files
# are in the formats of the real data (NIfTI volumes in RAS orientation, CSV tables, WFDB ECG
# records, PNG images, report text). They load through the same manifest path as a user's real
# cohort (`data_manifest/schema.md`).
#
# For each cohort, this notebook writes the files (or checks them against their recorded
# sha256 checksums and reuses them) and draws the figure a reader needs to see what the data
# look like (every image in the radiological convention: the subject's right on the viewer's left,
# marked R / L). It lists the ground-truth card (the first rows; all of it is saved as a table) and
# then **measures each planted effect in the generated files**. This measurement catches a generator that plants nothing, or plants the
# wrong thing. The pipelines' explanations are later scored against this truth.
#
# The cohort cards in `data_manifest/cohorts/` describe each causal model in full. Any knob
# can be turned, from Python or the command line:
# `generate("stroke_cta", "quick", image_signal=0)` or
# `python -m mmlib generate stroke_cta --set image_signal=0`.

# %% tags=["parameters"]
profile = "quick"  # smoke | quick | full: the cohort preset generated
seed = 0  # cohort seed: the same seed gives byte-identical files
device = "auto"  # unused here (generation runs on CPU worker processes)
data_dir = "../data"  # where cohorts are written; $MMLIB_DATA_DIR overrides it under make
out_dir = "../results/01_data_tour"

# %%
import matplotlib.pyplot as plt
import pandas as pd
from IPython.display import display

from mmlib import core, results
from mmlib.pipelines import data_tour

prof = data_tour.PROFILES.get_profile(profile)
core.seed_everything(seed)
run = results.Run(
    out_dir,
    notebook="01_data_tour",
    title="Data tour: the five generated cohorts and their planted effects",
    params=dict(profile=profile, seed=seed, device=device, data_dir=data_dir, out_dir=out_dir),
    seed=seed,
    device=core.select_device("cpu"),
    profile=prof,
)
tours = {}


def show(name):
    """Generate one cohort, then show its figures and its planted-effect checks."""
    tours[name] = data_tour.tour_cohort(run, name, prof, seed, data_dir)
    for fig in tours[name]["figures"].values():
        display(fig)
        plt.close(fig)
    truth = tours[name]["truth"]
    print(f"ground-truth card: {len(truth)} parameters (all in tables/{name}_truth.csv); the first 25:")
    display(truth.head(25))
    return tours[name]["checks"]


prof

# %% [markdown]
# ## P1 · stroke MRI: FLAIR-like brain volumes and a clinical table
# Volumes are built on the MNI152 template and tissue maps that nilearn ships. Each subject
# gets a smooth deformation. Ventricles widen with age, and white-matter hyperintensities grow
# with vascular risk factors. The stroke label combines lesion load in one named region (the
# planted image signal) with tabular risk. A larger unlabelled pool is kept for pretraining.

# %%
show("stroke_mri")

# %% [markdown]
# ## P2 · stroke CTA: head-and-neck angiography in Hounsfield units
# The volumes contain skull, brain and contrast-filled vessels, including both carotid
# arteries. A carotid plaque is planted on one side, and its stenosis raises the relapse
# hazard. The four attributes (age, gender, CHD, PAD) carry their own log hazard ratios.
# Relapse-free survival comes from a proportional-hazards model with censoring. The paper's
# selection rule then picks the fine-tuning subset out of the pretraining pool.

# %%
show("stroke_cta")

# %% [markdown]
# ## P3 · chest X-ray, 12-lead ECG and reports
# Hidden patient conditions link the modalities. For example, heart failure widens the heart
# on the X-ray, adds edema and effusion, and changes the ECG. Each ECG is one simulated 3-D
# heart vector projected onto the 12 leads, so the leads relate as they do in a real
# recording (III = II - I). The reports are written from the labels, with synonyms, negation
# and uncertainty.

# %%
show("xray_ecg")

# %% [markdown]
# ## P4 · chest CT and longitudinal EHR, two sites
# The hazard combines a clot burden visible on CT and a comorbidity state that shows up in the
# EHR events. A knob sets how the information is split between the two modalities. The
# external site differs in scanner, coding habits and case mix.

# %%
show("ct_ehr")

# %% [markdown]
# ## P5 · glioma: histology patch bags and grouped gene expression
# Tissue programs (cellularity, pleomorphism, necrosis, microvascular proliferation) are
# planted by grade. Gene groups carry grade- and subtype-dependent programs. Survival follows
# grade and aggressiveness.

# %%
show("glioma")

# %% [markdown]
# ## The five cohorts at a glance

# %%
cohorts = {name: t["cohort"] for name, t in tours.items()}
summary = data_tour.cohort_summary(cohorts)
run.table(summary, "cohorts", caption="The generated cohorts: subjects, modalities, tables, splits, files and size")
summary

# %% [markdown]
# ## Are the planted effects there?
# Every effect the causal models plant is measured again from the generated files and tables.
# Cross-validated models are used where a model is fitted, so a cohort with the signal
# switched off would score about chance. The tests check exactly that, on cohorts with each
# signal set to 0. At the `smoke` preset the cohorts are tiny, and some effects are expected to
# fall short.

# %%
checks = pd.concat([t["checks"] for t in tours.values()], ignore_index=True)
run.table(checks, "planted_effects", caption="Planted effects measured in the generated data (all cohorts)")
print(f"{int(checks['present'].sum())} of {len(checks)} planted effects present at the {prof.preset!r} preset")
checks

# %% [markdown]
# ## Paper reported vs this run
# The sizes of the cohorts are set by the preset. The proportions that a generator was built
# to reproduce are compared with the paper's numbers.

# %%
rows = data_tour.paper_sizes(cohorts)
run.paper_vs_run(rows, caption="Cohort proportions: paper reported vs generated")
pd.DataFrame(rows)

# %%
record = run.finish()
pd.Series(record["stages_s"], name="seconds").round(1)
