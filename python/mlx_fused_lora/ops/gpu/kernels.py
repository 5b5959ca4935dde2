"""The fused op's GPU kernels as the op's glue calls them, over a swappable launcher.

``Kernels`` knows each kernel's inputs, outputs, tiles and grid (``geometry.py``) and
hands a launch to its launcher. ``MLXLauncher`` runs the bodies through MLX's
``mx.fast.cuda_kernel`` / ``mx.fast.metal_kernel`` on a GPU; ``opencl.OpenCLLauncher``
runs the very same bodies through OpenCL on the CPU (PoCL), which is how the test suite
runs every kernel and the whole GPU op without a GPU. A launcher has one method:

    launch(name, inputs, outputs, template, element_dtype, grid, threadgroup) -> [mx.array]

with ``outputs`` a list of (shape, dtype) and ``template`` a dict of int parameters
(``T`` = ``element_dtype`` is added by the launcher, as each dialect spells it).

MLX 0.32 keeps the kernels it builds in memory only: a custom CUDA kernel is compiled by
NVRTC once per process (MLX's on-disk PTX cache is not used for custom kernels), a Metal
one once per process too.
"""

import functools
from importlib import resources

import mlx.core as mx

from . import bodies, dialects, geometry

F32 = mx.float32


@functools.cache
def mask_header():
    """csrc/kernels/lora_dropout.h, the mask math the CPU extension compiles."""
    return (resources.files("mlx_fused_lora") / "kernels" / "lora_dropout.h").read_text()


def kernel_source(dialect, name):
    """(header, body) of kernel `name` as MLX (cuda, metal) or the OpenCL runner takes them."""
    header = dialects.HEADER_DEFINES[dialect] + mask_header() + dialects.HEADER_HELPERS[dialect]
    return header, dialects.BODY_PRELUDE[dialect] + bodies.KERNELS[name][0]


class MLXLauncher:
    """Launches the bodies with MLX's custom kernels on `backend` ('cuda' or 'metal')."""

    def __init__(self, backend):
        self.backend = backend
        self._objects = {}

    def _object(self, name):
        if name not in self._objects:
            header, body = kernel_source(self.backend, name)
            _, inputs, outputs = bodies.KERNELS[name]
            make = mx.fast.cuda_kernel if self.backend == "cuda" else mx.fast.metal_kernel
            self._objects[name] = make(
                name=f"mfl_{name}", input_names=inputs, output_names=outputs, source=body, header=header
            )
        return self._objects[name]

    def launch(self, name, inputs, outputs, template, element_dtype, grid, threadgroup):
        return self._object(name)(
            inputs=inputs,
            template=[("T", element_dtype)] + list(template.items()),
            output_shapes=[tuple(s) for s, _ in outputs],
            output_dtypes=[d for _, d in outputs],
            grid=grid,
            threadgroup=threadgroup,
        )


def _scalar(value, dtype):
    return mx.array(value, dtype=dtype)


@functools.cache
def _unread():
    """The order and segment-table inputs of the single-adapter op's launches (MIXED = 0
    computes its rows instead): one-entry host arrays, no launch to make them."""
    return mx.array([0], dtype=mx.int32), mx.array([[0, 0, 0]], dtype=mx.int32)


