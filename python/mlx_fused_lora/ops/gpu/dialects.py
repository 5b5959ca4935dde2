"""The three dialects one kernel body is written in: CUDA, Metal and OpenCL C.

A body (``bodies.py``) is C-like code that uses only these names, which each dialect's
prelude defines at the top of the body:

    MFL_TID                 the thread's index in its group (x), uint32_t
    MFL_GROUP_X/Y           the group's index in the grid, int64_t
    MFL_GROUPS_X/Y          the number of groups in the grid, int64_t
    MFL_SHARED              the address space of group-shared arrays (declared at the
                            body's top level)
    MFL_BARRIER()           a barrier over the group, making shared writes visible
    MFL_SCALAR(name)        a 0-d input: ``name[0]`` in CUDA and OpenCL, ``name`` in Metal
                            (MLX passes 0-d inputs to Metal by reference)
    MFL_LOAD(p, i)          element i of an array of the kernel's element type T, as float
    MFL_STORE(p, i, v)      stores float v as T (round to nearest even)
    MFL_LOAD4(p, i, v)      elements i..i+3 of a T array into float v[4], i a multiple
                            of 4 (one 16-byte load of float32, 8-byte of 16-bit types)
    MFL_STORE4(p, i, v)     float v[4] into elements i..i+3 as T, i a multiple of 4
    MFL_VEC_ALIGNED(p)      whether p may take MFL_LOAD4/STORE4 (CUDA's wide accesses
                            need 4-element alignment; a row-contiguous view may start
                            anywhere)
    uint32_t, int64_t, uint64_t

and C casts (``(int64_t)(x)``), never C++ ones, because OpenCL C is C. Template
parameters (``T``, ``R``, ``TG``, ...) arrive as MLX makes them: ``constexpr``/``using``
lines in CUDA, template parameters in Metal, ``#define`` lines in OpenCL (the runner,
``opencl.py``, writes those). The per-element mask math is ``csrc/kernels/lora_dropout.h``
with ``MFL_FN`` defined per dialect.

bfloat16 in OpenCL has no type: it travels as 16-bit words (``ushort``), widened by a
shift and narrowed with round-to-nearest-even (NaN kept quiet), as MLX rounds it.
float16 travels as ``half`` through ``vload_half``/``vstore_half_rte``.
"""

HEADER_DEFINES = {
    "cuda": "#define MFL_FN __device__ inline\n",
    "metal": "#define MFL_FN inline\n",
    "opencl": "#define MFL_FN inline\n",
}

# After the mask math: the 4-wide loads and stores, one overload per element type (CUDA:
# a 16- or 8-byte access, unpacked in registers; halves are little-endian pairs).
_CUDA_VECTOR = """
#ifndef MFL_VECTOR_HELPERS
#define MFL_VECTOR_HELPERS
__device__ inline void mfl_load4(const float* p, uint64_t i, float* v) {
  const float4 q = *reinterpret_cast<const float4*>(p + i);
  v[0] = q.x; v[1] = q.y; v[2] = q.z; v[3] = q.w;
}
__device__ inline void mfl_load4(const __half* p, uint64_t i, float* v) {
  const uint2 q = *reinterpret_cast<const uint2*>(p + i);
  const float2 a = __half22float2(*reinterpret_cast<const __half2*>(&q.x));
  const float2 b = __half22float2(*reinterpret_cast<const __half2*>(&q.y));
  v[0] = a.x; v[1] = a.y; v[2] = b.x; v[3] = b.y;
}
__device__ inline void mfl_load4(const __nv_bfloat16* p, uint64_t i, float* v) {
  const uint2 q = *reinterpret_cast<const uint2*>(p + i);
  const float2 a = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&q.x));
  const float2 b = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&q.y));
  v[0] = a.x; v[1] = a.y; v[2] = b.x; v[3] = b.y;
}
__device__ inline void mfl_store4(float* p, uint64_t i, const float* v) {
  *reinterpret_cast<float4*>(p + i) = make_float4(v[0], v[1], v[2], v[3]);
}
__device__ inline void mfl_store4(__half* p, uint64_t i, const float* v) {
  const __half2 a = __floats2half2_rn(v[0], v[1]);
  const __half2 b = __floats2half2_rn(v[2], v[3]);
  *reinterpret_cast<uint2*>(p + i) = make_uint2(*reinterpret_cast<const unsigned int*>(&a),
                                                *reinterpret_cast<const unsigned int*>(&b));
}
__device__ inline void mfl_store4(__nv_bfloat16* p, uint64_t i, const float* v) {
  const __nv_bfloat162 a = __floats2bfloat162_rn(v[0], v[1]);
  const __nv_bfloat162 b = __floats2bfloat162_rn(v[2], v[3]);
  *reinterpret_cast<uint2*>(p + i) = make_uint2(*reinterpret_cast<const unsigned int*>(&a),
                                                *reinterpret_cast<const unsigned int*>(&b));
}
#endif
"""

