"""Every GPU kernel body, run on the CPU through OpenCL C on PoCL (real work-groups,
local memory and barriers), against numpy, the CPU extension's mask and itself.

Kernels compile once per (kernel, dtype, tiles): the parametrization keeps that set
small (every class of rank tiles in float32, every dtype at r = 16); p, shapes and
offsets vary at run time.
"""

import mlx.core as mx
import numpy as np
import pytest

pytest.importorskip("pyopencl", reason='needs pip install "pyopencl[pocl]" (the test extra)')

from mask_spec import spec_mask  # noqa: E402
from mlx_fused_lora._extension import _ext  # noqa: E402
from mlx_fused_lora.ops.gpu import geometry, grouping, kernels, opencl  # noqa: E402

KEY = mx.array(np.array([123456789, 987654321], dtype=np.uint32))
M, K, N = 37, 150, 70  # tails against every tile size (16/32/64 rows, 16/32/64/128 columns)
# Rows of 150 and 70 elements take the element-wise loads; rows of 148 and 68 (multiples
# of 4, still with tails) the 4-wide loads and stores; 150 x 300 x 300 several row tiles,
# column blocks and splits (its partials summed).
SHAPES = [(M, K, N), (M, 148, 68), (150, 300, 300)]
# r = 1: one padded chunk; 17: two chunks with padding; 64 and 128: down_grad's smaller
# groups (no low_rank_grad: r > 32 takes two GEMMs).
CONFIGS = [(mx.float32, 1), (mx.float32, 17), (mx.float32, 64), (mx.float32, 128), (mx.float16, 16), (mx.bfloat16, 16)]
IDS = [f"{str(d).split('.')[-1]}-r{r}" for d, r in CONFIGS]


@pytest.fixture(scope="module")
def launcher():
    return opencl.OpenCLLauncher()


@pytest.fixture(scope="module")
def gpu(launcher):
    return kernels.Kernels(launcher)


def cpu_mask(shape, p):
    return np.array(_ext.dropout_mask(KEY, list(shape), p, mx.float32, stream=mx.cpu))


def numpy_mask(indices, p):
    """lora_dropout.h in numpy under this file's key, for any 64-bit flat indices."""
    key = np.array(KEY)
    return spec_mask(key[0], key[1], indices, p)


def inputs(dtype, r, shape=(M, K, N), seed=0):
    """x, dy exactly representable in `dtype` (so numpy sees the kernel's values); a, b, ds float32."""
    rng = np.random.default_rng(seed)
    m, k, n = shape

    def arr(shape, dt=mx.float32):
        return mx.array(rng.standard_normal(shape).astype(np.float32)).astype(dt)

    return arr((m, k), dtype), arr((k, r)), arr((r, n)), arr((m, n), dtype), arr((m, r))


def f32(a):
    return np.array(a.astype(mx.float32))


def close(got, want, rtol):
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    assert np.abs(got - want).max() <= rtol * max(1.0, np.abs(want).max()), np.abs(got - want).max()


@pytest.mark.parametrize("p", [0.1, 0.5])
@pytest.mark.parametrize("shape", [(M, K), (5, 1029)])
def test_mask_equals_the_cpu_extensions_bit_for_bit(gpu, shape, p):
    got = np.array(gpu.dropout_mask(KEY, shape, p))
    assert np.array_equal(got.view(np.uint32), cpu_mask(shape, p).view(np.uint32))


