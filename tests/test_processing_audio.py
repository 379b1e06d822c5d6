"""Audio: loading, resampling and log-mel features against transformers' WhisperFeatureExtractor."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile
import soxr
import torch
from processor_fixtures import SPEECH, oracle_feature_extractor, oracle_features, speech

from qwen3omni.errors import InputError, MissingFileError
from qwen3omni.model.positions import audio_token_count
from qwen3omni.processing.audio import MelSettings, load_audio, log_mel_features, mel_filter_bank

TOL = 1e-4
RATE = 16000


def _synthetic(seconds: float, seed: int) -> np.ndarray:
    """A chirp with harmonics, noise and a silent gap: broadband, with a wide dynamic range."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * RATE)) / RATE
    chirp = np.sin(2 * np.pi * (100 + 1500 * t / max(seconds, 1e-3)) * t)
    wave = 0.4 * chirp + 0.1 * np.sin(2 * np.pi * 3 * 440 * t) + 0.02 * rng.standard_normal(t.size)
    wave[t.size // 3: t.size // 3 + t.size // 10] = 0.0
    return wave.astype(np.float32)


def _tiled_speech(seconds: float) -> np.ndarray:
    clip = speech()
    return np.tile(clip, int(np.ceil(seconds * RATE / clip.size)))[: int(seconds * RATE)]


def _ours(waves):
    return log_mel_features([torch.from_numpy(np.asarray(w, dtype=np.float32)) for w in waves])


def _assert_matches_reference(waves):
    ref_features, ref_mask = oracle_features(waves)
    features, mask = _ours(waves)
    assert features.shape == ref_features.shape and features.dtype == ref_features.dtype
    assert torch.equal(mask, ref_mask) and mask.dtype == ref_mask.dtype
    diff = (features - ref_features).abs().max().item()
    assert diff <= TOL, f"log-mel differs from WhisperFeatureExtractor by {diff}"
    return features, mask


def test_filter_bank_matches_reference():
    ours, ref = mel_filter_bank(), oracle_feature_extractor().mel_filters
    assert ours.shape == ref.shape == (201, 128)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-12)


