"""Audio into the thinker's input features: load, downmix, resample to 16 kHz, 128-bin log-mel.

The features follow the Whisper recipe the released checkpoint was trained with (and that transformers'
`WhisperFeatureExtractor(feature_size=128)` implements, as the Qwen3-Omni processor calls it): a 400-point
periodic Hann STFT every 160 samples, power spectrum, a Slaney-style mel filter bank from 0 to 8 kHz, log10
clamped at 1e-10, a floor 8 decades below each clip's peak, then (x + 4) / 4. A batch is zero-padded to its
longest clip *before* the STFT, as the reference does, and long audio is kept whole (no 30-second cut).
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile
import soxr
import torch

from ..errors import InputError, MissingFileError, describe

SAMPLING_RATE = 16000


@dataclass(frozen=True)
class MelSettings:
    """The feature extractor settings of `preprocessor_config.json` (the released values are the defaults)."""

    n_mels: int = 128
    n_fft: int = 400
    hop_length: int = 160
    sampling_rate: int = SAMPLING_RATE
    padding_value: float = 0.0
    f_max: float = 8000.0

    @property
    def min_samples(self) -> int:
        # torch.stft reflect-pads n_fft // 2 samples at each end, which needs at least that many plus one.
        return self.n_fft // 2 + 1


# ---------------------------------------------------------------------------------------------------------------
# Loading


def load_audio(source, sampling_rate: int | None = None, *, target_rate: int = SAMPLING_RATE, name: str = "audio"):
    """Any supported audio input as a mono float32 waveform at `target_rate` (a 1-D tensor).

    `source` is a file path (whatever libsndfile reads: wav, flac, ogg, mp3 ...), a numpy array or tensor of
    samples (`[samples]`, `[channels, samples]` or `[samples, channels]`, at most 2 channels), an
    `(array, sampling_rate)` pair or a `{"array": ..., "sampling_rate": ...}` dict. Arrays without a rate are
    taken to be at `target_rate` already. Integer PCM is scaled to [-1, 1). A tensor on a GPU stays there
    unless it must be resampled (soxr runs on the CPU).
    """
    samples, rate = _unpack(source, sampling_rate, name)
    if isinstance(samples, (str, Path)):
        samples, rate = _read_file(samples, name)
    mono = _to_mono(_as_float_samples(samples, name), name)
    _check_samples(mono, name)
    return resample(mono, rate, target_rate, name=name)


def _unpack(source, sampling_rate, name):
    """Split the accepted input forms into (samples or path, rate)."""
    if isinstance(source, dict):
        array = source.get("array", source.get("waveform"))
        if array is None:
            raise InputError(f"{name}: a dict needs an 'array' entry with the samples, got keys {sorted(source)}")
        return array, source.get("sampling_rate", sampling_rate)
    if isinstance(source, tuple) and len(source) == 2 and not isinstance(source[1], (np.ndarray, torch.Tensor)):
        return source[0], source[1]
    return source, sampling_rate


def _read_file(path, name):
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{name}: audio file {str(path)!r} does not exist")
    try:
        samples, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    except (soundfile.LibsndfileError, RuntimeError, TypeError) as e:
        raise InputError(f"{name}: cannot read {str(path)!r} as audio (expected wav, flac, ogg or mp3): {e}") from None
    return torch.from_numpy(np.ascontiguousarray(samples.T)), rate


def _as_float_samples(samples, name) -> torch.Tensor:
    """Samples as a float tensor; integer PCM scaled to [-1, 1)."""
    if isinstance(samples, (list, tuple)):
        try:
            samples = np.asarray(samples)
        except ValueError:  # ragged nested lists
            raise InputError(
                f"{name}: expected a flat list of samples or equal-length channels, got a ragged list"
            ) from None
    if isinstance(samples, np.ndarray):
        if samples.dtype.kind not in "fiub":
            raise InputError(f"{name}: expected numeric samples, got an array of dtype {samples.dtype}")
        samples = torch.from_numpy(np.ascontiguousarray(samples))
    if not isinstance(samples, torch.Tensor):
        raise InputError(
            f"{name}: expected a file path, array, tensor or (array, sampling_rate), got {describe(samples)}"
        )
    if samples.dtype == torch.bool or samples.is_complex():
        raise InputError(f"{name}: expected real-valued samples, got {describe(samples)}")
    if samples.is_floating_point():
        return samples.float() if samples.dtype != torch.float64 else samples.to(torch.float32)
    if samples.dtype == torch.uint8:  # 8-bit PCM is unsigned, centred on 128
        return (samples.float() - 128.0) / 128.0
    bits = torch.iinfo(samples.dtype).bits
    return samples.double().div(2.0 ** (bits - 1)).float()


def _to_mono(samples: torch.Tensor, name: str) -> torch.Tensor:
    """Average the channels; the channel axis is the short one of a 2-D input (at most 2 channels)."""
    if samples.ndim == 1:
        return samples
    if samples.ndim != 2:
        raise InputError(f"{name}: expected [samples] or [channels, samples] audio, got {describe(samples)}")
    channels_first = samples.shape[0] <= samples.shape[1]
    channels = min(samples.shape)
    if channels > 2:
        raise InputError(
            f"{name}: audio with {channels} channels is not supported (mono or stereo expected), "
            f"got {describe(samples)}"
        )
    return samples.mean(dim=0 if channels_first else 1)


def _check_samples(mono: torch.Tensor, name: str) -> None:
    if mono.numel() == 0:
        raise InputError(f"{name}: the audio is empty (0 samples)")
    if not bool(torch.isfinite(mono).all()):
        bad = int((~torch.isfinite(mono)).sum())
        raise InputError(f"{name}: the audio has {bad} NaN or infinite samples")


def positive_rate(value, name: str, what: str = "sampling_rate", unit: str = "samples per second") -> float:
    """`value` as a float rate; else an InputError naming `name` and `what`.

    Any real number type is taken: numpy scalars (np.int64, np.float32 ...) are what pandas, datasets columns
    and numpy arithmetic hand back. Bools are refused although Python counts them as numbers.
    """
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real) or not 0 < float(value) < math.inf:
        raise InputError(f"{name}: {what} must be a positive number of {unit} (finite, not a bool), "
                         f"got {describe(value)}")
    return float(value)


def resample(mono: torch.Tensor, rate, target_rate: int = SAMPLING_RATE, name: str = "audio") -> torch.Tensor:
    """Resample a 1-D waveform with soxr (its high-quality preset, as librosa's default uses); `rate` None means
    the waveform is at `target_rate` already. `name` says which audio in error messages."""
    if rate is None:
        return mono.contiguous()
    rate = positive_rate(rate, name)
    if rate == target_rate:
        return mono.contiguous()
    out = soxr.resample(mono.detach().cpu().numpy(), rate, float(target_rate), quality="HQ")
    return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32)).to(mono.device)


# ---------------------------------------------------------------------------------------------------------------
# Log-mel features

# Slaney's mel scale: linear (3 mel per 200 Hz) below 1 kHz, logarithmic (27 mel per factor 6.4) above.
_HZ_PER_MEL = 200.0 / 3.0
_KNEE_HZ = 1000.0
_KNEE_MEL = _KNEE_HZ / _HZ_PER_MEL
_MEL_PER_LOG_HZ = 27.0 / math.log(6.4)


def hz_to_mel(hz: np.ndarray) -> np.ndarray:
    hz = np.asarray(hz, dtype=np.float64)
    above = _KNEE_MEL + np.log(np.maximum(hz, _KNEE_HZ) / _KNEE_HZ) * _MEL_PER_LOG_HZ
    return np.where(hz >= _KNEE_HZ, above, hz / _HZ_PER_MEL)


def mel_to_hz(mel: np.ndarray) -> np.ndarray:
    mel = np.asarray(mel, dtype=np.float64)
    above = _KNEE_HZ * np.exp((np.maximum(mel, _KNEE_MEL) - _KNEE_MEL) / _MEL_PER_LOG_HZ)
    return np.where(mel >= _KNEE_MEL, above, mel * _HZ_PER_MEL)


@functools.lru_cache(maxsize=8)
def mel_filter_bank(n_mels: int = 128, n_fft: int = 400, sampling_rate: int = SAMPLING_RATE, f_max: float = 8000.0):
    """Triangular Slaney-normalised filters, `[n_fft // 2 + 1, n_mels]` float64 (read-only, cached).

    Filter m rises from edge m to edge m+1 and falls to edge m+2, the edges evenly spaced in mel between 0 Hz
    and `f_max`; each is scaled by 2 / (its width in Hz) so every band carries about the same energy.
    """
    bins_hz = np.linspace(0.0, sampling_rate // 2, n_fft // 2 + 1)
    edges_hz = mel_to_hz(np.linspace(hz_to_mel(0.0), hz_to_mel(f_max), n_mels + 2))
    left, centre, right = edges_hz[:-2], edges_hz[1:-1], edges_hz[2:]
    rising = (bins_hz[:, None] - left) / (centre - left)
    falling = (right - bins_hz[:, None]) / (right - centre)
    weights = np.clip(np.minimum(rising, falling), 0.0, None) * (2.0 / (right - left))
    weights.setflags(write=False)
    return weights


def _padded_batch(waveforms: Sequence[torch.Tensor], settings: MelSettings, device) -> torch.Tensor:
    longest = max(w.numel() for w in waveforms)
    batch_BL = torch.full((len(waveforms), longest), settings.padding_value, dtype=torch.float32, device=device)
    for row, wave in zip(batch_BL, waveforms):
        row[: wave.numel()] = wave.to(device=device, dtype=torch.float32)
    return batch_BL


def log_mel_features(
    waveforms: Sequence[torch.Tensor], settings: MelSettings = MelSettings(), device=None,
    names: Sequence[str] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-mel features of a batch of mono 16 kHz waveforms, padded to the longest.

    Returns `features [B, n_mels, frames]` (float32) and `mask [B, frames]` (int32, 1 on each clip's own
    frames), with `frames = longest // hop_length`. Runs on `device` (default: the first waveform's device).
    `names` (one per waveform) say which input a bad waveform came from; by default "audio <index>".
    """
    if len(waveforms) == 0:
        raise InputError("waveforms: expected at least one waveform, got none")
    names = list(names) if names is not None else [f"audio {i}" for i in range(len(waveforms))]
    for wave, name in zip(waveforms, names, strict=True):
        # Refused even in a batch, where the reference pads it to a longer clip: on its own the STFT cannot take
        # it, so whether it worked would depend on the rest of the batch.
        if wave.ndim != 1 or wave.numel() < settings.min_samples:
            raise InputError(
                f"{name}: expected a mono waveform of at least {settings.min_samples} samples "
                f"({1000 * settings.min_samples / settings.sampling_rate:.1f} ms), got {describe(wave)}"
            )
    device = torch.device(device) if device is not None else waveforms[0].device
    batch_BL = _padded_batch(waveforms, settings, device)
    window = torch.hann_window(settings.n_fft, device=device)
    spec = torch.stft(batch_BL, settings.n_fft, settings.hop_length, window=window, return_complex=True)
    # The STFT has one frame more than full hops fit; the reference drops it (frames = samples // hop).
    power_BFT = spec[..., :-1].abs().pow(2)
    filters_MF = torch.from_numpy(mel_filter_bank(settings.n_mels, settings.n_fft, settings.sampling_rate,
                                                  settings.f_max).T.copy()).to(device, torch.float32)
    log_BMT = (filters_MF @ power_BFT).clamp(min=1e-10).log10()
    peak_B11 = log_BMT.amax(dim=(1, 2), keepdim=True)
    features = (torch.maximum(log_BMT, peak_B11 - 8.0) + 4.0) / 4.0
    return features, _frame_mask(waveforms, features.shape[-1], settings.hop_length, device)


def _frame_mask(waveforms, frames: int, hop: int, device) -> torch.Tensor:
    # A frame belongs to a clip when its hop starts inside the clip: ceil(samples / hop) frames, at most `frames`.
    lengths = torch.tensor([-(-w.numel() // hop) for w in waveforms], device=device)
    return (torch.arange(frames, device=device)[None, :] < lengths[:, None]).to(torch.int32)
