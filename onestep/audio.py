"""Synthetic sounds as log-mel spectrograms: the data, the features and the vocoder of the ``sounds`` teacher.

Everything here is written with torch and numpy only (no torchaudio, no librosa):

- six sound classes (:data:`CLASS_NAMES`): a low tone, a high tone, a rising and a falling chirp, a
  noise burst and a two-tone beep, each drawn with random onset, length, pitch and amplitude
  (:func:`synth_sound`); :func:`sounds_dataset` gives a deterministic set from a seed;
- a log-mel spectrogram (:func:`mel_spectrogram`): ``torch.stft`` magnitude (Hann window of
  :data:`N_FFT` samples, hop :data:`HOP`), a triangular HTK mel filterbank (:func:`mel_filterbank`) of
  :data:`N_MELS` bands, ``log10`` floored at :data:`LOG_FLOOR` and mapped to [-1, 1]; one sound of
  :data:`NUM_SAMPLES` samples gives an image ``(1, N_MELS, FRAMES)`` = ``(1, 32, 16)`` (low frequencies
  in row 0);
- the toy's vocoder (:func:`mel_to_waveform`): the filterbank's pseudo-inverse (clamped at 0) and
  Griffin-Lim phase recovery with ``torch.stft`` / ``torch.istft``;
- 16-bit PCM WAV files with the standard library's :mod:`wave` (:func:`write_wav`, :func:`read_wav`).
"""

from __future__ import annotations

import wave
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

SAMPLE_RATE = 8000
N_FFT = 512
HOP = 256
N_MELS = 32
FRAMES = 16
NUM_SAMPLES = HOP * (FRAMES - 1)  # 3840 samples (0.48 s): centred STFT frames -> exactly FRAMES
F_MIN, F_MAX = 50.0, 4000.0
LOG_FLOOR = -2.0  # log10 magnitude floor (silence maps to -1)
LOG_CEIL = 2.5  # log10 magnitude mapped to +1 (a full-scale tone peaks near log10(128) = 2.1)
CLASS_NAMES = ("low tone", "high tone", "rising chirp", "falling chirp", "noise burst", "two-tone beep")
NUM_CLASSES = len(CLASS_NAMES)
#: what a teacher or student folder says about its audio (``onestep_teacher.json`` "audio")
AUDIO_META = dict(
    sample_rate=SAMPLE_RATE, n_fft=N_FFT, hop=HOP, n_mels=N_MELS, frames=FRAMES, num_samples=NUM_SAMPLES,
    f_min=F_MIN, f_max=F_MAX, log_floor=LOG_FLOOR, log_ceil=LOG_CEIL, mel="htk, triangles of peak 1, magnitude",
    vocoder="griffin-lim", class_names=list(CLASS_NAMES),
)
#: split -> (seed, sounds per class) of :func:`sounds_dataset`
SPLITS = {"train": (0, 400), "test": (1, 100)}


def _hz_to_mel(f):
    return 2595.0 * np.log10(1.0 + np.asarray(f, dtype=np.float64) / 700.0)


def _mel_to_hz(m):
    return 700.0 * (10.0 ** (np.asarray(m, dtype=np.float64) / 2595.0) - 1.0)