def test_real_speech_matches_reference():
    features, mask = _assert_matches_reference([speech()])
    assert features.shape == (1, 128, speech().size // 160)
    assert int(mask.sum()) == features.shape[-1]


@pytest.mark.parametrize("seconds", [0.5, 1.2345, 7.0, 65.3])
def test_synthetic_signals_match_reference(seconds):
    _assert_matches_reference([_synthetic(seconds, seed=int(seconds * 10))])


def test_long_real_speech_is_kept_whole():
    wave = _tiled_speech(61.7)
    features, mask = _assert_matches_reference([wave])
    assert features.shape[-1] == wave.size // 160 > 3000  # no 30-second cut


def test_batch_of_different_lengths_matches_reference():
    waves = [speech(), _synthetic(0.5, 1), _tiled_speech(62.0), speech()[: 16000 * 3 + 77]]
    features, mask = _assert_matches_reference(waves)
    assert mask.sum(-1).tolist() == [-(-w.size // 160) for w in waves[:3]] + [-(-(16000 * 3 + 77) // 160)]
    # Token counts follow the encoder's length rule from the mask.
    assert audio_token_count(mask.sum(-1), 50).tolist() == [audio_token_count(int(n), 50) for n in mask.sum(-1)]


def _variant_features(wave, *, window=None, filters=None, hop=160):
    x = torch.from_numpy(wave)[None]
    window = torch.hann_window(400) if window is None else window
    spec = torch.stft(x, 400, hop, window=window, return_complex=True)[..., :-1].abs().pow(2)
    filters = torch.from_numpy(mel_filter_bank().T.copy()).float() if filters is None else filters
    log = (filters @ spec).clamp(min=1e-10).log10()
    return (torch.maximum(log, log.amax() - 8.0) + 4.0) / 4.0


def _htk_filters():
    def to_mel(hz):
        return 2595.0 * np.log10(1.0 + hz / 700.0)

    edges = 700.0 * (10 ** (np.linspace(to_mel(0.0), to_mel(8000.0), 130) / 2595.0) - 1.0)
    bins = np.linspace(0, 8000, 201)[:, None]
    tri = np.clip(np.minimum((bins - edges[:-2]) / (edges[1:-1] - edges[:-2]),
                             (edges[2:] - bins) / (edges[2:] - edges[1:-1])), 0, None)
    return torch.from_numpy((tri * 2.0 / (edges[2:] - edges[:-2])).T.copy()).float()


def test_tolerance_catches_wrong_variants():
    """The 1e-4 tolerance is far below what a wrong window, mel scale or hop changes."""
    wave = speech()[:16000]
    ref, _ = oracle_features([wave])
    assert (_variant_features(wave) - ref).abs().max() <= TOL
    wrong_window = _variant_features(wave, window=torch.hann_window(400, periodic=False))
    wrong_scale = _variant_features(wave, filters=_htk_filters())
    wrong_hop = _variant_features(wave, hop=161)
    assert (wrong_window - ref).abs().max() > 100 * TOL
    assert (wrong_scale - ref).abs().max() > 100 * TOL
    frames = wrong_hop.shape[-1]
    assert (wrong_hop - ref[..., :frames]).abs().max() > 100 * TOL


def test_gpu_features_match_cpu():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    waves = [torch.from_numpy(w) for w in (speech(), _synthetic(2.5, 3))]
    cpu_features, cpu_mask = log_mel_features(waves)
    gpu_features, gpu_mask = log_mel_features([w.cuda() for w in waves])
    assert gpu_features.is_cuda and torch.equal(gpu_mask.cpu(), cpu_mask)
    assert (gpu_features.cpu() - cpu_features).abs().max() <= TOL


# ---------------------------------------------------------------------------------------------------------------
# Loading


def _resampled(mono, rate):
    return soxr.resample(mono, rate, RATE, quality="HQ").astype(np.float32)


@pytest.mark.parametrize("fmt", ["WAV", "FLAC", "OGG"])
def test_files_are_downmixed_and_resampled(tmp_path, fmt):
    clip = speech()
    stereo_44k = np.stack([_resampled_to(clip, 44100), 0.5 * _resampled_to(clip, 44100)], axis=1)
    path = tmp_path / f"speech.{fmt.lower()}"
    soundfile.write(str(path), stereo_44k, 44100, format=fmt)
    on_disk, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    expected = _resampled(on_disk.mean(axis=1), rate)
    loaded = load_audio(path)
    assert loaded.dtype == torch.float32 and loaded.ndim == 1
    np.testing.assert_allclose(loaded.numpy(), expected, rtol=0, atol=1e-7)
    assert abs(loaded.numel() - clip.size) <= 2  # 16 kHz again


def _resampled_to(mono, rate):
    return soxr.resample(mono, RATE, rate, quality="HQ").astype(np.float32)


def test_array_forms_agree():
    clip = speech()
    stereo = np.stack([clip, clip * 0.5])
    expected = (clip + 0.5 * clip) / 2
    for form in (stereo, stereo.T, torch.from_numpy(stereo), {"array": stereo, "sampling_rate": RATE}):
        np.testing.assert_allclose(load_audio(form).numpy(), expected, atol=1e-7)
    as_int16 = np.round(clip * 32767).astype(np.int16)
    np.testing.assert_allclose(load_audio(as_int16).numpy(), as_int16 / 32768.0, atol=1e-7)
    resampled = load_audio((_resampled_to(clip, 22050), 22050))
    np.testing.assert_allclose(resampled.numpy(), _resampled(_resampled_to(clip, 22050), 22050), atol=1e-7)


def test_file_and_array_give_the_same_features():
    from_file = log_mel_features([load_audio(SPEECH)])[0]
    from_array = log_mel_features([load_audio(speech())])[0]
    assert torch.equal(from_file, from_array)


# ---------------------------------------------------------------------------------------------------------------
# Errors


def test_errors_name_the_item(tmp_path):
    with pytest.raises(MissingFileError, match="does-not-exist.wav"):
        load_audio(tmp_path / "does-not-exist.wav", name="clip 3")
    bogus = tmp_path / "notes.wav"
    bogus.write_text("not audio at all")
    with pytest.raises(InputError, match="clip 3: cannot read .*notes.wav"):
        load_audio(bogus, name="clip 3")
    with pytest.raises(InputError, match="clip 3: the audio is empty"):
        load_audio(np.zeros(0, np.float32), name="clip 3")
    bad = speech().copy()
    bad[[5, 700]] = [np.nan, np.inf]
    with pytest.raises(InputError, match="clip 3: the audio has 2 NaN or infinite samples"):
        load_audio(bad, name="clip 3")
    with pytest.raises(InputError, match="clip 3: audio with 6 channels is not supported"):
        load_audio(np.zeros((6, 16000), np.float32), name="clip 3")
    with pytest.raises(InputError, match="sampling_rate"):
        load_audio((speech(), -5))
    with pytest.raises(InputError, match="audio 0: expected a mono waveform of at least 201 samples"):
        log_mel_features([torch.zeros(100)], MelSettings())