# Metal: four neighbouring accesses per thread (device or constant inputs), left to the
# Metal compiler to widen.
_METAL_VECTOR = """
#ifndef MFL_VECTOR_HELPERS
#define MFL_VECTOR_HELPERS
template <typename U>
inline void mfl_load4(const device U* p, uint64_t i, thread float* v) {
  for (int j = 0; j < 4; ++j) v[j] = float(p[i + j]);
}
template <typename U>
inline void mfl_load4(const constant U* p, uint64_t i, thread float* v) {
  for (int j = 0; j < 4; ++j) v[j] = float(p[i + j]);
}
template <typename U>
inline void mfl_store4(device U* p, uint64_t i, const thread float* v) {
  for (int j = 0; j < 4; ++j) p[i + j] = U(v[j]);
}
#endif
"""

HEADER_HELPERS = {"cuda": _CUDA_VECTOR, "metal": _METAL_VECTOR, "opencl": ""}

_CUDA = """
#define MFL_TID ((uint32_t)threadIdx.x)
#define MFL_GROUP_X ((int64_t)blockIdx.x)
#define MFL_GROUP_Y ((int64_t)blockIdx.y)
#define MFL_GROUPS_X ((int64_t)gridDim.x)
#define MFL_GROUPS_Y ((int64_t)gridDim.y)
#define MFL_SHARED __shared__
#define MFL_BARRIER() __syncthreads()
#define MFL_SCALAR(name) (name[0])
#define MFL_LOAD(p, i) ((float)((p)[i]))
#define MFL_STORE(p, i, v) ((p)[i] = (T)(v))
#define MFL_LOAD4(p, i, v) mfl_load4((p), (i), (v))
#define MFL_STORE4(p, i, v) mfl_store4((p), (i), (v))
#define MFL_VEC_ALIGNED(p) ((size_t)(p) % (4 * sizeof(*(p))) == 0)
"""

_METAL = """
#define MFL_TID ((uint32_t)thread_position_in_threadgroup.x)
#define MFL_GROUP_X ((int64_t)threadgroup_position_in_grid.x)
#define MFL_GROUP_Y ((int64_t)threadgroup_position_in_grid.y)
#define MFL_GROUPS_X ((int64_t)threadgroups_per_grid.x)
#define MFL_GROUPS_Y ((int64_t)threadgroups_per_grid.y)
#define MFL_SHARED threadgroup
#define MFL_BARRIER() threadgroup_barrier(mem_flags::mem_threadgroup)
#define MFL_SCALAR(name) (name)
#define MFL_LOAD(p, i) ((float)((p)[i]))
#define MFL_STORE(p, i, v) ((p)[i] = (T)(v))
#define MFL_LOAD4(p, i, v) mfl_load4((p), (i), (v))
#define MFL_STORE4(p, i, v) mfl_store4((p), (i), (v))
#define MFL_VEC_ALIGNED(p) true
"""