def test_numpy_mask_equals_the_cpu_extensions():
    want = cpu_mask((M, K), 0.3).reshape(-1)
    assert np.array_equal(numpy_mask(np.arange(M * K, dtype=np.uint64), 0.3).view(np.uint32), want.view(np.uint32))


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_flat_indices_past_2_to_the_32(gpu, shape):
    """Elements whose flat index is past 2^32 (index_base stands in for the rows before):
    the high word reaches the hash, as the numpy mask says it must."""
    m, k, _ = shape
    base = 2**32 - 1000  # the window straddles 2^32
    indices = np.arange(m * k, dtype=np.uint64) + np.uint64(base)
    got = np.array(gpu.dropout_mask(KEY, (m, k), 0.5, index_base=base)).reshape(-1)
    want = numpy_mask(indices, 0.5)
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))
    wrapped = numpy_mask(indices & np.uint64(0xFFFFFFFF), 0.5)  # what a 32-bit index would give
    assert np.array_equal(got[:1000], wrapped[:1000]) and not np.array_equal(got[1000:], wrapped[1000:])
    want = want.reshape(m, k)
    x, a = inputs(mx.float32, 16, shape)[:2]
    h = np.array(gpu.down_proj(x, a, KEY, 0.5, index_base=base))
    close(h, (f32(x) * want) @ f32(a), 1e-5)
    da, e = gpu.down_grad(x, mx.array(h), a, KEY, 0.5, index_base=base)
    close(np.array(da), (f32(x) * want).T @ h, 1e-5)
    close(np.array(e), want * (h @ f32(a).T), 1e-5)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype,r", CONFIGS, ids=IDS)
def test_kernels_match_numpy(gpu, dtype, r, shape):
    x, a, b, dy, ds = inputs(dtype, r, shape)
    xn, an, bn, dyn, dsn = f32(x), f32(a), f32(b), f32(dy), f32(ds)
    for p in (0.0, 0.1, 0.5):
        mask = cpu_mask(x.shape, p) if p > 0 else np.ones(x.shape, np.float32)
        h = gpu.down_proj(x, a, KEY, p)
        close(np.array(h), (xn * mask) @ an, 1e-5)
        if r <= geometry.MAX_LOW_RANK:
            d_s, d_b = gpu.low_rank_grad(dy, h, b, 1.5)
            close(np.array(d_s), 1.5 * dyn @ bn.T, 1e-5)
            close(np.array(d_b), 1.5 * np.array(h).T @ dyn, 1e-5)
        da, e = gpu.down_grad(x, ds, a, KEY, p)
        close(np.array(da), (xn * mask).T @ dsn, 1e-5)
        assert e.dtype == dtype
        close(f32(e), mask * (dsn @ an.T), 1e-5 if dtype == mx.float32 else 1e-2)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16], ids=str)
def test_half_and_bfloat16_stores_round_as_mlx_does(gpu, dtype, shape):
    """e in T is the float32 kernel's e rounded to nearest even, bit for bit as MLX's astype."""
    x, a, _, _, ds = inputs(dtype, 16, shape)
    _, e32 = gpu.down_grad(x.astype(mx.float32), ds, a, KEY, 0.1)
    _, e = gpu.down_grad(x, ds, a, KEY, 0.1)
    assert np.array_equal(np.array(e.view(mx.uint16)), np.array(e32.astype(dtype).view(mx.uint16)))


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_bitwise_deterministic_across_runs(gpu, shape):
    x, a, b, dy, ds = inputs(mx.bfloat16, 16, shape)
    runs = []
    for _ in range(2):
        h = gpu.down_proj(x, a, KEY, 0.1)
        runs.append([h, *gpu.low_rank_grad(dy, h, b, 1.5), *gpu.down_grad(x, ds, a, KEY, 0.1)])
    for first, second in zip(*runs, strict=True):
        assert np.array_equal(opencl.to_numpy(first), opencl.to_numpy(second))


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_group_stride_loops_cover_every_tile(launcher, shape):
    """With the grid capped at 2 groups in x and 2 splits in y, the bodies walk the
    remaining tiles, several per split."""
    few = kernels.Kernels(launcher, max_groups=2, max_splits=2)
    x, a, b, dy, ds = inputs(mx.float32, 16, shape)
    mask = cpu_mask(x.shape, 0.1)
    assert np.array_equal(np.array(few.dropout_mask(KEY, x.shape, 0.1)), mask)
    h = few.down_proj(x, a, KEY, 0.1)
    close(np.array(h), (f32(x) * mask) @ f32(a), 1e-5)
    d_s, d_b = few.low_rank_grad(dy, h, b, 1.0)
    close(np.array(d_s), f32(dy) @ f32(b).T, 1e-5)
    close(np.array(d_b), np.array(h).T @ f32(dy), 1e-5)
    da, e = few.down_grad(x, ds, a, KEY, 0.1)
    close(np.array(da), (f32(x) * mask).T @ f32(ds), 1e-5)
    close(np.array(e), mask * (f32(ds) @ f32(a).T), 1e-5)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_every_output_element_is_written(launcher, shape):
    """Outputs start as NaN bytes in the OpenCL runner: one element left unwritten shows."""
    gpu = kernels.Kernels(launcher)
    x, a, b, dy, ds = inputs(mx.float32, 1, shape)
    for out in (gpu.down_proj(x, a, KEY, 0.0), *gpu.low_rank_grad(dy, ds, b, 1.0), *gpu.down_grad(x, ds, a, KEY, 0.0)):
        assert np.isfinite(np.array(out)).all()


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16], ids=str)
def test_a_sliced_x_takes_the_element_wise_path_and_is_right(gpu, launcher, dtype):
    """x a view one element into its buffer, rows a multiple of 4: the runner keeps the
    offset (as MLX hands the view to a GPU kernel), so CUDA's alignment rule sends the
    kernels down their element-wise path, and the results are unchanged."""
    m, k = 21, 148
    whole = mx.array(np.random.default_rng(3).standard_normal(m * k + 1).astype(np.float32)).astype(dtype)
    x, aligned = whole[1:].reshape(m, k), whole[:-1].reshape(m, k)
    assert opencl.element_offset(x) == 1 and opencl.element_offset(aligned) == 0
    _, a, _, _, ds = inputs(dtype, 16, (m, k, 8))
    mask = cpu_mask((m, k), 0.1)
    h = gpu.down_proj(x, a, KEY, 0.1)
    assert "mfl_buffer_x + 1;" in launcher.sources["down_proj"]
    close(np.array(h), (f32(x) * mask) @ f32(a), 1e-5)
    da, e = gpu.down_grad(x, ds, a, KEY, 0.1)
    close(np.array(da), (f32(x) * mask).T @ f32(ds), 1e-5)
    close(f32(e), mask * (f32(ds) @ f32(a).T), 1e-5 if dtype == mx.float32 else 1e-2)


