"""Longitudinal EHR features for P4: a one-hot/count baseline and a CLMBR-like foundation model.

P4 ("Fusion is not one-size-fits-all") encodes each subject's coded EHR before the index CT two
ways and compares them as the EHR side of the fusion models (:mod:`mmlib.models.fusion`):

- :class:`EHRCountEncoder`: the one-hot/count baseline. One feature per diagnosis (ICD10) or
  drug (ATC) code, ``log1p`` of how often it was recorded, and two per lab (LOINC): the last
  value z-scored with training statistics and a "measured" flag. Fitted on training subjects.
- :class:`EHRTokenizer` -> :class:`EHRSequences` -> :class:`EHRFoundationModel`: a small
  CLMBR-like model (Steinberg et al. 2021, "Language models are an effective representation
  learning technique for electronic health record data"): the history is a sequence of visits,
  each a set of tokens (one per diagnosis/drug code, one per lab code and quantile bin of its
  value), and a causal transformer over the visits is pretrained without labels to predict the
  set of codes of the next visit (:func:`pretrain_foundation_model`). Frozen, it gives one state
  per visit (tokens for the attention fusions) and the state at the last visit (pooled), via
  :func:`embed_sequences`. CLMBR predicts the next *day*'s codes with a hierarchical softmax;
  here the unit is the visit and the head is a multi-label (sigmoid) classifier.
- :func:`next_visit_auc` and :func:`frequency_baseline_auc` check the pretraining: the micro ROC-AUC
  of next-visit code prediction, against a reference that scores every code by its frequency.

The input is the ``ehr_events`` long table of the ``ct_ehr`` cohort (one row per recorded code
or lab value)::

    subject_id, days_before_index (0 = index encounter, larger = older), visit_id,
    code_system (ICD10 | ATC | LOINC), code, value (labs only, float), unit (labs only)

Everything is learned from the *training* subjects only (vocabulary, lab statistics, lab bins);
codes first seen later are ignored (counted in ``n_unknown_codes_``). Lab values are used as
recorded, without unit or assay harmonisation: an external site that reports creatinine in µmol/L
instead of mg/dL, or BNP instead of NT-proBNP, looks different to both encoders. That is the
distribution shift P4 studies, so it is left in on purpose (contrast
:func:`mmlib.cohorts.ct_ehr.ehr_risk_score`, which harmonises).
"""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from mmlib.core import positive_int

__all__ = [
    "EHRCountEncoder",
    "EHRFoundationModel",
    "EHRSequences",
    "EHRTokenizer",
    "embed_sequences",
    "frequency_baseline_auc",
    "next_visit_auc",
    "pretrain_foundation_model",
]

SYSTEMS = ("ICD10", "ATC", "LOINC")  # diagnoses, drugs, labs: the feature and token order
PAD, UNK = 0, 1  # token ids of a padding slot and of a code not seen in fit
_N_SPECIAL = 2
_BASE_COLUMNS = ("subject_id", "days_before_index", "code_system", "code", "value")


# --------------------------------------------------------------------------- the events table


def _subject_index(subject_ids: object, owner: str) -> pd.Index:
    """``subject_ids`` as an Index of strings (the events' ids are compared as strings)."""
    if isinstance(subject_ids, (str, bytes)):
        raise ValueError(f"{owner}: subject_ids must be a sequence of ids, got the single string {subject_ids!r}")
    ids = pd.Index(pd.Series(list(subject_ids), dtype=object).astype(str), name="subject_id")
    return ids


def _events(events: pd.DataFrame, subject_ids: object, owner: str, *, visits: bool = False,
            lookback_days: float | None = None) -> tuple[pd.DataFrame, pd.Index]:
    """The rows of ``subject_ids`` as a clean frame: ``sid, days, [visit,] system, code, value``.

    The index of ``events`` is kept, so that errors can name rows. Raises ValueError on a
    missing column, an unknown code system, a missing or negative ``days_before_index``, a
    missing code, or a lab value that is not a number (NaN counts as "no value": such a lab row
    is dropped).
    """
    if not isinstance(events, pd.DataFrame):
        raise ValueError(f"{owner} expects the events as a pandas DataFrame, got {type(events).__name__}")
    required = _BASE_COLUMNS[:2] + (("visit_id",) if visits else ()) + _BASE_COLUMNS[2:]
    missing = [c for c in required if c not in events.columns]
    if missing:
        raise ValueError(f"{owner}: the events table lacks column(s) {missing}; required columns: {list(required)} "
                         f"(present: {list(map(str, events.columns))})")
    ids = _subject_index(subject_ids, owner)
    ev = events[events["subject_id"].astype(str).isin(set(ids))]
    out = pd.DataFrame({"sid": ev["subject_id"].astype(str).to_numpy(dtype=object)}, index=ev.index)
    days = pd.to_numeric(ev["days_before_index"], errors="coerce").to_numpy(dtype=float, na_value=np.nan)
    bad = ~np.isfinite(days) | (days < 0)
    if bad.any():
        rows = ev.index[bad][:5].tolist()
        raise ValueError(f"{owner}: days_before_index must be a number >= 0 (0 = index encounter, events after "
                         f"the index are not allowed); rows {rows} have {ev['days_before_index'][bad][:5].tolist()}")
    out["days"] = days
    if visits:
        if ev["visit_id"].isna().any():
            raise ValueError(f"{owner}: visit_id is missing in rows {ev.index[ev['visit_id'].isna()][:5].tolist()}")
        out["visit"] = ev["visit_id"].astype(str).to_numpy(dtype=object)
    system = ev["code_system"].astype(str).to_numpy(dtype=object)
    unknown = sorted(set(system) - set(SYSTEMS))
    if unknown:
        raise ValueError(f"{owner}: unknown code_system value(s) {unknown}; allowed: {list(SYSTEMS)}")
    out["system"] = system
    if ev["code"].isna().any():
        raise ValueError(f"{owner}: code is missing in rows {ev.index[ev['code'].isna()][:5].tolist()}")
    out["code"] = ev["code"].astype(str).to_numpy(dtype=object)
    is_lab = system == "LOINC"
    raw = ev["value"]
    value = np.full(len(ev), np.nan)
    if is_lab.any():
        lab_raw = raw[is_lab]
        blank = lab_raw.isna().to_numpy(dtype=bool, copy=True)
        if not pd.api.types.is_numeric_dtype(lab_raw):  # values read as text: "" or "  " is no value
            blank |= lab_raw.astype(str).str.strip().eq("").to_numpy(dtype=bool)
        parsed = pd.to_numeric(lab_raw.where(~blank), errors="coerce").to_numpy(dtype=float, na_value=np.nan)
        wrong = ~blank & ~np.isfinite(parsed)
        if wrong.any():
            labels, codes = lab_raw.index.tolist(), out["code"][is_lab].tolist()
            where = ", ".join(f"row {labels[j]!r} (code {codes[j]!r}, value {lab_raw.iloc[j]!r})"
                              for j in np.flatnonzero(wrong)[:5])
            raise ValueError(f"{owner}: lab values (LOINC rows) must be finite numbers; {int(wrong.sum())} "
                             f"value(s) are not: {where}")
        value[is_lab] = parsed
    out["value"] = value
    keep = ~(is_lab & np.isnan(value))
    if lookback_days is not None:
        keep &= days <= lookback_days
    return out[keep], ids


