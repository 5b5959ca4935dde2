"""``mlx-fused-lora bench``: the benchmark suite, as a table, a JSON file and a PNG chart.

Runs the cases of ``cases.py`` (the same ones ``pytest benchmarks/
--benchmark-only`` runs) on whatever device MLX runs on: the fused op against the
plain-MLX peers and against the limit, for each shape, dtype, dropout p and pass,
then a training step of a small Llama-style model, fused vs mlx-lm's layers.

    mlx-fused-lora bench --quick            # a few cases, under a minute on 2 CPU cores
    mlx-fused-lora bench                    # the issue's full grid
    mlx-fused-lora bench --shapes 64x128x96x8 --no-e2e   # a custom grid (MxKxNxR)
"""

import argparse
import datetime
import json
import os
import sys
import time

import mlx.core as mx
from tqdm import tqdm

from .. import fast_blas
from ..layers import plain_layer_class
from ..run_lock import file_lock
from . import e2e, peft_peer, results, timing
from . import grid as grids
from .cases import limit_path, make_inputs
from .machine import blas_report, load_average


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="mlx-fused-lora bench",
        description="The fused LoRA op against plain MLX and the GEMM limit: table, JSON and PNG chart.",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a few cases (512x1024x1024 r16, a tiny end-to-end model): under a minute on 2 CPU cores",
    )
    parser.add_argument(
        "--shapes",
        type=_shape_list,
        metavar="MxKxNxR[,...]",
        help="measure these shapes instead of the grid's (r defaults to 16 if left out); "
        "the end-to-end step then uses the quick grid's small model",
    )
    parser.add_argument(
        "--dtypes",
        type=_dtype_list,
        metavar="DTYPE[,...]",
        help="float32, bfloat16, float16 (default: float32 on the CPU, bfloat16,float16 on a GPU)",
    )
    parser.add_argument(
        "--dropouts",
        type=_dropout_list,
        default=grids.DROPOUTS,
        metavar="P[,...]",
        help="dropout rates (default: 0,0.1)",
    )
    parser.add_argument(
        "--passes",
        type=_pass_list,
        default=grids.PASSES,
        metavar="PASS[,...]",
        help="forward, forward_backward (default: both)",
    )
    parser.add_argument(
        "--peer-max-gflop",
        type=_non_negative,
        default=None,
        metavar="G",
        help="run the plain peers only on shapes whose base GEMM (2MKN) is at most G GFLOP; 0: everywhere "
        f"(default: 0, or {grids.CPU_PEER_MAX_GFLOP} when MLX's matmuls run on its reference BLAS, i.e. with --no-fast-blas, "
        "where the full peer grid would take hours)",
    )
    parser.add_argument(
        "--no-peft",
        action="store_true",
        help="leave out the PyTorch + PEFT peer (default: measured when torch and peft are installed)",
    )
    parser.add_argument(
        "--budget",
        type=_positive,
        default=2.0,
        metavar="SECONDS",
        help="timed seconds per case after its warm-up: a case gets the rounds that fit, at least "
        "1 (3 for fused and limit), at most --rounds (default: 2)",
    )
    parser.add_argument("--rounds", type=_positive_int, default=10, help="most timed rounds per case (default: 10)")
    parser.add_argument("--no-e2e", action="store_true", help="skip the end-to-end training step")
    parser.add_argument(
        "--e2e-model",
        choices=("quick", "full"),
        help="the end-to-end step's model: quick (dim 256, 2 layers) or full (dim 512, 4 layers) "
        "(default: full for the full grid, quick otherwise)",
    )
    parser.add_argument("--no-chart", action="store_true", help="write no PNG (needs no matplotlib)")
    parser.add_argument("--out", default=".", metavar="DIR", help="folder for the JSON and PNG (default: .)")
    parser.add_argument("--name", metavar="NAME", help="file name stem (default: bench-<device>-<quick|full|custom>)")
    return parser.parse_args(argv)


def _split(text):
    return [item.strip() for item in text.split(",") if item.strip()]


def _shape_list(text):
    try:
        return [grids.parse_shape(item) for item in _split(text)]
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from error


def _dtype_list(text):
    items = _split(text)
    for item in items:
        if item not in ("float32", "bfloat16", "float16"):
            raise argparse.ArgumentTypeError(f"unknown dtype {item!r}: float32, bfloat16 or float16")
    return items


def _dropout_list(text):
    try:
        items = [float(item) for item in _split(text)]
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"{text!r}: expected numbers in [0, 1), e.g. 0,0.1") from error
    if not items or not all(0 <= p < 1 for p in items):
        raise argparse.ArgumentTypeError(f"{text!r}: dropout rates must be in [0, 1)")
    return items


def _pass_list(text):
    items = _split(text)
    if not items or any(item not in grids.PASSES for item in items):
        raise argparse.ArgumentTypeError(f"{text!r}: passes are forward, forward_backward")
    return items


