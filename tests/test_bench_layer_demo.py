"""`mlx-fused-lora layer-demo`: its table, the BLAS it names, and the mark on a result it cannot trust."""

from mlx_fused_lora.bench import layer_demo

TINY = ["--tokens", "32", "--dims", "64", "--rank", "4", "--rounds", "1"]


def test_prints_both_passes_the_blas_and_the_agreement(capsys):
    assert layer_demo.main(TINY) == 0
    out = capsys.readouterr().out
    assert "BLAS: fused and limit" in out and "plain (MLX's matmul)" in out
    assert "max |fused - plain| at dropout 0" in out
    lines = [line for line in out.splitlines() if line.startswith(("forward ", "forward_backward"))]
    assert len(lines) == 2 and all(line.count("ms") == 3 for line in lines)


def test_a_result_below_the_limit_is_marked_untrusted(capsys, monkeypatch):
    def fake_measure(fns, budget_s, max_rounds, min_rounds):
        times = {"fused": 0.9, "plain": 2.0, "limit": 1.0}  # fused under the GEMMs it runs: load, not speed
        return {k: dict(time_s=times[k], times_s=[times[k]], peak_memory=2**20) for k in fns}

    monkeypatch.setattr(layer_demo, "measure_interleaved", fake_measure)
    assert layer_demo.main(TINY) == 0
    out = capsys.readouterr().out
    assert "0.900x?" in out
    assert out.count("untrusted (fused below the limit)") == 2


def test_help_shows_each_default_once(capsys):
    try:
        layer_demo.main(["--help"])
    except SystemExit as stop:
        assert stop.code == 0
    text = capsys.readouterr().out
    assert text.count("(default: 512)") == 1 and text.count("(default: 0.1)") == 1