def _fit_events(events: pd.DataFrame, subject_ids: object, owner: str, **kwargs: object) -> pd.DataFrame:
    """:func:`_events` for fitting: at least one training subject must have events."""
    ev, ids = _events(events, subject_ids, owner, **kwargs)
    if ev.empty:
        raise ValueError(f"{owner}: none of the {len(ids)} training subject_ids has a usable event (ids are "
                         f"compared as strings; first ids: {list(ids[:3])}, first in the table: "
                         f"{events['subject_id'].astype(str).unique()[:3].tolist()})")
    return ev


def _code_key(system: pd.Series | np.ndarray, code: pd.Series | np.ndarray) -> np.ndarray:
    """``"<system>:<code>"`` per row, as an object array."""
    return np.asarray(system, dtype=object) + ":" + np.asarray(code, dtype=object)


def _sorted_codes(ev: pd.DataFrame, systems: Sequence[str]) -> list[tuple[str, str]]:
    """Distinct ``(system, code)`` pairs of ``systems``, in ``SYSTEMS`` order then by code."""
    pairs = ev.loc[ev["system"].isin(list(systems)), ["system", "code"]].drop_duplicates()
    return sorted(map(tuple, pairs.to_numpy()), key=lambda p: (SYSTEMS.index(p[0]), p[1]))


def _last_values(labs: pd.DataFrame) -> pd.Series:
    """Most recent value per (sid, code): the smallest ``days``; ties keep the first row of the table."""
    return labs.sort_values("days", kind="stable").groupby(["sid", "code"], sort=False)["value"].first()


def _not_fitted(owner: str) -> RuntimeError:
    return RuntimeError(f"{owner} is not fitted yet: call fit(events, train_subject_ids) before transform")


def _check_int(owner: str, **values: object) -> dict[str, int]:
    out = {}
    for name, v in values.items():
        n = positive_int(v)
        if n is None:
            raise ValueError(f"{owner}: {name} must be a positive integer, got {v!r}")
        out[name] = n
    return out


# --------------------------------------------------------------------------- counts baseline


