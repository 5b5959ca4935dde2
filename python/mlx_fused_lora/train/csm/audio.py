"""Audio in and out: PCM WAV with the standard library, resampling, Mimi codes.

- `read_wav`: mono float32 in [-1, 1] from 8/16/24/32-bit PCM WAV (channels averaged).
- `resample`: band-limited resampling by FFT (the spectrum is cut or zero-padded to the
  new rate and inverse-transformed), so downsampling does not alias. It treats the clip as
  periodic, which can ring a little at the edges; irrelevant for speech clips that start
  and end near silence.
- `load_codes`: pre-encoded Mimi codes ``[codebooks, frames]`` from ``.npy`` or
  ``.safetensors`` (key ``codes``, or the file's only tensor).
- `MimiCodec`: mlx-audio's Mimi (optional extra ``[audio]``) from one local weights file;
  `save_mimi` writes one (with its config in the file's metadata) for a custom or tiny Mimi.

Only `MimiCodec` imports mlx-audio, and only its Mimi modules, which import neither
``sounddevice`` (PortAudio) nor ``transformers``.
"""

from __future__ import annotations

import json
import logging
import struct
import wave
from pathlib import Path

import numpy as np

__all__ = [
    "SAMPLE_RATE",
    "FRAME_RATE",
    "read_wav",
    "write_wav",
    "resample",
    "load_codes",
    "CodeRangeError",
    "MimiCodec",
    "save_mimi",
    "read_safetensors_header",
    "AUDIO_SUFFIXES",
    "CODE_SUFFIXES",
]

SAMPLE_RATE = 24_000  # Mimi's rate
FRAME_RATE = 12.5  # Mimi frames per second (1920 samples each)
AUDIO_SUFFIXES = (".wav",)
CODE_SUFFIXES = (".npy", ".safetensors")
MIMI_CONFIG_KEY = "mimi_config"  # safetensors metadata: a non-standard Mimi's MimiConfig as JSON

log = logging.getLogger(__name__)


def read_wav(path: str | Path) -> tuple[np.ndarray, int]:
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


def write_wav(path: str | Path, samples: np.ndarray, rate: int = SAMPLE_RATE) -> Path:
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


class CodeRangeError(ValueError):
    """Codes outside the range they must be in (checked before any cast)."""

    def __init__(self, path, low: int, high: int, limit: int):
        self.path, self.low, self.high, self.limit = Path(path), low, high, limit
        super().__init__(f"{path}: codes span [{low}, {high}], outside [0, {limit})")


def load_codes(path: str | Path, vocab_size: int | None = None) -> np.ndarray:
    """Mimi codes ``[codebooks, frames]`` as int32 from ``.npy`` or ``.safetensors``.

    The range is checked on the stored integers, before the cast: every code must be in
    ``[0, vocab_size)`` (``[0, 2**31)`` when no vocabulary is given), else
    `CodeRangeError` (an int64 code of 2**32 + 5 is refused, never wrapped to 5).
    """
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
    if codes.size:
        low, high = int(codes.min()), int(codes.max())
        limit = int(vocab_size) if vocab_size is not None else 2**31
        if low < 0 or high >= limit:
            raise CodeRangeError(path, low, high, limit)
    return codes.astype(np.int32)


def read_safetensors_header(path: str | Path) -> dict:
    """The JSON header of a ``.safetensors`` file (tensor names, shapes, ``__metadata__``)
    without reading any tensor: a 385 MB Mimi checkpoint is inspected for free."""
    with open(path, "rb") as f:
        head = f.read(8)
        size = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
        if not 2 <= size <= 100_000_000:
            raise ValueError(f"{path}: not a .safetensors file")
        return json.loads(f.read(size))


def find_mimi_weights(path: str | Path) -> Path:
    """``path`` itself, or the Mimi weights in directory ``path``: its only ``.safetensors``
    file, else the one whose name has ``tokenizer`` or ``mimi`` in it (kyutai's
    ``moshiko`` repositories hold the Moshi LM's ``model.safetensors`` beside Mimi's
    ``tokenizer-e351c8d8-checkpoint125.safetensors``)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        named = [f for f in files if "tokenizer" in f.name.lower() or "mimi" in f.name.lower()]
        chosen = files if len(files) == 1 else named
        if len(chosen) != 1:
            raise FileNotFoundError(
                f"cannot tell which .safetensors in {path} holds Mimi "
                f"({[f.name for f in files] or 'none found'}): pass the file itself to --codec-path"
            )
        path = chosen[0]
    if not path.is_file():
        raise FileNotFoundError(f"Mimi weights {path} not found (--codec-path)")
    return path


def count_codebooks(names) -> int:
    """Codebooks a Mimi checkpoint holds: ``rvq_first``'s one plus ``rvq_rest``'s layers."""
    rest = {
        n.split("quantizer.rvq_rest.vq.layers.")[1].split(".")[0] for n in names if "quantizer.rvq_rest.vq.layers." in n
    }
    return 1 + len(rest)


def is_kyutai_layout(names) -> bool:
    """kyutai's PyTorch checkpoint (``encoder.model.N...``, convolutions channels-first),
    as opposed to mlx-audio's own parameter names (what `save_mimi` writes)."""
    return any(n.startswith(("encoder.model.", "decoder.model.")) for n in names)


def mimi_config(header: dict, num_codebooks: int):
    """mlx-audio's ``MimiConfig``: the file's ``mimi_config`` metadata when it has one (a
    custom or test-sized Mimi, as `save_mimi` writes), else the released Mimi's
    (``mimi_202407``), with as many codebooks as the file holds."""
    from mlx_audio.codec.models.mimi.mimi import MimiConfig, mimi_202407
    from mlx_audio.codec.models.mimi.modules import SeanetConfig, TransformerConfig

    meta = (header.get("__metadata__") or {}).get(MIMI_CONFIG_KEY)
    if meta is None:
        return mimi_202407(num_codebooks)
    d = json.loads(meta)
    d["seanet"] = SeanetConfig(**d["seanet"])
    d["transformer"] = TransformerConfig(**d["transformer"])
    d["quantizer_nq"] = num_codebooks
    return MimiConfig(**d)


