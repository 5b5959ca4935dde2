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


class Kernels:
    """The GPU kernels of the fused op (see ``bodies.py`` for what each computes).

    Shapes: x (M, K) and dy (M, N) in T (float32, float16 or bfloat16); a (K, r),
    b (r, N), h and ds (M, r) float32. ``index_base`` offsets the mask's flat indices
    (0 in the op). ``max_groups`` and ``max_splits`` cap the grid's groups in x and y
    (the self-check and the tests lower them to run the group-stride loops and the
    multi-tile walks at small sizes).
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

    def dropout_mask(self, key, shape, p, index_base=0):
        """float32 dropout multipliers for an x of `shape` (1/(1-p) kept, 0 dropped)."""
        size = 1
        for d in shape:
            size *= int(d)
        template, grid, group = geometry.elementwise(size, self.max_groups)
        inputs = self._mask_inputs(key, p, index_base) + [_scalar(size, mx.uint64)]
        (mask,) = self._launch("dropout_mask", inputs, [(tuple(shape), F32)], template, F32, grid, group)
        return mask

    def down_proj(self, x, a, key, p, index_base=0):
        """h = (m * x) @ a, float32 (M, r)."""
        m, k = x.shape
        r = a.shape[1]
        template, grid, group = geometry.down_proj(m, k, r, x.dtype.size, self.max_groups, self.max_splits)
        inputs = [x, a.astype(F32)] + self._mask_inputs(key, p, index_base)
        (h_part,) = self._launch("down_proj", inputs, [((grid[1], m, r), F32)], template, x.dtype, grid, group)
        return self.sum_parts(h_part, 1.0)

    def low_rank_grad(self, dy, h, b, scale):
        """(dS, dB) = (scale * dy @ b.T, scale * h.T @ dy), float32, in one pass over dy."""
        m, n = dy.shape
        r = h.shape[1]
        template, grid, group = geometry.low_rank_grad(m, n, r, dy.dtype.size, self.max_groups, self.max_splits)
        blocks = -(-n // geometry.column_tile("low_rank_grad", template))
        ds_part, db_part = self._launch(
            "low_rank_grad",
            [dy, h.astype(F32), b.astype(F32)],
            [((blocks, m, r), F32), ((grid[1], r, n), F32)],
            template,
            dy.dtype,
            grid,
            group,
        )
        return self.sum_parts(ds_part, scale), self.sum_parts(db_part, scale)

    def down_grad(self, x, ds, a, key, p, index_base=0):
        """(dA, e) = ((m * x).T @ ds float32 (K, r), m * (ds @ a.T) in x's dtype (M, K))."""
        m, k = x.shape
        r = ds.shape[1]
        template, grid, group = geometry.down_grad(m, k, r, x.dtype.size, self.max_groups, self.max_splits)
        inputs = [x, ds.astype(F32), a.astype(F32)] + self._mask_inputs(key, p, index_base)
        outputs = [((grid[1], k, r), F32), ((m, k), x.dtype)]
        da_part, e = self._launch("down_grad", inputs, outputs, template, x.dtype, grid, group)
        return self.sum_parts(da_part, 1.0), e

    def sum_parts(self, parts, scale):
        """scale * parts.sum(axis=0), summed in index order (deterministic); one part
        with scale 1 is returned as it is."""
        if parts.shape[0] == 1 and scale == 1.0:
            return parts[0]
        template, grid, group = geometry.elementwise(parts.shape[1] * parts.shape[2], self.max_groups)
        inputs = [parts, _scalar(scale, F32)]
        (out,) = self._launch("sum_parts", inputs, [(parts.shape[1:], F32)], template, F32, grid, group)
        return out