class EHRCountEncoder:
    """One-hot/count EHR features (P4's EHR baseline), learned from the training subjects.

    Features, in this order (see ``feature_names_``):

    - per diagnosis (ICD10) and drug (ATC) code seen in fit, ``"<system>:<code>"`` =
      ``log1p(number of rows with the code)`` over the look-back (a code recorded at three visits
      counts 3);
    - per lab (LOINC) code seen in fit with a value, ``"LOINC:<code>:last"`` = the most recent
      value (smallest ``days_before_index``; on a tie, the first row of the table) z-scored with
      the mean and SD (``ddof=0``; an SD of 0 counts as 1) of the training subjects' last values,
      0 when the lab was never measured; and ``"LOINC:<code>:measured"`` = 1 if measured, else 0.

    Lab values are taken as recorded, with no unit or assay harmonisation: an external site
    that reports creatinine in µmol/L gets z-scores around +100 for normal creatinine, and a lab
    code used only there (BNP instead of NT-proBNP) is unknown and ignored. That is the
    distribution shift P4 studies, not a bug to fix here. Lab rows with an empty value are
    skipped; a value that is not a number is an error.

    Args:
        lookback_days: only events with ``days_before_index <= lookback_days`` are used (None: all).

    Attributes:
        feature_names_: the feature names, one per column of :meth:`transform`.
        count_codes_: the ``"<system>:<code>"`` keys of the count features.
        lab_codes_: the LOINC codes of the lab features.
        lab_mean_, lab_sd_: ``{code: training mean / SD of the last values}``.
        n_unknown_codes_: event rows of the last :meth:`transform` whose code was not seen in fit.
        unknown_codes_: those codes (``"<system>:<code>"``, sorted).
    """

    def __init__(self, lookback_days: float | None = None) -> None:
        if lookback_days is not None and not lookback_days >= 0:
            raise ValueError(f"EHRCountEncoder: lookback_days must be >= 0 or None, got {lookback_days!r}")
        self.lookback_days = lookback_days
        self.feature_names_: list[str] | None = None
        self.count_codes_: list[str] = []
        self.lab_codes_: list[str] = []
        self.lab_mean_: dict[str, float] = {}
        self.lab_sd_: dict[str, float] = {}
        self.n_unknown_codes_: int | None = None
        self.unknown_codes_: list[str] = []

    @property
    def n_features(self) -> int:
        """Number of features (columns of :meth:`transform`)."""
        if self.feature_names_ is None:
            raise _not_fitted("EHRCountEncoder")
        return len(self.feature_names_)

    def fit(self, events: pd.DataFrame, subject_ids: Sequence[object]) -> EHRCountEncoder:
        """Learn the vocabulary and the lab statistics from the events of ``subject_ids``.

        Args:
            events: the ``ehr_events`` long table (other subjects' rows are ignored).
            subject_ids: the training subjects.

        Returns:
            self.

        Raises:
            ValueError: on a missing column, an unknown code system, a negative or missing
                ``days_before_index`` or a lab value that is not a number (naming the rows).
        """
        ev = _fit_events(events, subject_ids, "EHRCountEncoder.fit", lookback_days=self.lookback_days)
        self.count_codes_ = [f"{s}:{c}" for s, c in _sorted_codes(ev, SYSTEMS[:2])]
        last = _last_values(ev[ev["system"] == "LOINC"])
        self.lab_codes_ = sorted(last.index.get_level_values("code").unique())
        stats = last.groupby(level="code")
        mean, sd = stats.mean(), stats.std(ddof=0)
        self.lab_mean_ = {c: float(mean[c]) for c in self.lab_codes_}
        self.lab_sd_ = {c: float(sd[c]) if sd[c] > 0 else 1.0 for c in self.lab_codes_}
        labs = [f"LOINC:{c}:{kind}" for c in self.lab_codes_ for kind in ("last", "measured")]
        self.feature_names_ = self.count_codes_ + labs
        return self

    def transform(self, events: pd.DataFrame, subject_ids: Sequence[object]) -> np.ndarray:
        """Features of ``subject_ids``, one row each, in their order.

        Args:
            events: the ``ehr_events`` long table.
            subject_ids: the subjects to encode (a subject without events gets a row of zeros).

        Returns:
            (N, n_features) float32. Codes not seen in fit are ignored and counted in
            ``n_unknown_codes_`` (rows) and ``unknown_codes_`` (which).

        Raises:
            RuntimeError: before :meth:`fit`.
            ValueError: as :meth:`fit`.
        """
        if self.feature_names_ is None:
            raise _not_fitted("EHRCountEncoder")
        ev, ids = _events(events, subject_ids, "EHRCountEncoder.transform", lookback_days=self.lookback_days)
        uniq = pd.Index(ids.unique())
        x = np.zeros((len(uniq), self.n_features), np.float64)
        column = {name: j for j, name in enumerate(self.feature_names_)}
        is_lab = (ev["system"] == "LOINC").to_numpy()
        key = _code_key(ev["system"], ev["code"])
        key[is_lab] += ":last"  # a lab is known when its "last" feature exists
        known = pd.Series(key).isin(list(column)).to_numpy()
        unknown_keys = pd.Series(key[~known]).str.removesuffix(":last")
        self.n_unknown_codes_, self.unknown_codes_ = int((~known).sum()), sorted(unknown_keys.unique())
        counted = ev[known & ~is_lab]
        if len(counted):
            n = counted.assign(key=key[known & ~is_lab]).groupby(["sid", "key"]).size()
            rows = uniq.get_indexer(n.index.get_level_values("sid"))
            cols = [column[k] for k in n.index.get_level_values("key")]
            x[rows, cols] = np.log1p(n.to_numpy(float))
        labs = ev[known & is_lab]
        if len(labs):
            last = _last_values(labs)
            codes = last.index.get_level_values("code")
            rows = uniq.get_indexer(last.index.get_level_values("sid"))
            cols = np.array([column[f"LOINC:{c}:last"] for c in codes])
            mean = np.array([self.lab_mean_[c] for c in codes])
            sd = np.array([self.lab_sd_[c] for c in codes])
            x[rows, cols] = (last.to_numpy(float) - mean) / sd
            x[rows, cols + 1] = 1.0
        return x[uniq.get_indexer(ids)].astype(np.float32)

    def fit_transform(self, events: pd.DataFrame, subject_ids: Sequence[object]) -> np.ndarray:
        """:meth:`fit` then :meth:`transform` on the same subjects."""
        return self.fit(events, subject_ids).transform(events, subject_ids)


# --------------------------------------------------------------------------- visit sequences


def _positions(idx: object, n: int, owner: str) -> np.ndarray:
    """Integer positions (or a boolean mask of length n) as an int64 array, range-checked."""
    if isinstance(idx, slice):
        return np.arange(n)[idx]
    a = idx.detach().cpu().numpy() if isinstance(idx, torch.Tensor) else np.asarray(idx)
    if a.dtype == bool:
        if a.shape != (n,):
            raise ValueError(f"{owner}: a boolean index must have shape ({n},), got {a.shape}")
        return np.flatnonzero(a)
    if a.size == 0:
        return np.zeros(0, np.int64)
    if a.ndim != 1 or not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"{owner}: expects 1-D integer positions or a boolean mask, got {a.dtype} {a.shape}")
    if a.min() < -n or a.max() >= n:
        raise ValueError(f"{owner}: positions must lie in [-{n}, {n}), got min {a.min()} max {a.max()}")
    return a.astype(np.int64) % n


