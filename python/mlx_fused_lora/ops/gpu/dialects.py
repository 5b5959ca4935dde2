"""The three dialects one kernel body is written in: CUDA, Metal and OpenCL C.

A body (``bodies.py``) is C-like code that uses only these names, which each dialect's
prelude defines at the top of the body:

    MFL_TID                 the thread's index in its group (x), uint32_t
    MFL_GROUP_X/Y           the group's index in the grid, int64_t
    MFL_GROUPS_X/Y          the number of groups in the grid, int64_t
    MFL_SHARED_FLOATS(s, n) declares float s[n] in group-shared memory, 16-byte aligned
                            (n a multiple of 4; at the body's top level)
    MFL_SHARED_LOAD4(s, o, v)   float v[4] = s[o..o+3], one 16-byte shared load (o % 4 == 0)
    MFL_SHARED_STORE4(s, o, v)  s[o..o+3] = v[0..3], one 16-byte shared store
    MFL_BARRIER()           a barrier over the group, making shared writes visible
    MFL_UNROLL              before a loop of constant trip count: unroll it (its arrays
                            then stay in registers; ptxas would put them on the stack)
    MFL_SCALAR(name)        a 0-d input: ``name[0]`` in CUDA and OpenCL, ``name`` in Metal
                            (MLX passes 0-d inputs to Metal by reference)
    MFL_LOAD(p, i)          element i of an array of the kernel's element type T, as float
    MFL_STORE(p, i, v)      stores float v as T (round to nearest even)
    MFL_LOAD4(p, i, v)      elements i..i+3 of a T array into float v[4]: one vector load
                            (16 bytes of float32, 8 of 16-bit types)
    MFL_STORE4(p, i, v)     float v[4] into elements i..i+3 as T
    MFL_VEC_ALIGNED(p)      whether p may take MFL_LOAD4/STORE4 at every multiple of 4
                            (CUDA's wide accesses need 4-element alignment and a row-
                            contiguous view may start anywhere; Metal's packed vectors need
                            only the element's; OpenCL follows CUDA's rule, so a sliced
                            view takes on PoCL the path it takes on CUDA)
    MFL_QUAD_LOAD(p, i, count, vec, v), MFL_QUAD_STORE(p, i, count, vec, v)
                            the first `count` (>= 1) of elements i..i+3, the rest of v 0:
                            MFL_LOAD4/STORE4 when `vec`, else one element at a time
    MFL_MULT(index)         the dropout multiplier of flat element `index` (bodies that
                            start with ``MASK``, taking key, dropout and index_base)
    MFL_ROW, MFL_SEGMENT    the rows of a segment of rows of one adapter (bodies that
                            start with ``SEGMENTS``, taking order and segments)
    uint32_t, int64_t, uint64_t

and C casts (``(int64_t)(x)``), never C++ ones, because OpenCL C is C. Template
parameters (``T``, ``R``, ``TG``, ...) arrive as MLX makes them: ``constexpr``/``using``
lines in CUDA, template parameters in Metal, ``#define`` lines in OpenCL (the runner,
``opencl.py``, writes those). The per-element mask math is ``csrc/kernels/lora_dropout.h``
with ``MFL_FN`` defined per dialect.

No warp/SIMD intrinsics and no tensor-core matrices (Metal ``simdgroup_matrix``, CUDA
WMMA): PoCL has no subgroups, so a body using them could not run in CI, and a kernel
nobody ran is not shipped. The rank-r products are register tiles fed by 16-byte shared
loads instead (``bodies.py``).

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

# Metal: one packed-vector access per call (packed vectors need only the element's
# alignment, so any view qualifies); bfloat16 is read as its 16-bit words, whatever
# MLX's bfloat16_t is (Metal's bfloat or MLX's struct). Inputs MLX puts in `constant`
# (fewer than 8 elements) take the element-wise overload.
_METAL_VECTOR = """
#ifndef MFL_VECTOR_HELPERS
#define MFL_VECTOR_HELPERS
inline void mfl_load4(const device float* p, uint64_t i, thread float* v) {
  const packed_float4 q = *(const device packed_float4*)(p + i);
  v[0] = q.x; v[1] = q.y; v[2] = q.z; v[3] = q.w;
}
inline void mfl_load4(const device half* p, uint64_t i, thread float* v) {
  const packed_half4 q = *(const device packed_half4*)(p + i);
  v[0] = float(q.x); v[1] = float(q.y); v[2] = float(q.z); v[3] = float(q.w);
}
inline void mfl_load4(const device bfloat16_t* p, uint64_t i, thread float* v) {
  const packed_ushort4 q = *(const device packed_ushort4*)(p + i);
  v[0] = as_type<float>(uint(q.x) << 16); v[1] = as_type<float>(uint(q.y) << 16);
  v[2] = as_type<float>(uint(q.z) << 16); v[3] = as_type<float>(uint(q.w) << 16);
}
template <typename U>
inline void mfl_load4(const constant U* p, uint64_t i, thread float* v) {
  for (int j = 0; j < 4; ++j) v[j] = float(p[i + j]);
}
inline void mfl_store4(device float* p, uint64_t i, const thread float* v) {
  packed_float4 q;
  q.x = v[0]; q.y = v[1]; q.z = v[2]; q.w = v[3];
  *(device packed_float4*)(p + i) = q;
}
inline void mfl_store4(device half* p, uint64_t i, const thread float* v) {
  packed_half4 q;
  q.x = half(v[0]); q.y = half(v[1]); q.z = half(v[2]); q.w = half(v[3]);
  *(device packed_half4*)(p + i) = q;
}
inline void mfl_store4(device bfloat16_t* p, uint64_t i, const thread float* v) {
  for (int j = 0; j < 4; ++j) p[i + j] = bfloat16_t(v[j]);
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
#define MFL_SHARED_FLOATS(s, n) __shared__ float4 s##_v4[(n) / 4]; float* s = (float*)(s##_v4)
#define MFL_SHARED_LOAD4(s, o, v) { const float4 q_ = *reinterpret_cast<const float4*>(&(s)[o]); \\
    (v)[0] = q_.x; (v)[1] = q_.y; (v)[2] = q_.z; (v)[3] = q_.w; }
