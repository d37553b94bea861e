"""P3 ECG preprocessing and augmentation (mmlib.ecg): filters, resampling, scaling, seeded augmentations, DICOM."""

import numpy as np
import pytest

from mmlib.ecg import (
    add_noise,
    augment_ecg,
    downsample,
    preprocess_ecg,
    random_scale,
    read_dicom_ecg,
    remove_baseline_wander,
    scale_leads,
    time_warp,
)

FS = 100
T = np.arange(10 * FS) / FS  # 10 s at 100 Hz
FAST = np.sin(2 * np.pi * 10 * T)  # 10 Hz: QRS-band content
SLOW = 2 * np.sin(2 * np.pi * 0.2 * T + 0.7)  # 0.2 Hz: respiration-like wander, twice the signal's amplitude
INNER = slice(FS, -FS)  # without the first and last second, where the filter's edge transients fall


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x))))


def _ecg_like(n_leads: int = 12, fs: int = 500, seconds: float = 10.0, seed: int = 0) -> np.ndarray:
    """Spiky beats at ~70 bpm with per-lead gains and signs, plus wander and an offset, in mV."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(fs * seconds)) / fs
    beats = sum(np.exp(-0.5 * ((t - c) / 0.015) ** 2) for c in np.arange(0.3, seconds, 0.85))
    gains = rng.uniform(0.3, 2.0, (n_leads, 1)) * rng.choice([-1, 1], (n_leads, 1))
    wander = rng.uniform(0.2, 0.6, (n_leads, 1)) * np.sin(2 * np.pi * 0.15 * t + rng.uniform(0, 6, (n_leads, 1)))
    return gains * beats + wander + rng.uniform(-1, 1, (n_leads, 1))


# --------------------------------------------------------------------------- baseline wander


def test_wander_removal_removes_slow_drift_and_keeps_the_signal():
    x = np.stack([FAST + SLOW, FAST, SLOW])
    y = remove_baseline_wander(x, FS)
    assert y.shape == x.shape
    residual = y[0] - FAST  # what is left of the 0.2 Hz wander
    assert _rms(residual) < 0.05 * _rms(SLOW)  # the whole record, edges included
    assert _rms(residual[INNER]) < 0.02 * _rms(SLOW[INNER])
    assert _rms(y[2]) < 0.05 * _rms(SLOW)
    kept = _rms(y[1][INNER]) / _rms(FAST[INNER])
    assert 0.95 < kept < 1.05
    assert np.abs(y[1] - FAST)[INNER].max() < 0.05  # no phase shift either (zero-phase filter)


def test_wander_removal_edges_do_not_ring_when_the_record_ends_in_a_wave():
    t = np.arange(30 * FS) / FS
    beats = sum(np.exp(-0.5 * ((t - c) / 0.015) ** 2) + 0.3 * np.exp(-0.5 * ((t - c - 0.3) / 0.05) ** 2)
                for c in np.arange(19.99 - 0.8 * 25, 30, 0.8))  # a QRS peak at 19.99 s
    drift = 0.3 * np.sin(2 * np.pi * 0.15 * t + 1.0) + 0.02 * t
    reference = remove_baseline_wander(beats, FS)[10 * FS: 20 * FS]  # the same 10 s filtered inside a 30 s record
    y = remove_baseline_wander((beats + drift)[10 * FS: 20 * FS], FS)  # ends on the QRS peak
    assert abs(beats[20 * FS - 1] - 1) < 1e-6
    assert np.abs(y - reference).max() < 0.15  # plain odd reflection about the end sample: about 1 (a QRS-size error)
    assert abs(np.abs(y).max() - np.abs(reference).max()) < 0.1  # so the per-lead scale is not set by an artefact


def test_wander_removal_filters_along_time_per_lead_and_keeps_dtype():
    x = np.stack([FAST + SLOW, 3 * FAST]).astype(np.float32)
    y = remove_baseline_wander(x[None], FS)  # a batch axis in front
    assert y.shape == (1, 2, T.size) and y.dtype == np.float32
    np.testing.assert_allclose(y[0, 1], remove_baseline_wander(3 * FAST, FS), atol=1e-5)  # leads do not mix
    ints = remove_baseline_wander(np.round(1000 * (FAST + SLOW)).astype(np.int16), FS)
    assert ints.dtype == np.float64


def test_wander_removal_errors():
    with pytest.raises(ValueError, match="cutoff_hz"):
        remove_baseline_wander(FAST, FS, cutoff_hz=60)
    with pytest.raises(ValueError, match="fs"):
        remove_baseline_wander(FAST, 0)
    with pytest.raises(ValueError, match="NaN"):
        remove_baseline_wander(np.where(T > 5, np.nan, FAST), FS)


# --------------------------------------------------------------------------- downsampling


def test_downsample_keeps_a_5hz_sine_and_halves_the_length():
    t200 = np.arange(400) / 200
    x = np.stack([np.sin(2 * np.pi * 5 * t200 + 0.3), np.cos(2 * np.pi * 3 * t200)])
    y = downsample(x, 200, 100)
    assert y.shape == (2, 200)
    t100 = np.arange(200) / 100
    ref = np.stack([np.sin(2 * np.pi * 5 * t100 + 0.3), np.cos(2 * np.pi * 3 * t100)])
    assert np.abs(y - ref)[:, 10:-10].max() < 0.01
    assert np.abs(y - ref).max() < 0.05


def test_downsample_is_anti_aliased():
    t200 = np.arange(400) / 200
    x = np.sin(2 * np.pi * 70 * t200 + 0.3)[None]  # above the new Nyquist (50 Hz): plain x[::2] would alias to 30 Hz
    y = downsample(x, 200, 100)
    assert _rms(x[:, ::2]) > 0.5
    assert _rms(y[:, 10:-10]) < 0.02


def test_downsample_500_to_100_and_errors():
    assert downsample(np.zeros((12, 5000)), 500, 100).shape == (12, 1000)
    x = np.ones((3, 50), dtype=np.float32)
    assert downsample(x, 100, 100).dtype == np.float32
    with pytest.raises(ValueError, match="fs_out"):
        downsample(np.zeros((2, 100)), 100, 200)
    with pytest.raises(ValueError, match="fs_in"):
        downsample(np.zeros((2, 100)), -5, 1)


# --------------------------------------------------------------------------- scaling


def test_scale_leads_divides_each_lead_by_its_peak():
    x = np.stack([0.5 * FAST, -3 * FAST + 0.2, np.zeros_like(FAST), 1e-12 * FAST])
    y = scale_leads(x)
    assert not np.isnan(y).any()
    np.testing.assert_allclose(np.abs(y[:2]).max(axis=1), 1.0)
    np.testing.assert_allclose(y[0], FAST / np.abs(FAST).max(), atol=1e-12)
    np.testing.assert_allclose(y[1], x[1] / np.abs(x[1]).max())  # sign and zero line kept, no min-max shift
    assert (y[2] == 0).all() and (y[3] == 0).all()  # flat (or numerically flat) leads stay 0
    assert scale_leads(x.astype(np.float32)).dtype == np.float32


# --------------------------------------------------------------------------- the chain


def test_preprocess_ecg_shape_dtype_range():
    x = _ecg_like(fs=500)
    y = preprocess_ecg(x, 500)
    assert y.shape == (12, 1000) and y.dtype == np.float32
    assert np.abs(y).max() <= 1.0
    np.testing.assert_allclose(np.abs(y).max(axis=1), 1.0, rtol=1e-6)


def test_preprocess_ecg_removes_wander_before_scaling():
    t500 = np.arange(5000) / 500
    fast = np.sin(2 * np.pi * 10 * t500)
    x = np.stack([fast + 5 * np.sin(2 * np.pi * 0.1 * t500) + 3.0, fast])
    y = preprocess_ecg(x, 500)
    ref = np.sin(2 * np.pi * 10 * T)
    corr = np.corrcoef(y[0, INNER], ref[INNER])[0, 1]
    assert corr > 0.99  # without the high-pass the 5 mV drift and the offset dominate the scaled lead
    assert np.abs(y[0, INNER]).max() > 0.9  # the 10 Hz part sets the scale, not the drift
    unfiltered = preprocess_ecg(x, 500, cutoff_hz=None)
    assert np.corrcoef(unfiltered[0, INNER], ref[INNER])[0, 1] < 0.5


def test_preprocess_ecg_pads_and_crops():
    short = _ecg_like(fs=100, seconds=8.0)
    y = preprocess_ecg(short, 100)
    assert y.shape == (12, 1000)
    assert (y[:, 800:] == 0).all() and (np.abs(y[:, :800]).max(axis=1) == 1).all()
    long = _ecg_like(fs=250, seconds=12.0)
    assert preprocess_ecg(long, 250).shape == (12, 1000)
    assert preprocess_ecg(_ecg_like(fs=500), 500, target_fs=50, n_samples=300).shape == (12, 300)
    flat = np.zeros((12, 1000))
    flat[3] = 0.7  # a constant (disconnected) lead: 0 after the high-pass, must not blow up
    out = preprocess_ecg(flat + _ecg_like(fs=100) * (np.arange(12) != 3)[:, None], 100)
    assert (out[3] == 0).all() and not np.isnan(out).any()


def test_preprocess_ecg_errors():
    x = _ecg_like(fs=100)
    with pytest.raises(ValueError, match=r"x must have shape \(leads, samples\)"):
        preprocess_ecg(x[0], 100)
    with pytest.raises(ValueError, match=r"x must have shape \(leads, samples\)"):
        preprocess_ecg(x[None], 100)
    bad = x.copy()
    bad[2, 10] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        preprocess_ecg(bad, 100)
    with pytest.raises(ValueError, match=r"fs \(50.0 Hz\) is below target_fs"):
        preprocess_ecg(x, 50)
    with pytest.raises(ValueError, match="n_samples"):
        preprocess_ecg(x, 100, n_samples=0)
    with pytest.raises(ValueError, match="dtype"):
        preprocess_ecg(np.array([["a", "b"]]), 100)


# --------------------------------------------------------------------------- augmentations


AUGMENTATIONS = {
    "time_warp": time_warp,
    "add_noise": add_noise,
    "random_scale": random_scale,
    "augment_ecg": augment_ecg,
}


@pytest.mark.parametrize("name", AUGMENTATIONS)
def test_augmentations_are_seeded(name):
    fn = AUGMENTATIONS[name]
    x = preprocess_ecg(_ecg_like(fs=100), 100)
    a = fn(x, np.random.default_rng(7))
    b = fn(x, np.random.default_rng(7))
    c = fn(x, np.random.default_rng(8))
    assert a.shape == x.shape and a.dtype == x.dtype
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    assert not np.allclose(a, x)
    with pytest.raises(ValueError, match="rng"):
        fn(x, 7)


def test_time_warp_stretches_time_by_one_factor_in_range():
    n = 1000
    ramp = np.tile(np.arange(n, dtype=float), (3, 1))  # x(t) = t, so y[j] = j / s
    slopes = []
    for seed in range(20):
        y = time_warp(ramp, np.random.default_rng(seed), max_stretch=0.1)
        assert y.shape == ramp.shape
        np.testing.assert_array_equal(y[0], y[2])  # all leads warp together
        inside = y[0] > 0
        slope = np.polyfit(np.arange(n)[inside], y[0, inside], 1)[0]
        assert 1 / 1.1 - 1e-9 <= slope <= 1 / 0.9 + 1e-9
        np.testing.assert_allclose(y[0, inside], slope * np.arange(n)[inside], atol=1e-6)  # a pure stretch
        slopes.append(slope)
    assert np.ptp(slopes) > 0.05  # the factor varies
    assert any(s > 1 for s in slopes) and any(s < 1 for s in slopes)  # both compressed and stretched
    compressed = [time_warp(ramp, np.random.default_rng(s)) for s in range(20)]
    assert any((c[0, -10:] == 0).all() for c in compressed)  # compressed records are zero-padded at the end
    np.testing.assert_allclose(time_warp(ramp, np.random.default_rng(0), max_stretch=0.0), ramp)


def test_add_noise_level():
    x = np.zeros((12, 1000))
    y = add_noise(x, np.random.default_rng(0), sd=0.05)
    assert abs(y.std() - 0.05) < 0.002 and abs(y.mean()) < 0.002
    np.testing.assert_array_equal(add_noise(x, np.random.default_rng(0), sd=0.0), x)


def test_random_scale_multiplies_each_lead_by_a_factor_in_range():
    x = preprocess_ecg(_ecg_like(fs=100), 100)
    y = random_scale(x, np.random.default_rng(3), low=0.8, high=1.2)
    nz = np.abs(x) > 1e-3
    factors = np.array([np.median(y[i, nz[i]] / x[i, nz[i]]) for i in range(len(x))])
    np.testing.assert_allclose(y, factors[:, None] * x, rtol=1e-5, atol=1e-7)  # one factor per lead
    per_lead = factors
    assert ((per_lead >= 0.8) & (per_lead <= 1.2)).all()
    assert np.ptp(per_lead) > 0.05  # leads get different factors
    with pytest.raises(ValueError, match="low"):
        random_scale(x, np.random.default_rng(0), low=1.2, high=0.8)


def test_augment_ecg_with_neutral_parameters_is_the_identity():
    x = preprocess_ecg(_ecg_like(fs=100), 100)
    y = augment_ecg(x, np.random.default_rng(0), max_stretch=0.0, noise_sd=0.0, scale=(1.0, 1.0))
    np.testing.assert_allclose(y, x, atol=1e-6)
    z = augment_ecg(x, np.random.default_rng(0))
    assert 0.005 < np.abs(z - x).mean() < 0.2  # the defaults perturb, mildly


def test_augment_ecg_applies_all_three():
    x = preprocess_ecg(_ecg_like(fs=100), 100)
    noise_only = augment_ecg(np.zeros_like(x), np.random.default_rng(0), max_stretch=0.0, noise_sd=0.05,
                             scale=(1.0, 1.0))
    assert abs(noise_only.std() - 0.05) < 0.003
    ramp = np.tile(np.arange(1000, dtype=float), (2, 1))
    warp_only = augment_ecg(ramp, np.random.default_rng(0), max_stretch=0.1, noise_sd=0.0, scale=(1.0, 1.0))
    inside = warp_only[0] > 0
    slope = np.polyfit(np.arange(1000)[inside], warp_only[0, inside], 1)[0]
    assert 1 / 1.1 <= slope <= 1 / 0.9 and abs(slope - 1) > 1e-3
    scale_only = augment_ecg(x, np.random.default_rng(0), max_stretch=0.0, noise_sd=0.0, scale=(0.5, 0.6))
    peaks = np.abs(scale_only).max(axis=1)  # x's peaks are 1
    assert ((peaks >= 0.5) & (peaks <= 0.6)).all() and np.ptp(peaks) > 0
    # the order: warp, scale, noise, all from the one generator
    rng = np.random.default_rng(4)
    expected = add_noise(random_scale(time_warp(x, rng, 0.1), rng, 0.9, 1.1), rng, 0.01)
    np.testing.assert_array_equal(augment_ecg(x, np.random.default_rng(4)), expected)


# --------------------------------------------------------------------------- DICOM


def test_read_dicom_ecg_pydicom_testfile():
    from pydicom.data import get_testdata_file

    path = get_testdata_file("waveform_ecg.dcm", download=False)  # ships with pydicom; never downloaded
    if path is None:
        pytest.skip("pydicom's waveform_ecg.dcm is not installed locally")
    signal, fs, leads = read_dicom_ecg(path)
    assert leads == ["I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6"]
    assert fs == 1000.0
    assert signal.shape == (12, 10000) and signal.dtype == np.float32  # 10 s rhythm strip
    peaks = np.abs(signal).max(axis=1)
    assert (peaks > 0.2).all() and (peaks < 5.0).all()  # mV, not uV
    # Einthoven: III = II - I (up to the 1.25 uV quantisation)
    np.testing.assert_allclose(signal[2], signal[1] - signal[0], atol=0.01)
    y = preprocess_ecg(signal, fs)
    assert y.shape == (12, 1000) and y.dtype == np.float32
    assert np.abs(y).max() <= 1.0
    np.testing.assert_allclose(np.abs(y).max(axis=1), 1.0, rtol=1e-6)
    beat, fs_beat, _ = read_dicom_ecg(path, group="MEDIAN BEAT")
    assert beat.shape == (12, 1200) and fs_beat == 1000.0