@dataclass(eq=False)
class EHRSequences:
    """Tokenised visit sequences of N subjects (what :meth:`EHRTokenizer.transform` returns).

    Visits are **left-aligned** and chronological: positions ``0 .. n_i - 1`` hold subject i's
    real visits from the oldest to the most recent (the index encounter, day 0, is last when
    present), positions ``n_i ..`` are padding. ``last[i] = n_i - 1`` is the position of the
    most recent real visit, -1 for a subject without events.

    Args:
        codes: (N, V, C) int64 token ids per visit (0 = padding slot, 1 = unknown code).
        days: (N, V) float32 ``days_before_index`` of each visit (0 at padding).
        visit_mask: (N, V) bool, True = padding (the convention of :mod:`mmlib.models.fusion`).
        last: (N,) int64 position of the last real visit, -1 if none.
        subject_ids: the N subject ids, in order.
        vocab_size: the tokenizer's vocabulary size (0: the largest token id + 1).
        tokens: the tokenizer's vocabulary (``tokens[i]`` is token i), or None.
    """

    codes: torch.Tensor
    days: torch.Tensor
    visit_mask: torch.Tensor
    last: torch.Tensor
    subject_ids: list[str]
    vocab_size: int = 0
    tokens: list[str] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        c, d, m, last = self.codes, self.days, self.visit_mask, self.last
        if not (isinstance(c, torch.Tensor) and c.dtype == torch.long and c.ndim == 3):
            raise ValueError(f"EHRSequences: codes must be an int64 tensor (N, V, C), got {_describe(c)}")
        n, v = c.shape[:2]
        for name, t, dtype, shape in (("days", d, torch.float32, (n, v)), ("visit_mask", m, torch.bool, (n, v)),
                                      ("last", last, torch.long, (n,))):
            if not (isinstance(t, torch.Tensor) and t.dtype == dtype and tuple(t.shape) == shape):
                raise ValueError(f"EHRSequences: {name} must be a {dtype} tensor of shape {shape}, got {_describe(t)}")
        if len(self.subject_ids) != n:
            raise ValueError(f"EHRSequences: {len(self.subject_ids)} subject_ids for {n} sequences")
        self.subject_ids = [str(s) for s in self.subject_ids]
        if not self.vocab_size:
            self.vocab_size = max(int(c.max()) + 1 if c.numel() else 0, _N_SPECIAL)

    def __len__(self) -> int:
        return int(self.codes.shape[0])

    @property
    def n_visits(self) -> torch.Tensor:
        """(N,) number of real visits per subject."""
        return (~self.visit_mask).sum(dim=1)

    def subset(self, idx: object) -> EHRSequences:
        """The subjects at positions ``idx`` (integers or a boolean mask), in that order."""
        i = torch.from_numpy(_positions(idx, len(self), "EHRSequences.subset"))
        return EHRSequences(self.codes[i], self.days[i], self.visit_mask[i], self.last[i],
                            [self.subject_ids[j] for j in i.tolist()], self.vocab_size, self.tokens)

    def batch(self, idx: object) -> dict[str, torch.Tensor]:
        """``{"codes", "days", "visit_mask"}`` of the subjects ``idx``: the input of :class:`EHRFoundationModel`."""
        i = torch.from_numpy(_positions(idx, len(self), "EHRSequences.batch"))
        return {"codes": self.codes[i], "days": self.days[i], "visit_mask": self.visit_mask[i]}


def _describe(x: object) -> str:
    return f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__


