"""Timing and peak memory of the cases: one warm-up each, then rounds interleaved across kinds."""

import time

import mlx.core as mx

from .cases import _limit_passes, cases, make_inputs
from .grid import device_dtypes

# Kinds that run outside MLX (PyTorch): MLX's peak-memory counter cannot see them.
FOREIGN_KINDS = ("peft", "peft_limit")

# The fused op and the limit are a few per cent apart, so each gets at least this
# many rounds, whatever they cost (so does PEFT against its own limit); a peer
# 10-100x slower than fused gets as many as fit in the budget, at least one.
MIN_ROUNDS = {"fused": 3, "limit": 3, "peft": 3, "peft_limit": 3}


# A kind up to this many times slower than the fastest still runs every round of its comparison.
SLOW_FACTOR = 4


def timed_call(fn):
    """(seconds, peak bytes MLX held, inputs included) of one evaluated call."""
    mx.synchronize()
    mx.reset_peak_memory()
    start = time.perf_counter()
    fn()
    mx.synchronize()
    return time.perf_counter() - start, mx.get_peak_memory()


def rounds_for(first_seconds, budget_s, max_rounds, min_rounds=1):
    """Timed rounds after the warm-up: as many as fit in budget_s, min_rounds to max_rounds."""
    fit = int(budget_s / max(first_seconds, 1e-9))
    return max(1, min(max_rounds, max(min_rounds, fit)))


def measure_interleaved(fns, budget_s=2.0, max_rounds=10, min_rounds=None):
    """{name: {time_s, times_s, warmup_s, peak_memory, rounds}} for zero-argument callables.

    One warm-up each, then the rounds interleaved (a, b, c, a, b, c, ...) so that a
    burst of load on a shared machine lands on every case alike. time_s is the
    best round; peak_memory the smallest peak of the timed rounds. min_rounds:
    {name: at least this many rounds} (default MIN_ROUNDS).

    Kinds of similar cost run the same number of rounds, so their rounds span the same
    stretch of time and a quiet spell reaches them all: the most any kind's budget
    allows. A kind much slower than that (a peer on MLX's reference BLAS) stops once
    SLOW_FACTOR budgets are spent on it, after at least its min_rounds.
    """
    min_rounds = MIN_ROUNDS if min_rounds is None else min_rounds
    warm = {name: timed_call(fn)[0] for name, fn in fns.items()}
    common = max(
        (rounds_for(warm[name], budget_s, max_rounds, min_rounds.get(name, 1)) for name in fns),
        default=0,
    )
    rounds = {
        name: min(common, rounds_for(warm[name], SLOW_FACTOR * budget_s, max_rounds, min_rounds.get(name, 1)))
        for name in fns
    }
    times = {name: [] for name in fns}
    peaks = {name: [] for name in fns}
    for i in range(max(rounds.values(), default=0)):
        for name, fn in fns.items():
            if i < rounds[name]:
                seconds, peak = timed_call(fn)
                times[name].append(seconds)
                peaks[name].append(peak)
    return {
        name: dict(
            time_s=min(times[name]),
            times_s=times[name],
            warmup_s=warm[name],
            peak_memory=min(peaks[name]),
            rounds=rounds[name],
        )
        for name in fns
    }


def measure_group(group, inputs, budget_s=2.0, max_rounds=10):
    """Records (one dict per kind) of one group, measured side by side."""
    fns = {kind: passes[group.pass_name] for kind, passes in cases(inputs, group.dropout, kinds=group.kinds).items()}
    results = measure_interleaved(fns, budget_s, max_rounds)
    for kind in FOREIGN_KINDS:
        if kind in results:
            results[kind]["peak_memory"] = None  # not measured: MLX's counter does not see torch
    shape = group.shape
    return [
        dict(
            m=shape.m,
            k=shape.k,
            n=shape.n,
            r=shape.r,
            dtype=group.dtype,
            dropout=group.dropout,
            pass_name=group.pass_name,
            kind=kind,
            **result,
        )
        for kind, result in results.items()
    ]


def calibration_gemm_s(dtype=None, rounds=5):
    """Best time of the 2048^3 base GEMM through the limit path: a load gauge.

    Measured at the start and the end of a run: if it moved, the machine was busy
    and the run's absolute times (not only its ratios) are suspect.
    """
    dtype = dtype or device_dtypes()[0]
    inputs = make_inputs(2048, 2048, 2048, 16, dtype)
    return best_time(_limit_passes(inputs)["forward"], rounds)


def peak_memory(fn):
    """Peak bytes MLX holds while fn runs (its inputs included)."""
    fn()  # warm up: compile caches, allocator
    return timed_call(fn)[1]


def best_time(fn, rounds=3):
    """The fastest of `rounds` runs after one warm-up, in seconds."""
    fn()
    return min(timed_call(fn)[0] for _ in range(rounds))