#define MFL_SHARED_STORE4(s, o, v) { *reinterpret_cast<float4*>(&(s)[o]) = make_float4((v)[0], (v)[1], (v)[2], (v)[3]); }
#define MFL_BARRIER() __syncthreads()
#define MFL_UNROLL _Pragma("unroll")
#define MFL_SCALAR(name) (name[0])
#define MFL_LOAD(p, i) ((float)((p)[i]))
#define MFL_STORE(p, i, v) ((p)[i] = (T)(v))
#define MFL_LOAD4(p, i, v) mfl_load4((p), (i), (v))
#define MFL_STORE4(p, i, v) mfl_store4((p), (i), (v))
#define MFL_VEC_ALIGNED(p) ((size_t)(p) % (4 * sizeof(*(p))) == 0)
"""

# MFL_SHARED_STORAGE is empty on Metal; tests/metal_shim.h sets it to `static`, as clang
# has no automatic variables in an address space.
_METAL = """
#ifndef MFL_SHARED_STORAGE
#define MFL_SHARED_STORAGE
#endif
#define MFL_TID ((uint32_t)thread_position_in_threadgroup.x)
#define MFL_GROUP_X ((int64_t)threadgroup_position_in_grid.x)
#define MFL_GROUP_Y ((int64_t)threadgroup_position_in_grid.y)
#define MFL_GROUPS_X ((int64_t)threadgroups_per_grid.x)
#define MFL_GROUPS_Y ((int64_t)threadgroups_per_grid.y)
#define MFL_SHARED_FLOATS(s, n) MFL_SHARED_STORAGE threadgroup float4 s##_v4[(n) / 4]; \\
    threadgroup float* s = (threadgroup float*)(s##_v4)
#define MFL_SHARED_LOAD4(s, o, v) { const float4 q_ = *(const threadgroup float4*)(&(s)[o]); \\
    (v)[0] = q_.x; (v)[1] = q_.y; (v)[2] = q_.z; (v)[3] = q_.w; }
#define MFL_SHARED_STORE4(s, o, v) { float4 q_; q_.x = (v)[0]; q_.y = (v)[1]; q_.z = (v)[2]; q_.w = (v)[3]; \\
    *(threadgroup float4*)(&(s)[o]) = q_; }