class EHRTokenizer:
    """Turns the events table into visit sequences of tokens for :class:`EHRFoundationModel`.

    The vocabulary is learned from the training subjects: token 0 = padding, 1 = unknown
    (a code not seen in fit), then one token ``"ICD10:<code>"`` / ``"ATC:<code>"`` per
    diagnosis and drug code, then ``n_lab_bins`` tokens ``"LOINC:<code>:q1" .. ":q<n>"`` per lab
    code: the bin of the value among the quantiles of that lab's training values (q1 = lowest;
    edges per lab code, values as recorded: no unit harmonisation, see the module docstring).
    A visit is the set of rows sharing a ``visit_id`` (its day: the smallest
    ``days_before_index`` of its rows); each distinct token appears once per visit.

    Attributes:
        tokens_: the vocabulary; ``tokens_[i]`` is token i.
        lab_edges_: ``{loinc_code: (n_lab_bins - 1,) inner bin edges}``.
        n_unknown_codes_: event rows of the last :meth:`transform` that got the unknown token.
        n_dropped_visits_, n_dropped_codes_: visits (older than the ``max_visits`` most recent)
            and distinct tokens (beyond ``max_codes`` in a visit) the last transform left out.
    """

    def __init__(self) -> None:
        self.tokens_: list[str] | None = None
        self.lab_edges_: dict[str, np.ndarray] = {}
        self.n_lab_bins: int | None = None
        self._index: dict[str, int] = {}
        self._lab_base: dict[str, int] = {}
        self.n_unknown_codes_: int | None = None
        self.n_dropped_visits_: int | None = None
        self.n_dropped_codes_: int | None = None

    @property
    def vocab_size(self) -> int:
        """Number of tokens, padding and unknown included."""
        if self.tokens_ is None:
            raise _not_fitted("EHRTokenizer")
        return len(self.tokens_)

    def fit(self, events: pd.DataFrame, subject_ids: Sequence[object], n_lab_bins: int = 5) -> EHRTokenizer:
        """Learn the vocabulary and the lab bin edges from the events of ``subject_ids``.

        Args:
            events: the ``ehr_events`` long table (needs ``visit_id`` too).
            subject_ids: the training subjects.
            n_lab_bins: quantile bins per lab code.

        Returns:
            self.

        Raises:
            ValueError: on a missing column or bad values (as :class:`EHRCountEncoder`), or a
                non-positive ``n_lab_bins``.
        """
        n_bins = _check_int("EHRTokenizer.fit", n_lab_bins=n_lab_bins)["n_lab_bins"]
        ev = _fit_events(events, subject_ids, "EHRTokenizer.fit", visits=True)
        tokens = ["<pad>", "<unk>"] + [f"{s}:{c}" for s, c in _sorted_codes(ev, SYSTEMS[:2])]
        labs = ev[ev["system"] == "LOINC"]
        self.lab_edges_, self._lab_base = {}, {}
        probs = np.arange(1, n_bins) / n_bins
        for code, values in sorted(labs.groupby("code", sort=False)["value"], key=lambda kv: kv[0]):
            self.lab_edges_[code] = np.quantile(values.to_numpy(float), probs)
            self._lab_base[code] = len(tokens)
            tokens += [f"LOINC:{code}:q{k}" for k in range(1, n_bins + 1)]
        self.tokens_, self.n_lab_bins = tokens, n_bins
        self._index = {t: i for i, t in enumerate(tokens)}
        return self

    def _token_ids(self, ev: pd.DataFrame) -> np.ndarray:
        """Token id of each row (UNK for codes not seen in fit)."""
        is_lab = (ev["system"] == "LOINC").to_numpy()
        keys = pd.Series(_code_key(ev["system"], ev["code"]), index=ev.index)
        tok = keys.map(self._index).fillna(UNK).to_numpy(np.int64)
        tok[is_lab] = UNK
        labs = ev[is_lab]
        where = np.flatnonzero(is_lab)
        for code, rows in labs.groupby("code", sort=False).indices.items():
            if code in self._lab_base:
                values = labs["value"].to_numpy(float)[rows]
                tok[where[rows]] = self._lab_base[code] + np.searchsorted(self.lab_edges_[code], values, side="right")
        return tok

    def transform(self, events: pd.DataFrame, subject_ids: Sequence[object], max_visits: int = 32,
                  max_codes: int = 48) -> EHRSequences:
        """Visit sequences of ``subject_ids``, in their order.

        Args:
            events: the ``ehr_events`` long table.
            subject_ids: the subjects (a subject without events gets only padding, ``last = -1``).
            max_visits: V; the ``max_visits`` most recent visits are kept (older ones dropped).
            max_codes: C; tokens kept per visit (known tokens by id first, then unknown).

        Returns:
            :class:`EHRSequences` with ``codes`` (N, max_visits, max_codes) whatever the data (so
            that sequences of different calls line up), visits left-aligned, oldest first, the
            most recent at ``last``.

        Raises:
            RuntimeError: before :meth:`fit`.
            ValueError: on a missing column or bad values, or a non-positive ``max_visits`` / ``max_codes``.
        """
        if self.tokens_ is None:
            raise _not_fitted("EHRTokenizer")
        lim = _check_int("EHRTokenizer.transform", max_visits=max_visits, max_codes=max_codes)
        v_max, c_max = lim["max_visits"], lim["max_codes"]
        ev, ids = _events(events, subject_ids, "EHRTokenizer.transform", visits=True)
        uniq = pd.Index(ids.unique())
        tok = self._token_ids(ev)
        self.n_unknown_codes_ = int((tok == UNK).sum())
        rows = pd.DataFrame({"s": uniq.get_indexer(ev["sid"]), "visit": ev["visit"].to_numpy(dtype=object),
                             "days": ev["days"].to_numpy(float), "tok": tok})
        # visits: chronological per subject (oldest first; same day: by visit_id), the latest v_max kept
        vis = rows.groupby(["s", "visit"], sort=False)["days"].min().reset_index()
        vis = vis.sort_values(["s", "days", "visit"], ascending=[True, False, True], kind="stable")
        n_vis = vis.groupby("s").size().reindex(range(len(uniq)), fill_value=0).to_numpy()
        order = vis.groupby("s").cumcount().to_numpy()
        start = np.maximum(n_vis - v_max, 0)
        pos = order - start[vis["s"].to_numpy()]
        keep = pos >= 0
        self.n_dropped_visits_ = int((~keep).sum())
        vis = vis.assign(pos=pos)[keep]
        # tokens: distinct per visit, known ones by id then unknown, the first c_max kept
        rows = rows.merge(vis[["s", "visit", "pos"]], on=["s", "visit"], how="inner")
        rows = rows.drop_duplicates(["s", "pos", "tok"]).assign(unk=lambda d: d["tok"] == UNK)
        rows = rows.sort_values(["s", "pos", "unk", "tok"], kind="stable")
        slot = rows.groupby(["s", "pos"]).cumcount().to_numpy()
        self.n_dropped_codes_ = int((slot >= c_max).sum())
        rows, slot = rows[slot < c_max], slot[slot < c_max]
        n_u = len(uniq)
        codes = np.zeros((n_u, v_max, c_max), np.int64)
        codes[rows["s"].to_numpy(), rows["pos"].to_numpy(), slot] = rows["tok"].to_numpy()
        days = np.zeros((n_u, v_max), np.float32)
        days[vis["s"].to_numpy(), vis["pos"].to_numpy()] = vis["days"].to_numpy(np.float32)
        kept = np.minimum(n_vis, v_max)
        mask = np.arange(v_max)[None, :] >= kept[:, None]
        back = uniq.get_indexer(ids)
        return EHRSequences(
            codes=torch.from_numpy(codes[back]), days=torch.from_numpy(days[back]),
            visit_mask=torch.from_numpy(mask[back]), last=torch.from_numpy((kept - 1)[back].astype(np.int64)),
            subject_ids=list(ids), vocab_size=self.vocab_size, tokens=list(self.tokens_),
        )

    def fit_transform(self, events: pd.DataFrame, subject_ids: Sequence[object], n_lab_bins: int = 5,
                      **kwargs: int) -> EHRSequences:
        """:meth:`fit` then :meth:`transform` on the same subjects."""
        return self.fit(events, subject_ids, n_lab_bins).transform(events, subject_ids, **kwargs)


# --------------------------------------------------------------------------- the foundation model