def test_the_runner_runs_the_shared_body_in_mlx_grid(launcher):
    """What ran is the shared body under the OpenCL prelude, with MLX's grid and groups."""
    seen = []

    class Spy:
        def launch(self, *args):
            seen.append(args)
            return launcher.launch(*args)

    x, a, _, _, ds = inputs(mx.float32, 16)
    kernels.Kernels(Spy()).down_grad(x, ds, a, KEY, 0.1)
    name, _, _, template, _, grid, group = seen[0]
    assert name == "down_grad" and group == (geometry.GROUP, 1, 1)
    assert (grid, group) == geometry.down_grad(M, K, 16)[1:] and template == geometry.down_grad(M, K, 16)[0]
    source = launcher.sources["down_grad"]
    assert kernels.kernel_source("opencl", "down_grad")[1] in source and "barrier(CLK_LOCAL_MEM_FENCE)" in source


# Mixed adapters: 4 stacked, adapter 3 unused; ids with a run of rows on the base alone,
# long runs of one adapter (several tiles and splits), single rows between them and an
# id out of range (a row on no adapter here; the op makes it NaN).
COUNT = 4


def mixed_ids(m, seed=0):
    rng = np.random.default_rng(seed)
    ids = np.concatenate([np.full(3, -1), np.full(2 * m // 3, 1), rng.integers(-1, 3, m)])[:m].astype(np.int32)
    ids[m // 2] = 7
    return rng.permutation(ids) if seed else ids


def per_row(ids, stack, values):
    """numpy: row i of `values` (M, d) times stack[ids[i]] (d, e); rows on no adapter 0."""
    out = np.zeros((len(ids), stack.shape[-1]), np.float32)
    for i, a in enumerate(ids):
        if 0 <= a < len(stack):
            out[i] = values[i] @ stack[a]
    return out


def per_adapter(ids, count, left, right):
    """numpy: for each adapter, the sum over its rows of left[i]^T right[i] (an outer product)."""
    out = np.zeros((count, left.shape[1], right.shape[1]), np.float32)
    for i, a in enumerate(ids):
        if 0 <= a < count:
            out[a] += np.outer(left[i], right[i])
    return out


MIXED_CONFIGS = [
    # rank tails, several row tiles, column blocks and splits per adapter
    (mx.float32, 17, (150, 300, 300), None, 0),
    # 2 groups in x and 2 in y: the segment-stride loops; ids scattered
    (mx.float32, 16, (150, 300, 300), (2, 2), 1),
    (mx.bfloat16, 16, (M, K, N), None, 1),
    (mx.float16, 1, (M, 148, 68), None, 0),
]


@pytest.mark.parametrize("dtype,r,shape,caps,seed", MIXED_CONFIGS, ids=str)
def test_mixed_kernels_match_numpy(launcher, dtype, r, shape, caps, seed):
    """Each row on its adapter (h, dS, e), each adapter's gradient over its rows only (dB,
    dA; the unused adapter's: exact zeros), rows on no adapter: zeros."""
    gpu = kernels.Kernels(launcher) if caps is None else kernels.Kernels(launcher, *caps)
    m, k, n = shape
    x, _, _, dy, ds = inputs(dtype, r, shape)
    rng = np.random.default_rng(5)
    a = mx.array(rng.standard_normal((COUNT, k, r)).astype(np.float32))
    b = mx.array(rng.standard_normal((COUNT, r, n)).astype(np.float32))
    scales = mx.array([1.5, -0.5, 2.0, 3.0])
    ids = mixed_ids(m, seed)
    groups = grouping.Groups(mx.array(ids), COUNT)
    an, bn, dyn, dsn, sc = f32(a), f32(b), f32(dy), f32(ds), np.array(scales)
    c = np.where((ids >= 0) & (ids < COUNT), sc[np.clip(ids, 0, COUNT - 1)], 0)[:, None]
    for p in (0.0, 0.1):
        mask = cpu_mask(x.shape, p) if p > 0 else np.ones(x.shape, np.float32)
        xm = f32(x) * mask
        h = gpu.down_proj(x, a, KEY, p, groups=groups)
        close(np.array(h), per_row(ids, an, xm), 1e-5)
        d_s, d_b = gpu.low_rank_grad(dy, h, b, scales, groups=groups)
        close(np.array(d_s), c * per_row(ids, bn.transpose(0, 2, 1), dyn), 1e-5)
        close(np.array(d_b), sc[:, None, None] * per_adapter(ids, COUNT, np.array(h), dyn), 1e-5)
        da, e = gpu.down_grad(x, ds, a, KEY, p, groups=groups)
        close(np.array(da), per_adapter(ids, COUNT, xm, dsn), 1e-5)
        close(f32(e), mask * per_row(ids, an.transpose(0, 2, 1), dsn), 1e-5 if dtype == mx.float32 else 1e-2)
        for unused in (d_b[3], da[3]):
            assert not np.array(unused).any()


def test_the_row_segments_table(launcher):
    """Every row position in exactly one segment, each segment within one class and at
    most `length` rows, the classes in order (rows on the base alone first), the table's
    spare entries empty; bounds index each class's segments."""
    gpu = kernels.Kernels(launcher)
    ids = mixed_ids(150, 3)
    groups = grouping.Groups(mx.array(ids), COUNT)
    order = np.array(groups.order)
    classes = np.where((ids >= 0) & (ids < COUNT), ids + 1, 0)
    assert sorted(order) == list(range(150)) and list(classes[order]) == sorted(classes)
    for c in range(COUNT + 1):  # each class keeps its rows' order
        rows = order[classes[order] == c]
        assert list(rows) == sorted(rows)
    for length in (16, 40):
        table, bounds = (np.array(t) for t in groups.table(gpu, length))
        assert len(table) == geometry.table_size(150, COUNT, length)
        used = int(bounds[-1])
        covered = np.concatenate([np.arange(s, e) for s, e, _ in table[:used]])
        assert list(covered) == list(range(150))
        for s, e, adapter in table[:used]:
            assert 0 < e - s <= length and set(classes[order[s:e]]) == {adapter + 1}
        assert (table[used:] == [0, 0, -1]).all()
        for c in range(COUNT + 1):
            assert set(table[bounds[c] : bounds[c + 1], 2]) <= {c - 1}