#define MFL_BARRIER() threadgroup_barrier(mem_flags::mem_threadgroup)
#define MFL_UNROLL _Pragma("unroll")
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
#define MFL_SHARED_FLOATS(s, n) __local float4 s##_v4[(n) / 4]; __local float* s = (__local float*)(s##_v4)
#define MFL_SHARED_LOAD4(s, o, v) { const float4 q_ = vload4(0, &(s)[o]); \\
    (v)[0] = q_.s0; (v)[1] = q_.s1; (v)[2] = q_.s2; (v)[3] = q_.s3; }
#define MFL_SHARED_STORE4(s, o, v) { vstore4((float4)((v)[0], (v)[1], (v)[2], (v)[3]), 0, &(s)[o]); }
#define MFL_BARRIER() barrier(CLK_LOCAL_MEM_FENCE)
#define MFL_UNROLL _Pragma("unroll")
#define MFL_SCALAR(name) (name[0])
#define MFL_VEC_ALIGNED(p) ((size_t)(p) % (4 * sizeof(*(p))) == 0)
"""

# Every dialect: a quad of a row, vector-wide where it may be, element-wise at a tail.
_QUADS = """
#define MFL_QUAD_LOAD(p, i, count, vec, v) { if (vec) { MFL_LOAD4(p, i, v); } else { \\
    MFL_UNROLL for (int q_ = 0; q_ < 4; ++q_) { (v)[q_] = q_ < (count) ? MFL_LOAD(p, (i) + q_) : 0.0f; } } }
#define MFL_QUAD_STORE(p, i, count, vec, v) { if (vec) { MFL_STORE4(p, i, v); } else { \\
    MFL_UNROLL for (int q_ = 0; q_ < 4; ++q_) { if (q_ < (count)) { MFL_STORE(p, (i) + q_, (v)[q_]); } } } }
"""

# The dropout mask state and MFL_MULT(index), the multiplier of flat element `index` (1 at
# p = 0), for the bodies that apply dropout (after the prelude; needs key, dropout and
# index_base inputs).
MASK = """
const float mfl_p = MFL_SCALAR(dropout);
const uint64_t mfl_base = MFL_SCALAR(index_base);
const uint32_t mfl_threshold = mfl_keep_threshold(mfl_p);
const float mfl_keep = mfl_keep_scale(mfl_p);
#define MFL_MULT(index) (mfl_p > 0.0f ? mfl_dropout_multiplier(mfl_dropout_bits(key[0], key[1], \\
    (uint32_t)(mfl_base + (index)), (uint32_t)((mfl_base + (index)) >> 32)), mfl_threshold, mfl_keep) : 1.0f)
"""

# The rows of the bodies that walk segments of rows (after the prelude; they take the
# `order` and `segments` inputs and a MIXED template parameter). With mixed adapters
# (MIXED = 1) the op groups the rows by adapter (ops/gpu/grouping.py): `order` lists the
# rows adapter by adapter and `segments` cuts that order into segments of rows of one
# adapter each, (first position, end position, adapter) per segment, -1 for rows on the
# base alone. The single-adapter op (MIXED = 0) is its n = 1 case with the identity order
# and segments of `span` rows on adapter 0, computed here (its two inputs are unread).
#   MFL_ROW(pos)        the row at position pos of the order
#   MFL_SEGMENT(seg, span, rows, p0, p1, adapter)   segment seg: positions [p0, p1), adapter
SEGMENTS = """
#define MFL_ROW(pos) (MIXED ? (int64_t)(order[pos]) : (int64_t)(pos))
#define MFL_SEGMENT(seg, span, rows, p0, p1, adapter) { if (MIXED) { \\
    p0 = segments[3 * (seg)]; p1 = segments[3 * (seg) + 1]; adapter = segments[3 * (seg) + 2]; } else { \\
    p0 = (seg) * (span); p1 = p0 + (span) < (rows) ? p0 + (span) : (rows); adapter = 0; } }
"""

BODY_PRELUDE = {"cuda": _CUDA + _QUADS, "metal": _METAL + _QUADS, "opencl": _OPENCL + _QUADS}

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