class EHRFoundationModel(nn.Module):
    """CLMBR-like EHR foundation model: a causal transformer over visits, trained on the next visit's codes.

    - Visit embedding: the mean of the embeddings of the visit's known tokens (padding slots
      and unknown codes excluded; a visit of only unknown codes gets 0) plus a time embedding,
      a Linear of sinusoidal features of ``log1p(days_before_index)``.
    - Encoder: ``layers`` pre-LN transformer layers (``nn.TransformerEncoder``, ``norm_first``,
      GELU, MLP 4 x dim) with a causal mask (visit t sees visits <= t) and the visit padding as
      key padding mask, then a final LayerNorm. These are the per-visit states ("tokens").
    - Head: Linear(dim -> vocab_size), the logits of each token being in the *next* visit.

    Input batches (:meth:`EHRSequences.batch`) are left-aligned: real visits first, padding
    after (checked). Padding visits never change the real visits' states and their own states
    are zeroed.

    Args:
        vocab_size: the tokenizer's vocabulary size (token 0 = padding, 1 = unknown).
        dim: state width.
        layers: transformer layers.
        heads: attention heads (``dim`` must be divisible by ``heads``).
        dropout: dropout in the transformer layers.
        max_visits: the longest sequence accepted (V).
    """

    def __init__(self, vocab_size: int, dim: int = 64, layers: int = 2, heads: int = 4, dropout: float = 0.1,
                 max_visits: int = 32) -> None:
        super().__init__()
        owner = "EHRFoundationModel"
        sizes = _check_int(owner, vocab_size=vocab_size, dim=dim, layers=layers, heads=heads, max_visits=max_visits)
        if sizes["vocab_size"] <= _N_SPECIAL:
            raise ValueError(f"{owner}: vocab_size must exceed 2 (padding and unknown are tokens 0 and 1), "
                             f"got {vocab_size}")
        if dim % heads:
            raise ValueError(f"{owner}: dim ({dim}) must be divisible by heads ({heads})")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"{owner}: dropout must be in [0, 1), got {dropout!r}")
        self.vocab_size, self.dim, self.max_visits = sizes["vocab_size"], sizes["dim"], sizes["max_visits"]
        self.config = dict(vocab_size=self.vocab_size, dim=self.dim, layers=sizes["layers"], heads=sizes["heads"],
                           dropout=float(dropout), max_visits=self.max_visits)
        self.code_embedding = nn.Embedding(self.vocab_size, dim, padding_idx=PAD)
        # log1p(days) spans 0 .. ~8 for a few years: periods from ~1.5 to ~50 in log-days
        self.register_buffer("time_freqs", 2.0 ** torch.arange(-3.0, 3.0), persistent=False)
        self.time_embedding = nn.Linear(2 * len(self.time_freqs) + 1, dim)
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout, activation="gelu", batch_first=True,
                                           norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, sizes["layers"], norm=nn.LayerNorm(dim),
                                             enable_nested_tensor=False)
        self.head = nn.Linear(dim, self.vocab_size)

    def _inputs(self, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        owner = "EHRFoundationModel"
        if not isinstance(batch, Mapping):
            raise ValueError(f"{owner} expects a dict batch with 'codes', 'days', 'visit_mask', got "
                             f"{type(batch).__name__}")
        missing = [k for k in ("codes", "days", "visit_mask") if k not in batch]
        if missing:
            raise ValueError(f"{owner} needs batch keys {missing} (present: {sorted(map(str, batch))})")
        codes, days, mask = batch["codes"], batch["days"], batch["visit_mask"]
        if not (isinstance(codes, torch.Tensor) and codes.dtype == torch.long and codes.ndim == 3):
            raise ValueError(f"{owner} expects batch['codes'] as int64 (B, V, C), got {_describe(codes)}")
        b, v = codes.shape[:2]
        if not (isinstance(days, torch.Tensor) and days.is_floating_point() and tuple(days.shape) == (b, v)):
            raise ValueError(f"{owner} expects batch['days'] as floats ({b}, {v}), got {_describe(days)}")
        if not (isinstance(mask, torch.Tensor) and mask.dtype == torch.bool and tuple(mask.shape) == (b, v)):
            raise ValueError(f"{owner} expects batch['visit_mask'] as bool ({b}, {v}) (True = padding), "
                             f"got {_describe(mask)}")
        if v == 0 or v > self.max_visits:
            raise ValueError(f"{owner}: batch['codes'] has {v} visit positions; 1 to max_visits={self.max_visits} "
                             "are accepted")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.vocab_size):
            raise ValueError(f"{owner}: token ids must lie in [0, {self.vocab_size}), got "
                             f"[{int(codes.min())}, {int(codes.max())}]")
        if v > 1 and bool((mask[:, :-1] & ~mask[:, 1:]).any()):
            raise ValueError(f"{owner}: visits must be left-aligned (real visits first, then padding); "
                             "a padding visit precedes a real one")
        return codes, days, mask

    def _time_features(self, days: torch.Tensor) -> torch.Tensor:
        t = torch.log1p(days.clamp(min=0).float()).unsqueeze(-1)
        angle = t * self.time_freqs
        return torch.cat([t / 8.0, torch.sin(angle), torch.cos(angle)], dim=-1)

    def forward(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per-visit states and next-visit logits.

        Args:
            batch: ``codes`` (B, V, C) int64, ``days`` (B, V) float, ``visit_mask`` (B, V) bool
                (True = padding), left-aligned, e.g. :meth:`EHRSequences.batch`.

        Returns:
            ``tokens`` (B, V, dim) per-visit states (zeros at padding); ``mask`` (B, V), the
            visit mask; ``pooled`` (B, dim), the state at the last real visit (zeros if none);
            ``last`` (B,) its position (-1 if none); ``logits`` (B, V, vocab_size), the logits of
            each token being in the next visit.

        Raises:
            ValueError: on a malformed batch (missing key, shape, dtype, token ids out of range,
                padding before a real visit, more than ``max_visits`` visits).
        """
        codes, days, mask = self._inputs(batch)
        b, v, _ = codes.shape
        known = (codes >= _N_SPECIAL).unsqueeze(-1)
        emb = (self.code_embedding(codes) * known).sum(dim=2) / known.sum(dim=2).clamp(min=1)
        x = (emb + self.time_embedding(self._time_features(days))).masked_fill(mask.unsqueeze(-1), 0.0)
        causal = torch.ones(v, v, dtype=torch.bool, device=codes.device).triu(1)
        # a subject without visits: unmask its keys so no attention row is empty (its states are zeroed below)
        key_pad = mask & ~mask.all(dim=1, keepdim=True)
        h = self.encoder(x, mask=causal, src_key_padding_mask=key_pad)
        h = h.masked_fill(mask.unsqueeze(-1), 0.0)
        pos = torch.arange(v, device=codes.device).expand(b, v)
        last = torch.where(mask, torch.full_like(pos, -1), pos).max(dim=1).values
        pooled = h[torch.arange(b, device=h.device), last.clamp(min=0)] * (last >= 0).unsqueeze(-1).to(h.dtype)
        return {"tokens": h, "mask": mask, "pooled": pooled, "last": last, "logits": self.head(h)}

    def next_visit_loss(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Mean binary cross-entropy of next-visit code prediction (the pretraining objective).

        At every real visit t followed by a real visit t + 1, the logits at t are scored against
        the multi-hot set of visit t + 1's known tokens (padding and unknown excluded, both as
        targets and as outputs), averaged over those visits and the vocabulary.

        Args:
            batch: as :meth:`forward`.

        Returns:
            ``loss`` (scalar; 0, attached to the graph with zero gradient, when no visit has a
            successor) and ``n_pairs`` (number of (visit, next visit) pairs, a float tensor).
        """
        out = self(batch)
        codes, mask = batch["codes"], out["mask"]
        logits = out["logits"][:, :-1, _N_SPECIAL:]
        pairs = ~mask[:, :-1] & ~mask[:, 1:]
        n_pairs = pairs.sum().to(logits.dtype)
        if not bool(pairs.any()):
            return {"loss": out["logits"].sum() * 0.0, "n_pairs": n_pairs.detach()}
        nxt = codes[:, 1:][pairs]  # (P, C)
        target = torch.zeros(nxt.shape[0], self.vocab_size, dtype=logits.dtype, device=logits.device)
        target.scatter_(1, nxt, 1.0)
        loss = F.binary_cross_entropy_with_logits(logits[pairs], target[:, _N_SPECIAL:])
        return {"loss": loss, "n_pairs": n_pairs.detach()}


# --------------------------------------------------------------------------- pretraining and use


def _digest(*arrays: np.ndarray | torch.Tensor) -> str:
    h = hashlib.sha1()
    for a in arrays:
        a = a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
        h.update(str(a.shape).encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


def pretrain_foundation_model(
    seqs: EHRSequences,
    train_idx: object,
    val_idx: object,
    *,
    dim: int = 64,
    layers: int = 2,
    heads: int = 4,
    dropout: float = 0.1,
    epochs: int = 20,
    batch_size: int = 64,
    lr: float = 1e-3,
    weight_decay: float = 0.01,
    seed: int = 0,
    device: str | torch.device = "cpu",
    checkpoint: str | Path | None = None,
    resume: bool = True,
    desc: str = "pretrain EHR model",
) -> tuple[EHRFoundationModel, pd.DataFrame]:
    """Pretrain an :class:`EHRFoundationModel` on next-visit prediction, without labels.

    AdamW with :func:`mmlib.train.fit`; the training subjects are shuffled each epoch with a
    generator seeded by ``(seed, epoch)``, the model is initialised under ``seed``, so two runs
    with the same seed on CPU give the same model. The model of the epoch with the lowest
    validation loss is returned (the last epoch's without validation subjects).

    Args:
        seqs: all subjects' sequences (:meth:`EHRTokenizer.transform`).
        train_idx: positions in ``seqs`` of the training subjects (the ones the tokenizer was fitted on).
        val_idx: positions of the validation subjects (may be empty).
        dim, layers, heads, dropout: the architecture (:class:`EHRFoundationModel`).
        epochs, batch_size, lr, weight_decay, seed: the optimisation.
        device: where to train.
        checkpoint: path stem for :func:`mmlib.train.fit`'s checkpoints (``<stem>.best``,
            ``<stem>.last``); None: a temporary folder.
        resume: with ``checkpoint``, continue from ``<stem>.last`` if it was written with the same
            settings and data (False: start afresh, overwriting it).
        desc: progress-bar label.

    Returns:
        ``(model, history)``: the best model in eval mode on ``device``, and fit's per-epoch table
        (``epoch``, ``train_loss``, ``val_loss``, ``best``, ...; ``train_n_pairs`` / ``val_n_pairs`` are fit's
        batch-size-weighted means of the (visit, next visit) pairs per batch, a size indicator only).

    Raises:
        ValueError: with no training subjects or bad sizes.
    """
    from mmlib.train import fit, load_checkpoint

    train = _positions(train_idx, len(seqs), "pretrain_foundation_model(train_idx)")
    val = _positions(val_idx, len(seqs), "pretrain_foundation_model(val_idx)")
    if train.size == 0:
        raise ValueError("pretrain_foundation_model: train_idx selects no subjects")
    n = _check_int("pretrain_foundation_model", epochs=epochs, batch_size=batch_size)
    torch.manual_seed(seed)
    model = EHRFoundationModel(seqs.vocab_size, dim=dim, layers=layers, heads=heads, dropout=dropout,
                               max_visits=max(1, seqs.codes.shape[1]))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)

    def train_batches(epoch: int) -> Iterator[dict[str, torch.Tensor]]:
        g = torch.Generator().manual_seed(seed * 100_003 + epoch)
        order = train[torch.randperm(len(train), generator=g).numpy()]
        for i in range(0, len(order), n["batch_size"]):
            yield seqs.batch(order[i:i + n["batch_size"]])

    def val_batches() -> Iterator[dict[str, torch.Tensor]]:
        for i in range(0, len(val), n["batch_size"]):
            yield seqs.batch(val[i:i + n["batch_size"]])

    meta = dict(model=model.config, batch_size=n["batch_size"], lr=lr, weight_decay=weight_decay,
                data=_digest(seqs.codes, seqs.days, seqs.visit_mask, train, val))
    with tempfile.TemporaryDirectory(prefix="mmlib-ehr-") as tmp:
        stem = Path(checkpoint) if checkpoint is not None else Path(tmp) / "ehr_foundation_model"
        history = fit(model, loss_fn=lambda m, b: m.next_visit_loss(b), train_batches=train_batches,
                      epochs=n["epochs"], optimizer=optimizer, val_batches=val_batches if val.size else None,
                      checkpoint=stem, resume=resume, device=device, seed=seed, meta=meta, desc=desc)
        state, _ = load_checkpoint(stem.with_name(stem.name + ".best"))
    model.load_state_dict(state)
    return model.eval(), history


@torch.no_grad()
def _outputs(model: EHRFoundationModel, seqs: EHRSequences, idx: np.ndarray, batch_size: int,
             device: str | torch.device, keys: Sequence[str]) -> dict[str, torch.Tensor]:
    """``model`` outputs ``keys`` for the subjects ``idx``, in eval mode, concatenated on CPU."""
    bs = _check_int("EHR model evaluation", batch_size=batch_size)["batch_size"]
    was_training = model.training
    model.to(device).eval()
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in keys}
    try:
        for i in range(0, len(idx), bs):
            batch = {k: v.to(device) for k, v in seqs.batch(idx[i:i + bs]).items()}
            out = model(batch)
            for k in keys:
                parts[k].append(out[k].cpu())
    finally:
        model.train(was_training)
    if not len(idx):
        v = seqs.codes.shape[1]
        empty = {"tokens": torch.zeros(0, v, model.dim), "mask": torch.zeros(0, v, dtype=torch.bool),
                 "pooled": torch.zeros(0, model.dim), "logits": torch.zeros(0, v, model.vocab_size)}
        return {k: empty[k] for k in keys}
    return {k: torch.cat(p) for k, p in parts.items()}