_OPENCL = """
#define MFL_TID ((uint32_t)get_local_id(0))
#define MFL_GROUP_X ((int64_t)get_group_id(0))
#define MFL_GROUP_Y ((int64_t)get_group_id(1))
#define MFL_GROUPS_X ((int64_t)get_num_groups(0))
#define MFL_GROUPS_Y ((int64_t)get_num_groups(1))
#define MFL_SHARED __local
#define MFL_BARRIER() barrier(CLK_LOCAL_MEM_FENCE)
#define MFL_SCALAR(name) (name[0])
#define MFL_VEC_ALIGNED(p) ((size_t)(p) % sizeof(*(p)) == 0)
"""

BODY_PRELUDE = {"cuda": _CUDA, "metal": _METAL, "opencl": _OPENCL}

# OpenCL C: the integer names the bodies use, and bfloat16 as 16-bit words.
OPENCL_HEADER = """
typedef uint uint32_t;
typedef long int64_t;
typedef ulong uint64_t;
inline float mfl_bf16_to_float(ushort w) { return as_float(((uint)w) << 16); }
inline ushort mfl_float_to_bf16(float f) {
  uint u = as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (ushort)((u >> 16) | 0x40u);
  return (ushort)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
inline float4 mfl_bf16x4_to_float4(ushort4 w) {
  return (float4)(mfl_bf16_to_float(w.s0), mfl_bf16_to_float(w.s1), mfl_bf16_to_float(w.s2), mfl_bf16_to_float(w.s3));
}
inline ushort4 mfl_float4_to_bf16x4(float4 f) {
  return (ushort4)(mfl_float_to_bf16(f.s0), mfl_float_to_bf16(f.s1), mfl_float_to_bf16(f.s2), mfl_float_to_bf16(f.s3));
}
"""

# OpenCL: how T is declared, loaded and stored, per MLX dtype name.
OPENCL_ELEMENT = {
    "float32": ("float", "((float)((p)[i]))", "((p)[i] = (v))"),
    "float16": ("half", "vload_half((i), (p))", "vstore_half_rte((v), (i), (p))"),
    "bfloat16": ("ushort", "mfl_bf16_to_float((p)[i])", "((p)[i] = mfl_float_to_bf16(v))"),
}
# OpenCL: the 4-wide load (into float4 q_) and store (of float4 q_), per MLX dtype name.
OPENCL_VECTOR = {
    "float32": ("vload4(0, (p) + (i))", "vstore4(q_, 0, (p) + (i))"),
    "float16": ("vload_half4(0, (p) + (i))", "vstore_half4_rte(q_, 0, (p) + (i))"),
    "bfloat16": ("mfl_bf16x4_to_float4(vload4(0, (p) + (i)))", "vstore4(mfl_float4_to_bf16x4(q_), 0, (p) + (i))"),
}

# OpenCL C type of each MLX dtype an input or output may have.
OPENCL_TYPES = {
    "float32": "float",
    "float16": "half",
    "bfloat16": "ushort",
    "uint32": "uint",
    "uint64": "ulong",
    "int32": "int",
    "int64": "long",
}


def opencl_element_defines(element_dtype):
    """The OpenCL lines that make T, MFL_LOAD and MFL_STORE mean `element_dtype`."""
    ctype, load, store = OPENCL_ELEMENT[element_dtype]
    load4, store4 = OPENCL_VECTOR[element_dtype]
    return (
        f"#define T {ctype}\n#define MFL_LOAD(p, i) {load}\n#define MFL_STORE(p, i, v) {store}\n"
        f"#define MFL_LOAD4(p, i, v) {{ const float4 q_ = {load4}; "
        "(v)[0] = q_.s0; (v)[1] = q_.s1; (v)[2] = q_.s2; (v)[3] = q_.s3; }\n"
        f"#define MFL_STORE4(p, i, v) {{ const float4 q_ = (float4)((v)[0], (v)[1], (v)[2], (v)[3]); {store4}; }}\n"
    )