@lru_cache(maxsize=4)
def _filterbank(n_mels: int, n_fft: int, sample_rate: int, f_min: float, f_max: float) -> torch.Tensor:
    freqs = np.linspace(0, sample_rate / 2, n_fft // 2 + 1)
    edges = _mel_to_hz(np.linspace(_hz_to_mel(f_min), _hz_to_mel(f_max), n_mels + 2))
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    fb = np.maximum(0.0, np.minimum((freqs - lo) / (mid - lo), (hi - freqs) / (hi - mid)))
    return torch.from_numpy(fb.astype(np.float32))


def mel_filterbank(n_mels: int = N_MELS, n_fft: int = N_FFT, sample_rate: int = SAMPLE_RATE, f_min: float = F_MIN, f_max: float = F_MAX) -> torch.Tensor:
    """Triangular HTK mel filters of peak 1, ``(n_mels, n_fft // 2 + 1)``; band ``i`` is centred on :func:`mel_centers` ``[i]``."""
    return _filterbank(n_mels, n_fft, sample_rate, float(f_min), float(f_max)).clone()


def mel_centers(n_mels: int = N_MELS, f_min: float = F_MIN, f_max: float = F_MAX) -> np.ndarray:
    """Centre frequency in Hz of each mel band."""
    return _mel_to_hz(np.linspace(_hz_to_mel(f_min), _hz_to_mel(f_max), n_mels + 2))[1:-1]


def _window() -> torch.Tensor:
    return torch.hann_window(N_FFT, dtype=torch.float32)


def stft_magnitude(waves: torch.Tensor) -> torch.Tensor:
    """``|STFT|`` of waveforms ``(N, L)``: ``(N, N_FFT // 2 + 1, frames)`` (centred, reflect-padded)."""
    return torch.stft(waves.float(), N_FFT, HOP, window=_window(), center=True, return_complex=True).abs()


def mel_spectrogram(waves: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Normalised log-mel spectrograms of waveforms ``(N, NUM_SAMPLES)`` (or one ``(NUM_SAMPLES,)``).

    Returns ``(N, 1, N_MELS, FRAMES)`` in [-1, 1]: ``log10`` of the mel magnitudes, clamped to
    ``[LOG_FLOOR, LOG_CEIL]`` and mapped linearly to [-1, 1] (silence is -1).
    """
    w = torch.as_tensor(np.asarray(waves, dtype=np.float32) if isinstance(waves, np.ndarray) else waves).float()
    if w.ndim == 1:
        w = w[None]
    if w.ndim != 2 or w.shape[-1] != NUM_SAMPLES:
        raise ValueError(f"mel_spectrogram takes waveforms of shape (N, {NUM_SAMPLES}), got {tuple(w.shape)}")
    mel = torch.einsum("mf,nft->nmt", mel_filterbank(), stft_magnitude(w))
    logm = torch.log10(mel.clamp_min(10.0**LOG_FLOOR))
    return ((logm - LOG_FLOOR) / (LOG_CEIL - LOG_FLOOR) * 2 - 1).clamp(-1, 1).unsqueeze(1)


def mel_to_magnitude(mels: torch.Tensor, nnls_iter: int = 100) -> torch.Tensor:
    """Undo the normalisation and the filterbank: ``(N, 1, N_MELS, FRAMES)`` in [-1, 1] -> linear ``|STFT|``
    ``(N, N_FFT // 2 + 1, FRAMES)``: the filterbank's pseudo-inverse clamped at 0, refined by ``nnls_iter``
    non-negative least-squares updates. Floor-level bands (at or below -1) count as silence."""
    m = mels.detach().float().cpu().clamp(-1, 1)
    if m.ndim == 3:
        m = m[None]
    if m.shape[1:] != (1, N_MELS, FRAMES):
        raise ValueError(f"mel spectrograms must be (N, 1, {N_MELS}, {FRAMES}), got {tuple(m.shape)}")
    mel_mag = 10.0 ** ((m[:, 0] + 1) / 2 * (LOG_CEIL - LOG_FLOOR) + LOG_FLOOR)
    mel_mag = torch.where(m[:, 0] <= -0.999, torch.zeros_like(mel_mag), mel_mag)
    fb = mel_filterbank()  # (mels, freqs)
    mag = torch.einsum("fm,nmt->nft", torch.linalg.pinv(fb), mel_mag).clamp_min(0.0)
    # Non-negative least squares by multiplicative updates (Lee & Seung) from the clamped pseudo-inverse:
    # the clamp leaves ripples across the whole spectrum; the updates shrink them (zeros stay zero).
    gram, rhs = fb.T @ fb, torch.einsum("mf,nmt->nft", fb, mel_mag)
    for _ in range(nnls_iter):
        mag = mag * rhs / (torch.einsum("fg,ngt->nft", gram, mag) + 1e-8)
    return mag


def griffin_lim(magnitude: torch.Tensor, n_iter: int = 32, momentum: float = 0.99, seed: int = 0) -> torch.Tensor:
    """Waveforms ``(N, NUM_SAMPLES)`` whose ``|STFT|`` approximates ``magnitude`` ``(N, freqs, frames)``
    (fast Griffin-Lim, Perraudin et al. 2013, with a seeded random initial phase)."""
    g = torch.Generator().manual_seed(seed)
    angles = torch.exp(2j * torch.pi * torch.rand(magnitude.shape, generator=g))
    prev = torch.zeros_like(angles)
    win = _window()
    for _ in range(n_iter):
        w = torch.istft(magnitude * angles, N_FFT, HOP, window=win, center=True, length=NUM_SAMPLES)
        rebuilt = torch.stft(w, N_FFT, HOP, window=win, center=True, return_complex=True)
        angles = rebuilt - (momentum / (1 + momentum)) * prev
        prev = rebuilt
        angles = angles / angles.abs().clamp_min(1e-8)
    return torch.istft(magnitude * angles, N_FFT, HOP, window=win, center=True, length=NUM_SAMPLES)


def mel_to_waveform(mels: torch.Tensor, n_iter: int = 32, seed: int = 0) -> torch.Tensor:
    """The toy vocoder: normalised log-mels ``(N, 1, N_MELS, FRAMES)`` -> waveforms ``(N, NUM_SAMPLES)``."""
    return griffin_lim(mel_to_magnitude(mels), n_iter=n_iter, seed=seed)


# -- the synthetic sounds ------------------------------------------------------------------------------


def _envelope(n: int, start: int, length: int, fade: int = 40) -> np.ndarray:
    env = np.zeros(n)
    end = min(n, start + length)
    ramp = np.ones(end - start)
    f = min(fade, len(ramp) // 2)
    if f > 0:
        ramp[:f] = np.linspace(0, 1, f)
        ramp[-f:] = np.linspace(1, 0, f)
    env[start:end] = ramp
    return env


def _sweep(f0: float, f1: float, length: int, rng: np.random.Generator) -> np.ndarray:
    """An exponential sweep from ``f0`` to ``f1`` Hz over ``length`` samples, random start phase."""
    f = f0 * (f1 / f0) ** (np.arange(length) / max(1, length - 1))
    return np.sin(rng.uniform(0, 2 * np.pi) + 2 * np.pi * np.cumsum(f) / SAMPLE_RATE)


def synth_sound(label: int, rng: np.random.Generator) -> np.ndarray:
    """One sound of class ``label`` (see :data:`CLASS_NAMES`), float32 ``(NUM_SAMPLES,)`` in [-1, 1].

    Per sound: onset 0..80 ms, amplitude 0.3..1.0, and per class a pitch range (tones 250-450 Hz and
    1400-2000 Hz; chirps between those ranges, exponential sweeps; beeps two 100 ms pulses a fifth apart
    starting at 600-800 Hz; the noise burst is white noise of 80-200 ms)."""
    if not 0 <= int(label) < NUM_CLASSES:
        raise ValueError(f"sound class must lie in [0, {NUM_CLASSES - 1}], got {label}")
    n, sr = NUM_SAMPLES, SAMPLE_RATE
    amp = rng.uniform(0.3, 1.0)
    onset = int(rng.uniform(0.0, 0.08) * sr)
    x = np.zeros(n)
    label = int(label)
    if label in (0, 1, 2, 3):
        length = min(n - onset, int(rng.uniform(0.25, 0.38) * sr))
        low, high = rng.uniform(250, 450), rng.uniform(1400, 2000)
        f0, f1 = {0: (low, low), 1: (high, high), 2: (low, high), 3: (high, low)}[label]
        x[onset : onset + length] = _sweep(f0, f1, length, rng)
        x *= _envelope(n, onset, length)
    elif label == 4:
        length = int(rng.uniform(0.08, 0.2) * sr)
        x[onset : onset + length] = rng.uniform(-1, 1, length)
        x *= _envelope(n, onset, length, fade=16)
    else:
        f0, pulse, gap = rng.uniform(600, 800), int(0.1 * sr), int(rng.uniform(0.03, 0.06) * sr)
        second = onset + pulse + gap
        x[onset : onset + pulse] = _sweep(f0, f0, pulse, rng)
        x[second : second + pulse] = _sweep(1.5 * f0, 1.5 * f0, pulse, rng)
        x *= _envelope(n, onset, pulse) + _envelope(n, second, pulse)
    return (amp * x).astype(np.float32)


def sounds_waveforms(per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``per_class`` sounds of each class, deterministic in ``seed``: ``(waves (N, NUM_SAMPLES), labels (N,))``
    with ``labels[i] = i % NUM_CLASSES``."""
    rng = np.random.default_rng(seed)
    labels = np.arange(per_class * NUM_CLASSES) % NUM_CLASSES
    waves = np.stack([synth_sound(int(c), rng) for c in labels])
    return torch.from_numpy(waves), torch.from_numpy(labels.astype(np.int64))


@lru_cache(maxsize=4)
def _dataset(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, not {split!r}")
    seed, per_class = SPLITS[split]
    waves, labels = sounds_waveforms(per_class, seed)
    return mel_spectrogram(waves), labels


def sounds_dataset(split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """The ``sounds`` data as ``(mels (N, 1, N_MELS, FRAMES) in [-1, 1], labels (N,))``: ``"train"`` (seed 0,
    400 a class: the teacher's and the students' data) or ``"test"`` (seed 1, 100 a class: held out for scoring)."""
    x, y = _dataset(split)
    return x.clone(), y.clone()


# -- WAV files -----------------------------------------------------------------------------------------


def write_wav(path: str | Path, waveform: torch.Tensor | np.ndarray, sample_rate: int = SAMPLE_RATE, normalize: bool = True) -> Path:
    """Write a mono 16-bit PCM WAV. With ``normalize`` the peak is scaled to 0.9 (silence stays silent);
    otherwise samples are clipped to [-1, 1]."""
    x = np.asarray(waveform.detach().cpu() if isinstance(waveform, torch.Tensor) else waveform, dtype=np.float64).reshape(-1)
    peak = np.abs(x).max() if x.size else 0.0
    if normalize and peak > 1e-8:
        x = 0.9 * x / peak
    pcm = np.round(np.clip(x, -1, 1) * 32767).astype("<i2")
    path = Path(path)
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(int(sample_rate))
        f.writeframes(pcm.tobytes())
    return path


def read_wav(path: str | Path) -> tuple[np.ndarray, int]:
    """A mono 16-bit PCM WAV as ``(float32 samples in [-1, 1], sample rate)``."""
    with wave.open(str(path), "rb") as f:
        if f.getsampwidth() != 2 or f.getnchannels() != 1:
            raise ValueError(f"{path}: expected mono 16-bit PCM")
        rate, data = f.getframerate(), f.readframes(f.getnframes())
    return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32767.0, rate


def dominant_frequency(waveform: torch.Tensor | np.ndarray, sample_rate: int = SAMPLE_RATE) -> float:
    """The frequency in Hz of the largest peak of a waveform's spectrum (Hann-windowed)."""
    x = np.asarray(waveform, dtype=np.float64).reshape(-1)
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.fft.rfftfreq(len(x), 1 / sample_rate)[int(spec.argmax())])


def spectral_centroid(waveform: torch.Tensor | np.ndarray, sample_rate: int = SAMPLE_RATE) -> float:
    """The power-weighted mean frequency in Hz of a waveform's spectrum."""
    x = np.asarray(waveform, dtype=np.float64).reshape(-1)
    p = np.abs(np.fft.rfft(x)) ** 2
    return float((np.fft.rfftfreq(len(x), 1 / sample_rate) * p).sum() / max(p.sum(), 1e-20))


def audio_meta_of(meta: dict) -> dict | None:
    """The audio settings in a teacher's or a student's metadata: its own ``"audio"`` object, or, for a
    student of the built-in ``sounds`` teacher (student folders do not copy the teacher's metadata), the
    built-in :data:`AUDIO_META`; None when the model is not an audio model."""
    if isinstance(meta.get("audio"), dict):
        return meta["audio"]
    teacher = meta.get("teacher")
    if isinstance(teacher, dict) and teacher.get("name") == "sounds":
        return dict(AUDIO_META)
    return None


def waveforms_of(samples: torch.Tensor, audio: dict | None = None, vae=None, n_iter: int = 32) -> tuple[torch.Tensor, int]:
    """The sounds ``(N, num_samples)`` of a model's samples and their sample rate.

    A model with a vocoder (an AudioLDM teacher or student: ``vae`` is its
    :class:`~onestep.teachers.audioldm.MelVAE`, ``samples`` the spectrogram pictures it decodes to) goes
    through it; otherwise ``samples`` are the built-in teacher's mel spectrograms ``(N, 1, N_MELS, FRAMES)``
    and the toy vocoder (Griffin-Lim, ``n_iter`` iterations) runs, whose settings ``audio`` (a model's,
    :func:`audio_meta_of`) must match."""
    from .errors import OnestepError

    if vae is not None and hasattr(vae, "waveform"):
        return vae.waveform(samples), vae.sample_rate
    if audio is not None:
        if "vocoder" in audio and audio["vocoder"] != AUDIO_META["vocoder"]:
            raise OnestepError(f"this model's sounds come from its {audio['vocoder']} vocoder; load the model with it (its vae)")
        keys = ("sample_rate", "n_fft", "hop", "n_mels", "frames")
        wrong = {k: audio.get(k) for k in keys if audio.get(k) != AUDIO_META[k]}
        if wrong:
            raise OnestepError(f"audio settings {wrong} differ from the built-in vocoder's ({ {k: AUDIO_META[k] for k in keys} }); "
                               "only students of the built-in sounds teacher can be turned into WAV files")
    return mel_to_waveform(samples, n_iter=n_iter), SAMPLE_RATE


def write_sounds(mels: torch.Tensor, out: str | Path, prefix: str = "sample", n_iter: int = 32, audio: dict | None = None,
                 vae=None) -> list[Path]:
    """Turn a model's samples into sound (:func:`waveforms_of`) and write ``{prefix}_{i:05d}.wav`` into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    waves, rate = waveforms_of(mels, audio, vae, n_iter=n_iter)
    return [write_wav(out / f"{prefix}_{i:05d}.wav", w, sample_rate=rate) for i, w in enumerate(waves)]


__all__ = [
    "AUDIO_META", "CLASS_NAMES", "audio_meta_of", "FRAMES", "HOP", "N_FFT", "N_MELS", "NUM_CLASSES", "NUM_SAMPLES", "SAMPLE_RATE", "SPLITS",
    "dominant_frequency", "griffin_lim", "mel_centers", "mel_filterbank", "mel_spectrogram", "mel_to_magnitude",
    "mel_to_waveform", "read_wav", "sounds_dataset", "sounds_waveforms", "spectral_centroid", "stft_magnitude",
    "synth_sound", "waveforms_of", "write_sounds", "write_wav",
]
