// Per-element math of the fused LoRA op, written once for every backend.
//
// The C++ CPU extension #includes this file; the GPU backends read it as text into
// the `header=` of mx.fast.cuda_kernel / mx.fast.metal_kernel. So it may use only
// what C++, CUDA and Metal share: 32-bit unsigned and float arithmetic, no std::,
// no pointers to host memory. A backend may define MFL_FN before including it
// (e.g. `__device__ inline` for CUDA); the default suits C++ and Metal.
//
// Dropout is counter based: whether element `index` of x is kept under `key` is a
// pure function of (key, index). The forward and the backward recompute it where
// they need it, so no mask and no dropped copy of x is ever stored, and the same
// key gives the same mask on every backend, bit for bit.
//
//   index  the flat, row-major element index of x (all leading dims flattened),
//          split into 32-bit halves (lo, hi) so every backend does 32-bit math;
//   key    the two uint32 words of an mx.random.key;
//   keep   bits(key, index) < keep_threshold(p), which holds with probability
//          keep_threshold / 2^32 = 1 - p (to within 2^-32);
//   value  a kept element is scaled by 1 / (1 - p), a dropped one is 0.
#ifndef MLX_FUSED_LORA_KERNELS_LORA_DROPOUT_H
#define MLX_FUSED_LORA_KERNELS_LORA_DROPOUT_H

#ifndef MFL_FN
#define MFL_FN inline
#endif

// A 32-bit finalizer with full avalanche (a bijection on 32 bits), so consecutive
// indices give independent-looking bits.
MFL_FN unsigned int mfl_mix32(unsigned int h) {
  h ^= h >> 16;
  h *= 0x7feb352dU;
  h ^= h >> 15;
  h *= 0x846ca68bU;
  h ^= h >> 16;
  return h;
}

// Two rounds: the first decorrelates the index from key[0]; the second folds in
// key[1] and the index's high word, so keys that differ in either word give
// unrelated masks.
MFL_FN unsigned int mfl_dropout_bits(unsigned int key0, unsigned int key1, unsigned int index_lo,
                                     unsigned int index_hi) {
  return mfl_mix32(mfl_mix32(index_lo ^ key0) ^ (key1 + index_hi * 0x9E3779B9U));
}

// Computed in float32 so that every backend rounds it identically:
// (1 - p) rounds once, the product with 2^32 is exact.
MFL_FN unsigned int mfl_keep_threshold(float p) {
  float t = (1.0f - p) * 4294967296.0f;
  return t >= 4294967295.0f ? 0xFFFFFFFFU : (unsigned int)t;
}

MFL_FN float mfl_keep_scale(float p) { return 1.0f / (1.0f - p); }

// The multiplier dropout applies to one element: keep_scale if kept, else 0.
MFL_FN float mfl_dropout_multiplier(unsigned int bits, unsigned int threshold, float keep_scale) {
  return bits < threshold ? keep_scale : 0.0f;
}

#endif  // MLX_FUSED_LORA_KERNELS_LORA_DROPOUT_H