def _positive(text):
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be > 0")
    return value


def _non_negative(text):
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be >= 0")
    return value


def _positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: must be >= 1")
    return value


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if not args.no_chart:
        try:
            import matplotlib  # noqa: F401  (fail now, not after the run)
        except ImportError:
            print(
                "mlx-fused-lora bench: the chart needs matplotlib: pip install 'mlx-fused-lora[bench]' "
                "(or pass --no-chart)",
                file=sys.stderr,
            )
            return 2

    device = mx.default_device()
    grid_name = "custom" if args.shapes else "quick" if args.quick else "full"
    name = args.name or f"bench-{device.type.name}-{grid_name}"
    json_path = os.path.join(args.out, name + ".json")
    png_path = None if args.no_chart else os.path.join(args.out, name + ".png")
    with file_lock(json_path, "--out/--name"):  # two benchmarks never write one results file
        return _run(args, argv, device, grid_name, json_path, png_path)


def _run(args, argv, device, grid_name, json_path, png_path):
    shapes = args.shapes or (grids.quick_shapes() if args.quick else grids.full_shapes())
    dtypes = args.dtypes or grids.device_dtypes(device)
    with_peft = not args.no_peft and peft_peer.available()
    blas = blas_report(limit_path(device), with_peft)
    on_reference_blas = blas["plain_peers"] == fast_blas.REFERENCE_BLAS
    peer_max = grids.default_peer_max_gflop(device) if args.peer_max_gflop is None else args.peer_max_gflop
    extra = peft_peer.PEFT_KINDS if with_peft else ()
    groups = grids.grid(shapes, dtypes, args.dropouts, args.passes, peer_max, extra_kinds=extra)
    e2e_model = args.e2e_model or ("quick" if args.quick or args.shapes else "full")
    e2e_config = None if args.no_e2e else e2e.E2E_QUICK if e2e_model == "quick" else e2e.E2E_FULL

    started, load_start = datetime.datetime.now(datetime.timezone.utc), load_average()
    wall_start = time.perf_counter()
    print(
        f"mlx-fused-lora bench: {len(groups)} comparisons ({grid_name} grid) on {device}, "
        f"dtypes {','.join(dtypes)}, load average {results.load_text(load_start)}",
        flush=True,
    )
    print(results.blas_text(blas), flush=True)
    if on_reference_blas:
        print(
            "note: the plain peers run on MLX's reference BLAS, so fused / plain includes the BLAS's "
            "difference, not only the fusion's (the mlx-fused-lora command puts MLX on OpenBLAS unless "
            "--no-fast-blas)" + (f"; peers only up to {peer_max:g} GFLOP" if peer_max else ""),
            flush=True,
        )

    calibration_start = timing.calibration_gemm_s(dtypes[0])
    # tqdm writes to stderr: the table and the JSON path stay alone on stdout.
    progress = tqdm(total=len(groups) + (e2e_config is not None), unit="case", dynamic_ncols=True)
    records, inputs, inputs_key = [], None, None
    for group in groups:
        progress.set_description(f"{group.shape.label} {group.dtype} p={group.dropout} {group.pass_name}")
        key = (group.shape, group.dtype)
        if key != inputs_key:
            inputs, inputs_key = None, key  # free the last shape's arrays first
            inputs = make_inputs(group.shape.m, group.shape.k, group.shape.n, group.shape.r, group.dtype)
        records += timing.measure_group(group, inputs, args.budget, args.rounds)
        progress.update()
    inputs = None
    end_to_end = None
    if e2e_config is not None:
        progress.set_description("end-to-end training step")
        end_to_end = e2e.measure_end_to_end(e2e_config, budget_s=2 * args.budget, max_rounds=args.rounds)
        progress.update()
    progress.close()

    calibration_end = timing.calibration_gemm_s(dtypes[0])
    load_end = load_average()
    report = results.build(
        argv=argv,
        started=started,
        wall_s=time.perf_counter() - wall_start,
        load=(load_start, load_end),
        calibration=(calibration_start, calibration_end, dtypes[0]),
        blas=blas,
        settings=dict(
            grid=grid_name,
            dtypes=list(dtypes),
            dropouts=list(args.dropouts),
            passes=list(args.passes),
            peer_max_gflop=peer_max,
            budget_s=args.budget,
            max_rounds=args.rounds,
            scale=grids.SCALE,
            plain_layer=_class_name(plain_layer_class()),
            peft=peft_peer.versions() if with_peft else None,
        ),
        records=records,
        end_to_end=end_to_end,
    )
    with open(json_path, "w") as f:
        json.dump(report, f, indent=1)
    if png_path:
        from .chart import write_chart

        write_chart(report, png_path)

    print()
    print(report["printed"])
    print(f"wrote {json_path}" + (f" and {png_path}" if png_path else ""))
    return 0


def _class_name(cls):
    return f"{cls.__module__}.{cls.__name__}"