def embed_sequences(model: EHRFoundationModel, seqs: EHRSequences, *, batch_size: int = 256,
                    device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Frozen EHR embeddings of every subject of ``seqs`` (eval mode, no gradient).

    Args:
        model: a (pretrained) :class:`EHRFoundationModel` (moved to ``device``).
        seqs: the subjects.
        batch_size: subjects per forward pass.
        device: where to compute.

    Returns:
        CPU tensors ``tokens`` (N, V, dim) per-visit states, ``mask`` (N, V) True = padding, and
        ``pooled`` (N, dim) the state at the last real visit (zeros for a subject without
        visits): ready as ``{"ehr": tokens, "ehr_mask": mask}`` or ``{"ehr": pooled}`` for
        :mod:`mmlib.models.fusion`. The model's train/eval mode is restored afterwards.
    """
    return _outputs(model, seqs, np.arange(len(seqs)), batch_size, device, ("tokens", "mask", "pooled"))


def _next_visit_pairs(seqs: EHRSequences, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(subject row in idx, visit position) of each visit with a successor, and the successor's multi-hot."""
    mask = seqs.visit_mask[idx]
    pairs = (~mask[:, :-1] & ~mask[:, 1:]).numpy()
    rows, pos = np.nonzero(pairs)
    nxt = seqs.codes[idx][:, 1:][torch.from_numpy(pairs)]
    target = torch.zeros(nxt.shape[0], seqs.vocab_size)
    target.scatter_(1, nxt, 1.0)
    return rows, pos, target[:, _N_SPECIAL:].numpy()


def _micro_auc(target: np.ndarray, score: np.ndarray, owner: str) -> float:
    from sklearn.metrics import roc_auc_score

    y = target.ravel()
    if y.size == 0 or y.min() == y.max():
        raise ValueError(f"{owner}: the micro AUC needs both present and absent next-visit codes; these subjects "
                         f"give {y.size} (visit, code) pairs with {int(y.sum())} present")
    return float(roc_auc_score(y, score.ravel()))


def next_visit_auc(model: EHRFoundationModel, seqs: EHRSequences, idx: object, *, batch_size: int = 256,
                   device: str | torch.device = "cpu") -> float:
    """Micro-averaged ROC-AUC of next-visit code prediction on the subjects ``idx``.

    Every (visit with a successor, known token) pair is one binary case: present in the next
    visit or not, scored by the model's logit at that visit. Compare with
    :func:`frequency_baseline_auc` on the same subjects.

    Raises:
        ValueError: if the subjects have no visit with a successor (or every code is present).
    """
    i = _positions(idx, len(seqs), "next_visit_auc")
    logits = _outputs(model, seqs, i, batch_size, device, ("logits",))["logits"]
    if logits.shape[-1] != seqs.vocab_size:
        raise ValueError(f"next_visit_auc: the model predicts {logits.shape[-1]} tokens but the sequences' vocabulary "
                         f"has {seqs.vocab_size}")
    rows, pos, target = _next_visit_pairs(seqs, i)
    score = logits[torch.from_numpy(rows), torch.from_numpy(pos), _N_SPECIAL:].numpy()
    return _micro_auc(target, score, "next_visit_auc")


def frequency_baseline_auc(seqs: EHRSequences, train_idx: object, idx: object) -> float:
    """The micro AUC of :func:`next_visit_auc` when every code is scored by its training frequency.

    A code's score is the share of the training subjects' real visits that contain it, the same
    for every visit: the reference a pretrained model has to beat by using the history.

    Raises:
        ValueError: as :func:`next_visit_auc`.
    """
    train = _positions(train_idx, len(seqs), "frequency_baseline_auc(train_idx)")
    i = _positions(idx, len(seqs), "frequency_baseline_auc(idx)")
    real = ~seqs.visit_mask[train]
    visits = seqs.codes[train][real]  # (visits, C)
    hot = torch.zeros(visits.shape[0], seqs.vocab_size)
    hot.scatter_(1, visits, 1.0)
    freq = hot[:, _N_SPECIAL:].mean(dim=0).numpy() if visits.shape[0] else np.zeros(seqs.vocab_size - _N_SPECIAL)
    _, _, target = _next_visit_pairs(seqs, i)
    return _micro_auc(target, np.broadcast_to(freq, target.shape), "frequency_baseline_auc")
