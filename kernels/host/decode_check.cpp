// Host build of the kernels' NF4 decoding (nf4_decode.cuh), for tests/test_native.py.
//
// Reads one NF4 weight from stdin and writes every decoded weight to stdout, element order, as
// the raw 16-bit pattern of bf16 / fp16 (what the kernels feed their MMAs) or as the fp32 product
// before rounding (dtype 2: so that a one-ulp error in the absmax decode shows), using only the
// __host__ __device__ functions the kernels use (absmax decode, code-pair lookup, product and
// rounding). The test compares the bytes with NF4Weight.dequantize. Built with -ffp-contract=off (the device uses __fmul_rn /
// __fadd_rn); needs no GPU.
//
// stdin, little-endian: int32 dtype (0 bf16, 1 fp16, 2 fp32), int32 double_quant, int32 blocksize,
// int64 numel (even), int64 n_blocks; uint8 packed[numel / 2]; float32 code[16]; then either
// float32 absmax[n_blocks], or uint8 absmax[n_blocks], float32 nested_absmax[ceil(n_blocks / 256)],
// float32 nested_code[256], float32 offset.
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "../nf4_decode.cuh"

namespace {

template <typename V>
void read_exactly(V *out, size_t count) {
  if (std::fread(out, sizeof(V), count, stdin) != count) {
    std::fprintf(stderr, "decode_check: truncated input\n");
    std::exit(2);
  }
}

template <typename T>
void decode_all(const std::vector<uint8_t> &packed, const float *code, const std::vector<float> &absmax, int blocksize) {
  std::vector<uint32_t> out(packed.size());
  for (size_t i = 0; i < packed.size(); ++i) {
    const lt::CodePair c = lt::code_pair(code, packed[i]);
    out[i] = lt::decode_pair<T>(c.high, c.low, absmax[(2 * i) / blocksize]);  // both elements share a block
  }
  std::fwrite(out.data(), sizeof(uint32_t), out.size(), stdout);  // low half first: element order
}

void products_all(const std::vector<uint8_t> &packed, const float *code, const std::vector<float> &absmax, int blocksize) {
  std::vector<float> out(2 * packed.size());
  for (size_t i = 0; i < packed.size(); ++i) {
    const lt::CodePair c = lt::code_pair(code, packed[i]);
    const float scale = absmax[(2 * i) / blocksize];
    out[2 * i] = lt::mul_rn(c.high, scale), out[2 * i + 1] = lt::mul_rn(c.low, scale);
  }
  std::fwrite(out.data(), sizeof(float), out.size(), stdout);
}

}  // namespace

int main() {
  int32_t dtype, double_quant, blocksize;
  int64_t numel, n_blocks;
  read_exactly(&dtype, 1), read_exactly(&double_quant, 1), read_exactly(&blocksize, 1);
  read_exactly(&numel, 1), read_exactly(&n_blocks, 1);
  std::vector<uint8_t> packed(numel / 2);
  float code[16];
  read_exactly(packed.data(), packed.size()), read_exactly(code, 16);
  std::vector<float> absmax(n_blocks);
  if (double_quant) {
    std::vector<uint8_t> q(n_blocks);
    std::vector<float> nested_absmax((n_blocks + lt::kNestedBlock - 1) / lt::kNestedBlock), nested_code(256);
    float offset;
    read_exactly(q.data(), q.size()), read_exactly(nested_absmax.data(), nested_absmax.size());
    read_exactly(nested_code.data(), 256), read_exactly(&offset, 1);
    for (int64_t b = 0; b < n_blocks; ++b)
      absmax[b] = lt::double_quant_absmax(nested_code[q[b]], nested_absmax[b / lt::kNestedBlock], offset);
  } else {
    read_exactly(absmax.data(), absmax.size());
  }
  if (dtype == 0)
    decode_all<__nv_bfloat16>(packed, code, absmax, blocksize);
  else if (dtype == 1)
    decode_all<__half>(packed, code, absmax, blocksize);
  else
    products_all(packed, code, absmax, blocksize);
  return 0;
}
