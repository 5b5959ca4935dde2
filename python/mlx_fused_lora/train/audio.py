"""Audio in and out: PCM WAV with the standard library, resampling, Mimi codes.

- `read_wav`: mono float32 in [-1, 1] from 8/16/24/32-bit PCM WAV (channels averaged).
- `resample`: band-limited resampling by FFT (the spectrum is cut or zero-padded to the
  new rate and inverse-transformed), so downsampling does not alias. It treats the clip as
  periodic, which can ring a little at the edges; irrelevant for speech clips that start
  and end near silence.
- `load_codes`: pre-encoded Mimi codes ``[codebooks, frames]`` from ``.npy`` or
  ``.safetensors`` (key ``codes``, or the file's only tensor).
- `MimiCodec`: mlx-audio's Mimi (optional extra ``[audio]``) with local weights.
"""

from __future__ import annotations

import wave
from pathlib import Path
from typing import Union

import numpy as np

__all__ = [
    "SAMPLE_RATE",
    "FRAME_RATE",
    "read_wav",
    "write_wav",
    "resample",
    "load_codes",
    "MimiCodec",
    "AUDIO_SUFFIXES",
    "CODE_SUFFIXES",
]

SAMPLE_RATE = 24_000  # Mimi's rate
FRAME_RATE = 12.5  # Mimi frames per second (1920 samples each)
AUDIO_SUFFIXES = (".wav",)
CODE_SUFFIXES = (".npy", ".safetensors")


def read_wav(path: Union[str, Path]) -> tuple[np.ndarray, int]:
    """``(samples [n] float32 mono, sample_rate)``; raises ValueError on a non-PCM file."""
    with wave.open(str(path), "rb") as f:
        channels, width, rate, n = f.getnchannels(), f.getsampwidth(), f.getframerate(), f.getnframes()
        raw = f.readframes(n)
    if width == 1:  # 8-bit WAV is unsigned
        data = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128.0) / 128.0
    elif width == 2:
        data = np.frombuffer(raw, "<i2").astype(np.float32) / 32768.0
    elif width == 3:
        b = np.frombuffer(raw, np.uint8).reshape(-1, 3).astype(np.int32)
        v = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        v = np.where(v >= 1 << 23, v - (1 << 24), v)
        data = v.astype(np.float32) / float(1 << 23)
    elif width == 4:
        data = np.frombuffer(raw, "<i4").astype(np.float32) / float(1 << 31)
    else:
        raise ValueError(f"{path}: unsupported sample width {width} bytes")
    data = data[: (len(data) // channels) * channels].reshape(-1, channels).mean(axis=1)
    return data.astype(np.float32), rate


def write_wav(path: Union[str, Path], samples: np.ndarray, rate: int = SAMPLE_RATE) -> Path:
    """16-bit PCM mono WAV."""
    pcm = (np.clip(np.asarray(samples, np.float32).reshape(-1), -1.0, 1.0) * 32767.0).astype("<i2")
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(int(rate))
        f.writeframes(pcm.tobytes())
    return Path(path)


def resample(samples: np.ndarray, rate: int, target: int = SAMPLE_RATE) -> np.ndarray:
    """Band-limited FFT resampling of mono ``samples`` from ``rate`` to ``target`` Hz."""
    if rate == target or len(samples) == 0:
        return samples.astype(np.float32)
    n_out = int(round(len(samples) * target / rate))
    spectrum = np.fft.rfft(samples.astype(np.float64))
    n_bins = n_out // 2 + 1
    out_spec = np.zeros(n_bins, dtype=np.complex128)
    keep = min(len(spectrum), n_bins)
    out_spec[:keep] = spectrum[:keep]
    out = np.fft.irfft(out_spec, n=n_out) * (n_out / len(samples))
    return out.astype(np.float32)


def load_codes(path: Union[str, Path]) -> np.ndarray:
    """Mimi codes ``[codebooks, frames]`` as int32 from ``.npy`` or ``.safetensors``."""
    path = Path(path)
    if path.suffix == ".npy":
        codes = np.load(path, allow_pickle=False)
    elif path.suffix == ".safetensors":
        import mlx.core as mx

        tensors = mx.load(str(path))
        if "codes" in tensors:
            codes = tensors["codes"]
        elif len(tensors) == 1:
            codes = next(iter(tensors.values()))
        else:
            raise ValueError(f"{path}: expected a 'codes' tensor, found {sorted(tensors)}")
        codes = np.array(codes)
    else:
        raise ValueError(f"{path}: codes must be .npy or .safetensors")
    if codes.ndim == 3 and codes.shape[0] == 1:
        codes = codes[0]
    if codes.ndim != 2:
        raise ValueError(f"{path}: codes must be [codebooks, frames], got shape {codes.shape}")
    if not np.issubdtype(codes.dtype, np.integer):
        raise ValueError(f"{path}: codes must be integers, got {codes.dtype}")
    return codes.astype(np.int32)


class MimiCodec:
    """Mimi through mlx-audio: 24 kHz mono audio <-> codes ``[codebooks, frames]``.

    ``weights``: a local Mimi weights file (``.safetensors``, as in ``kyutai/moshiko``'s
    ``tokenizer-e351c8d8-checkpoint125.safetensors`` or mlx-audio's conversion) or a
    directory holding one. Needs the optional extra: ``pip install 'mlx-fused-lora[audio]'``.
    """

    def __init__(self, weights: Union[str, Path], num_codebooks: int = 32):
        try:
            from mlx_audio.codec.models.mimi import Mimi, mimi_202407
        except ImportError as e:
            raise ImportError(
                "encoding WAV audio needs mlx-audio's Mimi: pip install 'mlx-fused-lora[audio]' "
                f"(or pass pre-encoded codes as .npy/.safetensors) [{e}]"
            ) from None
        path = Path(weights)
        if path.is_dir():
            files = sorted(path.glob("*.safetensors"))
            if not files:
                raise FileNotFoundError(f"no .safetensors Mimi weights in {path}")
            path = files[0]
        if not path.is_file():
            raise FileNotFoundError(f"Mimi weights {path} not found (--codec-path)")
        self.model = Mimi(mimi_202407(num_codebooks))
        self.model.load_pytorch_weights(str(path), strict=True)
        self.num_codebooks = num_codebooks

    def encode(self, samples: np.ndarray) -> np.ndarray:
        import mlx.core as mx

        x = mx.array(samples, dtype=mx.float32)[None, None, :]
        codes = self.model.encode(x)  # [1, codebooks, frames]
        return np.array(codes[0]).astype(np.int32)

    def decode(self, codes: np.ndarray) -> np.ndarray:
        import mlx.core as mx

        pcm = self.model.decode(mx.array(codes, dtype=mx.int32)[None])
        return np.array(pcm).reshape(-1).astype(np.float32)