class Kernels:
    """The GPU kernels of the fused op (see ``bodies.py`` for what each computes).

    Shapes: x (M, K) and dy (M, N) in T (float32, float16 or bfloat16); a (K, r),
    b (r, N), h and ds (M, r) float32. ``index_base`` offsets the mask's flat indices
    (0 in the op). ``max_groups`` and ``max_splits`` cap the grid's groups in x and y
    (the self-check and the tests lower them to run the group-stride loops and the
    multi-tile walks at small sizes).

    Mixed adapters: with ``groups`` (a ``grouping.Groups`` of the batch's ids) a and b
    are stacked, (n, K, r) and (n, r, N), each row on its adapter, and the gradients of
    the adapters come stacked too (an adapter no row uses: zeros). Without, the
    single-adapter op: the same bodies with MIXED = 0.
    """

    def __init__(self, launcher, max_groups=geometry.MAX_GROUPS, max_splits=geometry.MAX_SPLITS):
        self.launcher = launcher
        self.max_groups = max_groups
        self.max_splits = max_splits

    def capped(self, max_groups, max_splits):
        """The same kernels on the same launcher with smaller grids."""
        return Kernels(self.launcher, max_groups, max_splits)

    def _launch(self, name, inputs, outputs, template, element_dtype, grid, group):
        geometry.check_grid(grid, group)
        return self.launcher.launch(name, inputs, outputs, template, element_dtype, grid, group)

    def _mask_inputs(self, key, p, index_base):
        key = key if key is not None else mx.zeros((2,), dtype=mx.uint32)
        return [key, _scalar(p, F32), _scalar(index_base, mx.uint64)]

    def _rows(self, groups, length):
        """The (order, segments) inputs and the table's length and bounds (None, None
        for the single-adapter op) of a launch walking segments of `length` rows."""
        if groups is None:
            return list(_unread()), None, None
        segments, bounds = groups.table(self, length)
        return [groups.order, segments], segments.shape[0], bounds

    def dropout_mask(self, key, shape, p, index_base=0):
        """float32 dropout multipliers for an x of `shape` (1/(1-p) kept, 0 dropped)."""
        size = 1
        for d in shape:
            size *= int(d)
        template, grid, group = geometry.elementwise(size, self.max_groups)
        inputs = self._mask_inputs(key, p, index_base) + [_scalar(size, mx.uint64)]
        (mask,) = self._launch("dropout_mask", inputs, [(tuple(shape), F32)], template, F32, grid, group)
        return mask

    def down_proj(self, x, a, key, p, index_base=0, groups=None):
        """h = (m * x) @ a (each row's adapter with groups), float32 (M, r)."""
        m, k = x.shape
        r = a.shape[-1]
        sizes = (m, k, r, x.dtype.size, self.max_groups, self.max_splits)
        rows, tiles, _ = self._rows(groups, geometry.row_tile("down_proj", geometry.down_proj(*sizes)[0]))
        template, grid, group = geometry.down_proj(*sizes, tiles=tiles)
        inputs = [x, a.astype(F32)] + self._mask_inputs(key, p, index_base) + rows
        (h_part,) = self._launch("down_proj", inputs, [((grid[1], m, r), F32)], template, x.dtype, grid, group)
        return self.sum_parts(h_part)

    def low_rank_grad(self, dy, h, b, scale, groups=None):
        """(dS, dB) = (c * dy @ b.T, c * h.T @ dy), float32, in one pass over dy: c the
        float `scale`, or with groups the (n,) float32 array of each adapter's."""
        m, n = dy.shape
        r = h.shape[1]
        sizes = (m, n, r, dy.dtype.size, self.max_groups, self.max_splits)
        rows, segments, bounds = self._rows(groups, geometry.split_rows("low_rank_grad", *sizes))
        template, grid, group = geometry.low_rank_grad(*sizes, segments=segments)
        blocks = -(-n // geometry.column_tile("low_rank_grad", template))
        scales = _scalar([scale], F32) if groups is None else scale.astype(F32)
        ds_part, db_part = self._launch(
            "low_rank_grad",
            [dy, h.astype(F32), b.astype(F32), scales] + rows,
            [((blocks, m, r), F32), ((segments or grid[1], r, n), F32)],
            template,
            dy.dtype,
            grid,
            group,
        )
        return self.sum_parts(ds_part), self.sum_parts(db_part, bounds)

    def down_grad(self, x, ds, a, key, p, index_base=0, groups=None):
        """(dA, e) = ((m * x).T @ ds float32 (K, r), m * (ds @ a.T) in x's dtype (M, K)),
        each row's adapter with groups (dA then (n, K, r))."""
        m, k = x.shape
        r = ds.shape[1]
        sizes = (m, k, r, x.dtype.size, self.max_groups, self.max_splits)
        rows, segments, bounds = self._rows(groups, geometry.split_rows("down_grad", *sizes))
        template, grid, group = geometry.down_grad(*sizes, segments=segments)
        inputs = [x, ds.astype(F32), a.astype(F32)] + self._mask_inputs(key, p, index_base) + rows
        outputs = [((segments or grid[1], k, r), F32), ((m, k), x.dtype)]
        da_part, e = self._launch("down_grad", inputs, outputs, template, x.dtype, grid, group)
        return self.sum_parts(da_part, bounds), e

    def sum_parts(self, parts, bounds=None):
        """parts.sum(axis=0), summed in index order (deterministic), one part returned as
        it is; with `bounds` (a table's, n + 2 entries) one sum per adapter over its
        parts: (n, *parts.shape[1:]), zeros for an adapter with none."""
        if parts.shape[0] == 1 and bounds is None:
            return parts[0]
        count = 1 if bounds is None else bounds.shape[0] - 2
        template, grid, group = geometry.elementwise(count * parts.shape[1] * parts.shape[2], self.max_groups)
        template["MIXED"] = int(bounds is not None)
        shape = parts.shape[1:] if bounds is None else (count, *parts.shape[1:])
        inputs = [parts, _unread()[0] if bounds is None else bounds]
        (out,) = self._launch("sum_parts", inputs, [(shape, F32)], template, F32, grid, group)
        return out

    def row_segments(self, row_off, seg_off, length, size):
        """The table of `size` segments of at most `length` rows (grouping.py), (size, 3)
        int32: (first position, end position, adapter) each."""
        template, grid, group = geometry.elementwise(size, self.max_groups)
        inputs = [row_off, seg_off, _scalar(length, mx.int32), _scalar(size, mx.uint64)]
        (table,) = self._launch("row_segments", inputs, [((size, 3), mx.int32)], template, F32, grid, group)
        return table
