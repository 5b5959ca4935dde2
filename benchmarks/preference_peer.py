"""One run of the preference benchmark, in its own process: ours (DPO, or SFT on the same tokens) or mlx-lm-lora's (DPO, SFT).

    python benchmarks/preference_peer.py ours-dpo ARGS...        python -m mlx_fused_lora.lm_lora --train-mode dpo ARGS
    python benchmarks/preference_peer.py ours-sft ARGS...        the same run, the loss NLL on the response tokens
    python benchmarks/preference_peer.py mlx-lm-lora ARGS...     mlx-lm-lora's CLI (mlx_lm_lora.train.main)

Every run first puts MLX's own matmuls on OpenBLAS (`fast_blas.enable`, before ``mlx.core``
loads), so both packages' GEMMs run on the same BLAS; it prints which (``MLX BLAS: ...``) on
stderr.

``ours-sft`` is `PreferenceTrainer` with its loss replaced by the mean negative log-prob of
the response tokens of the same ``[2B, T]`` batch (chosen and rejected sequences alike): the
same model, batches, compiled loop and flags as ``ours-dpo``, without the reference pass and
the preference loss, which is what a DPO step adds to an SFT step on its tokens.

mlx-lm-lora (not a dependency of this package: the benchmark runs it only when installed)
reads ``mx.device_info()["max_recommended_working_set_size"]``, which MLX reports on Apple
GPUs only; on the Linux CPU every one of its trainers raises ``KeyError`` there, so this
wrapper adds the key with the value 0 (with which its ``mx.set_wired_limit`` call changes
nothing) around its entry point.
"""

import sys

from mlx_fused_lora import fast_blas

fast_blas.enable()  # before mlx.core loads: libmlx binds its cblas_* then
import mlx.core as mx  # noqa: E402


def _with_working_set_key():
    device_info = mx.device_info

    def patched():
        info = dict(device_info())
        info.setdefault("max_recommended_working_set_size", 0)
        return info

    mx.device_info = patched


def _sft_on_pairs():
    """Make the preference CLI train `PreferenceTrainer` with the NLL of the responses instead."""
    from mlx_fused_lora.train.preference import task
    from mlx_fused_lora.train.preference.logps import sequence_logps

    class SFTOnPairs(task.PreferenceTrainer):
        metric_names = ("nll",)

        def loss(self, model, tokens, response_mask, *reference):
            sums, counts = sequence_logps(model, tokens, response_mask)
            nll = -sums.sum() / counts.sum()
            return nll, (nll,)

    task.PreferenceTrainer = SFTOnPairs


def main(argv) -> int:
    kind, args = argv[0], argv[1:]
    print(f"MLX BLAS: {fast_blas.active_blas()}", file=sys.stderr, flush=True)
    if kind == "mlx-lm-lora":
        _with_working_set_key()
        from mlx_lm_lora.train import main as peer_main

        sys.argv = ["mlx_lm_lora.train", *args]
        return peer_main() or 0
    if kind not in ("ours-dpo", "ours-sft"):
        raise SystemExit(f"preference_peer.py: the first argument is ours-dpo, ours-sft or mlx-lm-lora, got {kind!r}")
    if kind == "ours-sft":
        _sft_on_pairs()
    from mlx_fused_lora import lm_lora

    return lm_lora.main(["--train-mode", "dpo", *args])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
