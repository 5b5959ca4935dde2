"""mlx_fused_lora.fast_blas: MLX's own CPU matmuls on OpenBLAS when enabled before mlx.core.

Each check runs in a fresh interpreter: which BLAS MLX binds is fixed when mlx.core loads,
and this test process has long since loaded it.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="MLX uses Accelerate on macOS")

ENV_VAR = "MLX_FUSED_LORA_FAST_BLAS"


def run_python(source, env_value=None, **extra_env):
    """Run ``source`` in a fresh interpreter; return what its last stdout line holds as JSON."""
    env = {k: v for k, v in os.environ.items() if k != ENV_VAR}
    if env_value is not None:
        env[ENV_VAR] = env_value
    env.update(extra_env)
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(source)], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


MATMUL = """
    import json, time
    from mlx_fused_lora import fast_blas
    enabled = fast_blas.enable() if ENABLE else False
    import mlx.core as mx
    import numpy as np

    rng = np.random.default_rng(0)
    errors = {}
    for name in ("float32", "float64", "complex64"):  # cblas_sgemm, cblas_dgemm, cblas_cgemm
        dtype = getattr(np, name)
        a = rng.standard_normal((96, 80)).astype(dtype)
        b = rng.standard_normal((80, 64)).astype(dtype)
        if dtype == np.complex64:
            a = a + 1j * rng.standard_normal(a.shape).astype(np.float32)
        # mx.array() would make float64 input float32: name the dtype.
        got = mx.matmul(mx.array(a, dtype=getattr(mx, name)), mx.array(b, dtype=getattr(mx, name)), stream=mx.cpu)
        assert got.dtype == getattr(mx, name)
        got = np.array(got)
        want = a.astype(np.complex128 if dtype == np.complex64 else np.float64) @ b
        errors[name] = float(np.abs(got - want).max() / np.abs(want).max())

    x = mx.random.normal((512, 512), key=mx.random.key(1))
    mx.eval(x)
    seconds = []
    for _ in range(5):
        start = time.perf_counter()
        mx.eval(mx.matmul(x, x, stream=mx.cpu))
        seconds.append(time.perf_counter() - start)
    calls = fast_blas._library.mfl_blas_forward_calls() if enabled else 0
    print(json.dumps(dict(enabled=enabled, blas=fast_blas.active_blas(), seconds=min(seconds),
                          errors=errors, calls=calls)))
