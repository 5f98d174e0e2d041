// NF4 decoding exactly as lora_triton's NF4Weight.dequantize does it, for the kernels and the host.
//
// Every function here is __host__ __device__: the CUDA kernels call them, and the host test
// program (kernels/host/decode_check.cu, run by tests/test_native.py) compiles the same code for
// the CPU and compares it bit for bit with NF4Weight.dequantize on all 256 byte values.
//
//   absmax (double quant) = nested_code[q] * nested_absmax[block / 256] + offset   (two roundings)
//   w                     = code[nibble] * absmax, in fp32, rounded once to bf16 / fp16 (RNE)
//
// Neither step may become an FMA (one rounding less than the reference): the device uses the
// __fmul_rn / __fadd_rn intrinsics, which are never contracted; the host build passes
// -ffp-contract=off.
#pragma once

#include <cstdint>
#include <cstring>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#if defined(__CUDACC__)
#define LT_HD __host__ __device__ __forceinline__
#else
#define LT_HD inline
#endif

namespace lt {

constexpr int kNestedBlock = 256;  // blocks per nested absmax of double quantization

LT_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

LT_HD float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

// The float32 scale of one block from its double-quantized code q: nested_code[q] * nested
// absmax of the block's group of 256, then + offset.
LT_HD float double_quant_absmax(float nested_code_of_q, float nested_absmax, float offset) {
  return add_rn(mul_rn(nested_code_of_q, nested_absmax), offset);
}

LT_HD uint32_t high_nibble(uint32_t byte) { return (byte >> 4) & 15u; }
LT_HD uint32_t low_nibble(uint32_t byte) { return byte & 15u; }

// The 32 bits of a bf16x2 / half2 pair (.x in the low half) as one register: no repacking.
template <typename Pair>
LT_HD uint32_t bits(Pair pair) {
  static_assert(sizeof(Pair) == sizeof(uint32_t), "a pair of 16-bit values");
  uint32_t word;
  std::memcpy(&word, &pair, sizeof(word));
  return word;
}

// Two values of the activation dtype in one 32-bit word, `first` in the low half: the order of
// two K-neighbours in memory and in an MMA fragment register.
template <typename T>
struct Pack;

template <>
struct Pack<__nv_bfloat16> {
  LT_HD static uint32_t pair(float first, float second) {
    return bits(__floats2bfloat162_rn(first, second));
  }
  LT_HD static float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
  LT_HD static __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
};

template <>
struct Pack<__half> {
  LT_HD static uint32_t pair(float first, float second) {
    return bits(__floats2half2_rn(first, second));
  }
  LT_HD static float to_float(__half v) { return __half2float(v); }
  LT_HD static __half from_float(float v) { return __float2half_rn(v); }
};

// One packed byte -> its two weights (high nibble = first element), given the code values of
// its nibbles and the block's absmax.
template <typename T>
LT_HD uint32_t decode_pair(float code_of_high, float code_of_low, float absmax) {
  return Pack<T>::pair(mul_rn(code_of_high, absmax), mul_rn(code_of_low, absmax));
}

// Both code values of `byte` from the 16-entry code book: entry `byte` of the 256-entry pair
// table the shared-memory variant builds.
struct CodePair {
  float high, low;
};

LT_HD CodePair code_pair(const float *code, uint32_t byte) {
  return CodePair{code[high_nibble(byte)], code[low_nibble(byte)]};
}

}  // namespace lt