def save_mimi(model, path: str | Path) -> Path:
    """Write an mlx-audio ``Mimi`` as one ``.safetensors`` file that `MimiCodec` reads back:
    its parameters under mlx-audio's names and its config in the ``mimi_config`` metadata."""
    import dataclasses

    import mlx.core as mx
    from mlx.utils import tree_flatten

    weights = dict(tree_flatten(model.parameters()))
    config = json.dumps(dataclasses.asdict(model.cfg))
    mx.save_safetensors(str(path), weights, metadata={MIMI_CONFIG_KEY: config})
    return Path(path)


def _refresh_derived_arrays(model) -> None:
    # Mimi caches arrays computed from its parameters (codebook embeddings = embedding_sum /
    # cluster_usage, expanded transposed-conv weights); recompute them after a load or cast.
    for module in model.modules():
        if hasattr(module, "update_in_place"):
            module.update_in_place()


class MimiCodec:
    """Mimi through mlx-audio: 24 kHz mono audio <-> codes ``[num_codebooks, frames]`` (12.5 frames/s).

    ``weights``: a local ``.safetensors`` file, or a directory holding it (see
    `find_mimi_weights`). Two layouts load: kyutai's PyTorch checkpoint, the one CSM uses
    (``tokenizer-e351c8d8-checkpoint125.safetensors`` from ``kyutai/moshiko-pytorch-bf16``),
    and mlx-audio's parameter names (`save_mimi`). The architecture is the released Mimi's
    unless the file's metadata carries a ``mimi_config`` (`save_mimi` writes it), which is
    how a test runs a tiny random Mimi through this same path. Nothing else is passed:

    - ``num_codebooks`` is the CSM's (32 for CSM-1B); the file must hold at least that many
      (the released Mimi holds 32). Mimi's quantizer is residual, so fewer is a coarser codec:
      the first ``num_codebooks`` codes are kept, as Moshi does with 8.
    - Weights are cast to float32 (kyutai's file is bfloat16) so encoding is exact on CPU.

    Needs the optional extra: ``pip install 'mlx-fused-lora[audio]'`` (mlx-audio).
    """

    def __init__(self, weights: str | Path, num_codebooks: int = 32):
        try:
            import mlx.core as mx
            from mlx_audio.codec.models.mimi.mimi import Mimi
        except ImportError as e:
            raise ImportError(
                "encoding WAV audio needs mlx-audio's Mimi: pip install 'mlx-fused-lora[audio]' "
                f"(or pass pre-encoded codes as .npy/.safetensors) [{e}]"
            ) from None
        path = find_mimi_weights(weights)
        header = read_safetensors_header(path)
        names = [k for k in header if k != "__metadata__"]
        if not any(n.startswith("quantizer.rvq_first.") for n in names):
            raise ValueError(f"{path} is not a Mimi checkpoint (no quantizer.rvq_first.* tensors): --codec-path")
        available = count_codebooks(names)
        if available < num_codebooks:
            raise ValueError(f"{path} holds a Mimi with {available} codebooks; the model needs {num_codebooks}")
        config = mimi_config(header, available)
        if (config.sample_rate, config.frame_rate) != (SAMPLE_RATE, FRAME_RATE):
            # the data path resamples to SAMPLE_RATE and cuts word timings at FRAME_RATE
            raise ValueError(
                f"{path}: Mimi at {config.sample_rate} Hz / {config.frame_rate} frames/s, need {SAMPLE_RATE} / {FRAME_RATE}"
            )
        model = Mimi(config)
        if is_kyutai_layout(names):
            model.load_pytorch_weights(str(path), strict=True)
        else:
            model.load_weights(str(path), strict=True)
        model.set_dtype(mx.float32)
        _refresh_derived_arrays(model)
        mx.eval(model.parameters())
        self.model = model
        self.path = path
        self.num_codebooks = num_codebooks
        self.codebook_size = config.quantizer_bins

    def encode(self, samples: np.ndarray) -> np.ndarray:
        """Codes ``[num_codebooks, ceil(len / 1920)]`` int32 of 24 kHz mono ``samples``."""
        import mlx.core as mx

        if len(samples) == 0:  # Mimi's convolutions need input; an empty clip has no frames
            return np.zeros((self.num_codebooks, 0), np.int32)
        x = mx.array(np.asarray(samples, np.float32))[None, None, :]
        codes = self.model.encode(x)[0, : self.num_codebooks]  # [codebooks, frames] uint32
        return np.array(codes).astype(np.int32)

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """24 kHz mono float32 audio of codes ``[codebooks, frames]``.

        CSM's audio vocabulary is larger than Mimi's codebooks (2051 vs 2048): a code past
        the codebook, which a sampled frame can hold, is clamped rather than read out of
        bounds, and counted in a warning.
        """
        import mlx.core as mx

        codes = np.asarray(codes)
        if codes.shape[-1] == 0:
            return np.zeros(0, np.float32)
        bad = int(((codes < 0) | (codes >= self.codebook_size)).sum())
        if bad:
            log.warning("%d of %d codes outside Mimi's codebook [0, %d); clamped", bad, codes.size, self.codebook_size)
        codes = np.clip(codes, 0, self.codebook_size - 1).astype(np.int32)
        pcm = self.model.decode(mx.array(codes)[None])  # [1, 1, samples]
        return np.array(pcm.astype(mx.float32)).reshape(-1)