"""


def test_enabled_first_mlx_matmuls_run_on_openblas_and_match_numpy():
    # One BLAS thread, like the reference BLAS: on a shared, loaded machine a second thread
    # that gets descheduled makes each GEMM wait (seen: 512^3 from 8 ms to 40 ms).
    on, _ = run_python(MATMUL.replace("ENABLE", "True"), OPENBLAS_NUM_THREADS="1")
    off, _ = run_python(MATMUL.replace("ENABLE", "False"), OPENBLAS_NUM_THREADS="1")

    assert on["enabled"] and on["blas"].startswith("openblas (scipy-openblas32")
    assert off["blas"] == "mlx bundled reference BLAS (netlib)"
    # sgemm, dgemm and cgemm all went through the forwarder: the 3 checks and the 5 timed calls.
    assert on["calls"] >= 8, on
    for run in (on, off):
        assert run["errors"]["float32"] < 1e-5, run
        assert run["errors"]["float64"] < 1e-12, run
        assert run["errors"]["complex64"] < 1e-5, run
    # The reference BLAS does a 512^3 GEMM in ~100 ms here, one OpenBLAS thread in ~8 ms: a
    # ratio with a wide margin for a noisy shared machine, measured side by side in this test.
    assert off["seconds"] / on["seconds"] > 3, (on["seconds"], off["seconds"])


def test_enable_after_mlx_core_does_nothing_and_says_so_once():
    result, _ = run_python(
        """
        import json, warnings
        import mlx.core as mx
        from mlx_fused_lora import fast_blas
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            first, second = fast_blas.enable(), fast_blas.enable()
        print(json.dumps(dict(returned=[first, second], messages=[str(w.message) for w in caught],
                              blas=fast_blas.active_blas())))
        """
    )
    assert result["returned"] == [False, False]
    assert len(result["messages"]) == 1, result["messages"]
    message = result["messages"][0]
    assert "mlx.core was imported first" in message and ENV_VAR in message
    assert result["blas"] == "mlx bundled reference BLAS (netlib)"


def test_linalg_still_works_with_the_forwarder():
    result, _ = run_python(
        """
        import json
        from mlx_fused_lora import fast_blas
        assert fast_blas.enable()
        import mlx.core as mx
        import numpy as np

        rng = np.random.default_rng(0)
        a = rng.standard_normal((24, 24)).astype(np.float32)
        spd = a @ a.T + 24 * np.eye(24, dtype=np.float32)
        m, s = mx.array(a), mx.array(spd)
        q, r = mx.linalg.qr(m, stream=mx.cpu)
        u, sv, vt = mx.linalg.svd(m, stream=mx.cpu)
        w, _ = mx.linalg.eigh(s, stream=mx.cpu)
        checks = {
            "inv": np.abs(np.array(mx.linalg.inv(m, stream=mx.cpu)) - np.linalg.inv(a)).max(),
            "qr": np.abs(np.array(q @ r) - a).max(),
            "svd_values": np.abs(np.array(sv) - np.linalg.svd(a, compute_uv=False)).max(),
            "svd_rebuild": np.abs(np.array((u[:, :24] * sv) @ vt) - a).max(),
            "cholesky": np.abs(np.array(mx.linalg.cholesky(s, stream=mx.cpu)) - np.linalg.cholesky(spd)).max(),
            "eigh": np.abs(np.array(w) - np.linalg.eigvalsh(spd)).max(),
        }
        print(json.dumps(dict(blas=fast_blas.active_blas(), checks={k: float(v) for k, v in checks.items()})))
        """
    )
    assert result["blas"].startswith("openblas")
    for name, error in result["checks"].items():
        assert error < 1e-3, (name, error)


def test_package_import_is_lazy_and_the_env_var_enables_it():
    source = """
        import json, sys
        import mlx_fused_lora
        lazy = "mlx.core" not in sys.modules
        from mlx_fused_lora import FusedLoRALinear, fast_blas
        op = mlx_fused_lora.fused_lora_linear
        print(json.dumps(dict(lazy=lazy, names=[FusedLoRALinear.__name__, op.__name__],
                              blas=fast_blas.active_blas())))
        """
    with_var, _ = run_python(source, env_value="1")
    without, _ = run_python(source)
    assert with_var["lazy"] and without["lazy"]
    assert with_var["names"] == ["FusedLoRALinear", "fused_lora_linear"]
    assert with_var["blas"].startswith("openblas")
    assert without["blas"] == "mlx bundled reference BLAS (netlib)"


CLI = """
    import json, sys, types
    from mlx_fused_lora import cli, fast_blas

    def probe_main(argv):  # a command like the real ones: imports mlx.core when it runs
        import mlx.core as mx
        mx.eval(mx.ones((4, 4)) @ mx.ones((4, 4)))
        print(json.dumps(dict(argv=argv, blas=fast_blas.active_blas())))
        return 0

    sys.modules["probe_command"] = types.SimpleNamespace(main=probe_main)
    cli.COMMANDS["probe"] = ("probe_command", "test probe")
    sys.exit(cli.main(ARGV))
"""


@pytest.mark.parametrize(
    "argv, env_value, on",
    [
        (["probe", "x"], None, True),
        (["probe", "--no-fast-blas", "x"], None, False),
        (["--no-fast-blas", "probe", "x"], None, False),
        (["probe", "x"], "0", False),
    ],
)
def test_cli_enables_it_by_default_and_the_flag_or_env_turns_it_off(argv, env_value, on):
    result, _ = run_python(CLI.replace("ARGV", repr(argv)), env_value=env_value)
    assert result["argv"] == ["x"]  # the flag never reaches the command
    assert result["blas"].startswith("openblas") == on, result


def test_not_linux_is_a_no_op(monkeypatch):
    from mlx_fused_lora import fast_blas

    monkeypatch.setattr(sys, "platform", "darwin")
    assert fast_blas.enable() is False
    assert fast_blas.active_blas() == "accelerate (macOS)"
