// Decode-size (M <= 16) QLoRA forward on bitsandbytes' NF4 bytes: the kernels, the per-shape
// plan and the C entry points of nf4_lora.h. Design and measurements: kernels/README.md.
//
// One kernel template, two launches on the caller's stream:
//   1. shrink   S^T [r, M]  = A [r, K] @ x^T      (dense bf16/fp16 rows)   -> S [M, r]
//   2. main     y^T [N, M]  = W [N, K] @ x^T      (NF4 rows, decoded in registers), whose
//               epilogue adds scale * S @ B^T + bias and stores y [M, N].
// Swap-AB: the weight rows are the M side of mma.sync m16n8k16 (fp32 accumulators) and the tokens
// its N side (one or two 8-token tiles). The K order inside an MMA is free, so each lane feeds it
// 32 consecutive K of a row from one 16-byte load (the lane's k slots of step s are K values
// 4s..4s+3 of its 32), and reads x the same way: no shuffles, no shared-memory staging.
// A CTA of 4 warps owns 16 * kRowTiles rows and one K range (split-K); its warps take the K
// chunks of that range in turn, their sums are added in warp order in shared memory, and with
// split-K each CTA writes an fp32 partial and bumps its tile's counter: the CTA that arrives last
// adds the partials in split order (the same order whoever is last) and runs the epilogue.
// No atomics on data, so the result is deterministic.
#include <cuda_runtime.h>

#include <cstdio>
#include <type_traits>

#include "nf4_decode.cuh"
#include "nf4_lora.h"

namespace lt {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kLaneK = 32;              // consecutive K per lane and chunk: 16 bytes of NF4 codes
constexpr int kChunkK = 4 * kLaneK;     // K per warp and chunk: the 4 lanes of a quad side by side
constexpr int kSteps = kLaneK / 4;      // MMA steps per chunk (4 K values per lane and step)
constexpr int kMaxTokens = 16;
constexpr int kMaxRank = 128;
constexpr int kMinBlocksPerSM = 4;      // register cap 128: four CTAs resident keep ~64 KB of loads in flight
constexpr unsigned kFullMask = 0xffffffffu;

// ---------------------------------------------------------------------------------- MMA
template <typename T>
__device__ __forceinline__ void mma_16x8x16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// 32 consecutive values of a dense row (64 bytes, four 16-byte loads), 0 outside the matrix.
template <typename T>
__device__ __forceinline__ void load_dense_run(uint32_t (&w)[16], const T *row_base, bool inside, int k0) {
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    uint4 v = inside ? __ldg(reinterpret_cast<const uint4 *>(row_base + k0) + i) : make_uint4(0, 0, 0, 0);
    w[4 * i] = v.x, w[4 * i + 1] = v.y, w[4 * i + 2] = v.z, w[4 * i + 3] = v.w;
  }
}

// ---------------------------------------------------------------------------------- row sources
// A row source gives, per lane, the raw data of 32 consecutive K of one row (`load`) and the
// two A-fragment words of MMA step s from it (`fragment`: K values 4s, 4s+1 and 4s+2, 4s+3).

// Dense rows in the activation dtype: the LoRA A [r, K] of the shrink.
template <typename T>
struct DenseRows {
  const T *base;
  int rows, k;
  struct Raw {
    uint32_t w[16];
  };
  __device__ void prepare() {}
  __device__ __forceinline__ Raw load(int row, int k0) const {
    Raw raw;
    load_dense_run(raw.w, base + static_cast<int64_t>(row) * k, row < rows && k0 < k, k0);
    return raw;
  }
  __device__ __forceinline__ void fragment(const Raw &raw, int step, uint32_t &lo, uint32_t &hi) const {
    lo = raw.w[2 * step], hi = raw.w[2 * step + 1];
  }
};

// NF4 rows exactly as bitsandbytes stores them; kTable says where the 16 code values live.
template <typename T, bool kDoubleQuant, int kTable>
struct Nf4Rows {
  const uint8_t *packed;
  const void *absmax;
  const float *code, *nested_absmax, *nested_code;
  float offset;
  int rows, k, log2_blocksize;
  float lane_code;      // LT_TABLE_REGISTER: code[lane % 16], read by the others with a shuffle
  const float2 *pairs;  // LT_TABLE_SHARED: byte -> (code[high nibble], code[low nibble])

  struct Raw {
    uint32_t w[4];  // 16 bytes = 32 codes
    float absmax;   // one block covers them: blocks are >= 32 and the run starts on a multiple of 32
  };

  __device__ void prepare() {
    if constexpr (kTable == LT_TABLE_SHARED) {
      __shared__ float2 table[256];
      for (int byte = threadIdx.x; byte < 256; byte += kThreads) {
        CodePair c = code_pair(code, byte);
        table[byte] = make_float2(c.high, c.low);
      }
      __syncthreads();
      pairs = table;
    } else {
      lane_code = __ldg(code + (threadIdx.x & 15));
    }
  }

  __device__ __forceinline__ float block_absmax(int64_t block) const {
    if constexpr (kDoubleQuant) {
      const uint32_t q = __ldg(static_cast<const uint8_t *>(absmax) + block);
      return double_quant_absmax(__ldg(nested_code + q), __ldg(nested_absmax + block / kNestedBlock), offset);
    } else {
      return __ldg(static_cast<const float *>(absmax) + block);
    }
  }

  __device__ __forceinline__ Raw load(int row, int k0) const {
    Raw raw;
    if (row < rows && k0 < k) {
      const int64_t first = static_cast<int64_t>(row) * k + k0;
      const uint4 v = __ldcs(reinterpret_cast<const uint4 *>(packed + first / 2));  // read once: evict first
      raw.w[0] = v.x, raw.w[1] = v.y, raw.w[2] = v.z, raw.w[3] = v.w;
      raw.absmax = block_absmax(first >> log2_blocksize);
    } else {
      raw.w[0] = raw.w[1] = raw.w[2] = raw.w[3] = 0x77777777u;  // code 7 is 0.0
      raw.absmax = 0.0f;
    }
    return raw;
  }

  __device__ __forceinline__ uint32_t decode(uint32_t byte, float absmax) const {
    if constexpr (kTable == LT_TABLE_SHARED) {
      const float2 c = pairs[byte];
      return decode_pair<T>(c.x, c.y, absmax);
    } else {  // every lane decodes in lockstep, so the full-warp shuffles are safe
      const float high = __shfl_sync(kFullMask, lane_code, high_nibble(byte));
      const float low = __shfl_sync(kFullMask, lane_code, low_nibble(byte));
      return decode_pair<T>(high, low, absmax);
    }
  }

  __device__ __forceinline__ void fragment(const Raw &raw, int step, uint32_t &lo, uint32_t &hi) const {
    const uint32_t word = raw.w[step / 2] >> (16 * (step % 2));  // bytes 2*step and 2*step + 1
    lo = decode(word & 0xffu, raw.absmax);
    hi = decode((word >> 8) & 0xffu, raw.absmax);
  }
};

// ---------------------------------------------------------------------------------- epilogues
// An epilogue gets the CTA's finished sums, tile_sum[token * kTileRows + row] (fp32, rows of the
// tile in order, tokens < m), and stores the outputs of its rows.

// S [m, r] = the shrink's sums, in the activation dtype.
template <typename T>
struct StoreS {
  T *s;
  int r;
  template <int kTileRows>
  __device__ void store(const float *tile_sum, int row0, int m) const {
    for (int e = threadIdx.x; e < kTileRows * m; e += kThreads) {
      const int token = e / kTileRows, j = row0 + e % kTileRows;
      if (j < r) s[token * r + j] = Pack<T>::from_float(tile_sum[e]);
    }
  }
};

// y [m, N] = sums + scale * S @ B^T + bias, rounded once to the activation dtype. S is the
// shrink's output, already rounded to the activation dtype (as the reference rounds it).
template <typename T>
struct AddLoraAndBias {
  const T *s, *lora_b, *bias;
  T *y;
  int n, r;
  float scale;
  template <int kTileRows>
  __device__ void store(const float *tile_sum, int row0, int m) const {
    __shared__ float s_tile[kMaxTokens * kMaxRank];
    for (int i = threadIdx.x; i < m * r; i += kThreads) s_tile[i] = Pack<T>::to_float(s[i]);
    __syncthreads();
    for (int e = threadIdx.x; e < kTileRows * m; e += kThreads) {
      const int token = e / kTileRows, row = row0 + e % kTileRows;
      if (row >= n) continue;
      const T *b_row = lora_b + static_cast<int64_t>(row) * r;
      float lora = 0.0f;
      for (int j = 0; j < r; ++j) lora = fmaf(Pack<T>::to_float(b_row[j]), s_tile[token * r + j], lora);
      float value = tile_sum[e] + scale * lora;
      if (bias != nullptr) value += Pack<T>::to_float(bias[row]);
      y[static_cast<int64_t>(token) * n + row] = Pack<T>::from_float(value);
    }
  }
};

// ---------------------------------------------------------------------------------- the kernel
template <typename T>
struct Tokens {
  const T *x;
  int m, k;
};

struct SplitK {
  int chunks, chunks_per_split, split_k, tiles;
  float *workspace;  // [split_k][tiles][kTileRows * m] fp32 partials (split_k > 1)
  int32_t *counters; // [tiles], zero between launches
};

// Grid (tiles, split_k), kThreads threads. Row tile blockIdx.x, K chunks of split blockIdx.y.
template <typename T, typename Rows, typename Epilogue, int kRowTiles, int kTokenTiles>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSM)
    gemv_kernel(Rows rows, Tokens<T> tokens, Epilogue epilogue, SplitK split) {
  constexpr int kTileRows = 16 * kRowTiles;
  __shared__ float warp_sums[kWarps][kTileRows][kMaxTokens];
  __shared__ float tile_sum[kTileRows * kMaxTokens];
  __shared__ int arrived_last;

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int group = lane / 4, quad_lane = lane % 4;  // MMA fragment coordinates
  const int row0 = blockIdx.x * kTileRows;
  rows.prepare();

  float acc[kRowTiles][kTokenTiles][4] = {};
  const int chunk_end = min((blockIdx.y + 1) * split.chunks_per_split, split.chunks);
  for (int chunk = blockIdx.y * split.chunks_per_split + warp; chunk < chunk_end; chunk += kWarps) {
    const int k0 = chunk * kChunkK + quad_lane * kLaneK;
    typename Rows::Raw raw[kRowTiles][2];  // rows group and group + 8 of each 16-row tile
#pragma unroll
    for (int t = 0; t < kRowTiles; ++t) {
      raw[t][0] = rows.load(row0 + 16 * t + group, k0);
      raw[t][1] = rows.load(row0 + 16 * t + group + 8, k0);
    }
    uint32_t x_run[kTokenTiles][16];  // tokens group and group + 8
#pragma unroll
    for (int u = 0; u < kTokenTiles; ++u) {
      const int token = 8 * u + group;
      load_dense_run(x_run[u], tokens.x + static_cast<int64_t>(token) * tokens.k, token < tokens.m && k0 < tokens.k, k0);
    }
#pragma unroll
    for (int step = 0; step < kSteps; ++step) {
#pragma unroll
      for (int t = 0; t < kRowTiles; ++t) {
        uint32_t a[4];
        rows.fragment(raw[t][0], step, a[0], a[2]);
        rows.fragment(raw[t][1], step, a[1], a[3]);
#pragma unroll
        for (int u = 0; u < kTokenTiles; ++u) mma_16x8x16<T>(acc[t][u], a, x_run[u][2 * step], x_run[u][2 * step + 1]);
      }
    }
  }

  // the warps' sums, added in warp order
#pragma unroll
  for (int t = 0; t < kRowTiles; ++t)
#pragma unroll
    for (int u = 0; u < kTokenTiles; ++u)
#pragma unroll
      for (int c = 0; c < 4; ++c) warp_sums[warp][16 * t + group + 8 * (c / 2)][8 * u + 2 * quad_lane + c % 2] = acc[t][u][c];
  __syncthreads();
  const int elements = kTileRows * tokens.m;
  for (int e = threadIdx.x; e < elements; e += kThreads) {
    float sum = 0.0f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) sum += warp_sums[w][e % kTileRows][e / kTileRows];
    tile_sum[e] = sum;
  }

  if (split.split_k > 1) {  // deterministic split-K: the last CTA of the tile adds the partials in split order
    float *partials = split.workspace + static_cast<int64_t>(blockIdx.x) * elements;
    const int64_t split_stride = static_cast<int64_t>(split.tiles) * elements;
    for (int e = threadIdx.x; e < elements; e += kThreads) partials[blockIdx.y * split_stride + e] = tile_sum[e];
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) arrived_last = atomicAdd(split.counters + blockIdx.x, 1) == split.split_k - 1;
    __syncthreads();
    if (!arrived_last) return;
    __threadfence();
    for (int e = threadIdx.x; e < elements; e += kThreads) {
      float sum = 0.0f;
      for (int s = 0; s < split.split_k; ++s) sum += __ldcg(partials + s * split_stride + e);
      tile_sum[e] = sum;
    }
    if (threadIdx.x == 0) split.counters[blockIdx.x] = 0;  // zero again for the next launch
  }
  __syncthreads();
  epilogue.template store<kTileRows>(tile_sum, row0, tokens.m);
}

// ---------------------------------------------------------------------------------- planning
thread_local char last_error[512] = "";

int fail(int status, const char *what) {
  std::snprintf(last_error, sizeof(last_error), "%s", what);
  return status;
}

int fail_cuda(cudaError_t err, const char *where) {
  std::snprintf(last_error, sizeof(last_error), "%s: %s (%s)", where, cudaGetErrorString(err), cudaGetErrorName(err));
  return LT_ERR_CUDA;
}

int ceil_div(int a, int b) { return (a + b - 1) / b; }

struct LaunchShape {
  int row_tiles, tiles, chunks, chunks_per_split, split_k;
  size_t partial_floats;  // fp32 workspace of the split-K partials
};

// Splits of `chunks` over `tiles` row tiles so that about `ctas_wanted` CTAs run, every split
// keeping at least one chunk per warp (requested > 0: that many, as far as K allows).
LaunchShape launch_shape(int rows, int row_tiles, int k, int m, int requested_split, int ctas_wanted) {
  LaunchShape shape{};
  shape.row_tiles = row_tiles;
  shape.tiles = ceil_div(rows, 16 * row_tiles);
  shape.chunks = ceil_div(k, kChunkK);
  int split = requested_split > 0 ? requested_split : ceil_div(ctas_wanted, shape.tiles);
  split = max(1, min(split, requested_split > 0 ? shape.chunks : ceil_div(shape.chunks, kWarps)));
  shape.chunks_per_split = ceil_div(shape.chunks, split);
  shape.split_k = ceil_div(shape.chunks, shape.chunks_per_split);  // no empty split
  shape.partial_floats = shape.split_k > 1 ? static_cast<size_t>(shape.split_k) * shape.tiles * 16 * row_tiles * m : 0;
  return shape;
}

struct Plan {
  LaunchShape shrink, main;
  size_t workspace_bytes;
  int counters;
};

int make_plan(int m, int n, int k, int r, const lt_config *config, int num_sms, Plan *plan) {
  if (m < 1 || m > kMaxTokens) return fail(LT_ERR_INVALID, "M (tokens) must be in 1..16");
  if (n < 1) return fail(LT_ERR_INVALID, "N (out_features) must be positive");
  if (k < kLaneK || k % kLaneK) return fail(LT_ERR_INVALID, "K (in_features) must be a positive multiple of 32");
  if (r < 1 || r > kMaxRank) return fail(LT_ERR_INVALID, "the LoRA rank must be in 1..128");
  const lt_config defaults{0, 0, LT_TABLE_SHARED};
  const lt_config &c = config ? *config : defaults;
  if (c.split_k < 0) return fail(LT_ERR_INVALID, "config.split_k must be >= 0");
  if (c.row_tiles != 0 && c.row_tiles != 2 && c.row_tiles != 4) return fail(LT_ERR_INVALID, "config.row_tiles must be 0, 2 or 4");
  if (c.table != LT_TABLE_SHARED && c.table != LT_TABLE_REGISTER) return fail(LT_ERR_INVALID, "config.table must be 0 or 1");
  if (num_sms <= 0) {
    int device = 0;
    cudaError_t err = cudaGetDevice(&device);
    if (err == cudaSuccess) err = cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount, device);
    if (err != cudaSuccess) return fail_cuda(err, "asking the multiprocessor count");
  }
  const int ctas_wanted = kMinBlocksPerSM * num_sms;  // one wave of resident CTAs
  const int row_tiles = c.row_tiles ? c.row_tiles : (n >= 1024 ? 4 : 2);  // 64 rows share each x load; 32 for small N
  plan->main = launch_shape(n, row_tiles, k, m, c.split_k, ctas_wanted);
  plan->shrink = launch_shape(r, 1, k, m, 0, ctas_wanted);
  plan->workspace_bytes = (plan->main.partial_floats + plan->shrink.partial_floats) * sizeof(float);
  plan->counters = (plan->main.split_k > 1 ? plan->main.tiles : 0) + (plan->shrink.split_k > 1 ? plan->shrink.tiles : 0);
  return LT_OK;
}

// ---------------------------------------------------------------------------------- launching
template <typename T, typename Rows, typename Epilogue, int kRowTiles>
void launch_with_rows(const Rows &rows, const Tokens<T> &tokens, const Epilogue &epilogue, const SplitK &split,
                      cudaStream_t stream) {
  const dim3 grid(split.tiles, split.split_k);
  if (tokens.m <= 8)
    gemv_kernel<T, Rows, Epilogue, kRowTiles, 1><<<grid, kThreads, 0, stream>>>(rows, tokens, epilogue, split);
  else
    gemv_kernel<T, Rows, Epilogue, kRowTiles, 2><<<grid, kThreads, 0, stream>>>(rows, tokens, epilogue, split);
}

template <typename T, bool kDoubleQuant, int kTable>
void launch_main(const lt_nf4_weight &w, const Tokens<T> &tokens, const AddLoraAndBias<T> &epilogue,
                 const SplitK &split, int row_tiles, cudaStream_t stream) {
  using Rows = Nf4Rows<T, kDoubleQuant, kTable>;
  const Rows rows{w.packed, w.absmax, w.code, w.nested_absmax, w.nested_code, w.offset,
                                              w.n, w.k, __builtin_ctz(static_cast<unsigned>(w.blocksize)), 0.0f, nullptr};
  if (row_tiles == 4)
    launch_with_rows<T, Rows, AddLoraAndBias<T>, 4>(rows, tokens, epilogue, split, stream);
  else
    launch_with_rows<T, Rows, AddLoraAndBias<T>, 2>(rows, tokens, epilogue, split, stream);
}

SplitK split_of(const LaunchShape &shape, float *workspace, int32_t *counters) {
  return SplitK{shape.chunks, shape.chunks_per_split, shape.split_k, shape.tiles, workspace, counters};
}

template <typename T>
int forward(const T *x, int m, const lt_nf4_weight &w, const T *lora_a, const T *lora_b, int r, float scale,
            const T *bias, T *y, T *s, const Plan &plan, int table, float *workspace, int32_t *counters,
            cudaStream_t stream) {
  const Tokens<T> tokens{x, m, w.k};
  // 1. S = x @ A^T
  const SplitK shrink_split = split_of(plan.shrink, workspace, counters);
  launch_with_rows<T, DenseRows<T>, StoreS<T>, 1>(DenseRows<T>{lora_a, r, w.k}, tokens, StoreS<T>{s, r},
                                                  shrink_split, stream);
  // 2. y = x @ dequant(W)^T + scale * S @ B^T + bias
  const SplitK main_split = split_of(plan.main, workspace + plan.shrink.partial_floats,
                                     counters + (plan.shrink.split_k > 1 ? plan.shrink.tiles : 0));
  const AddLoraAndBias<T> epilogue{s, lora_b, bias, y, w.n, r, scale};
  const int rt = plan.main.row_tiles;
  if (w.double_quant) {
    if (table == LT_TABLE_SHARED) launch_main<T, true, LT_TABLE_SHARED>(w, tokens, epilogue, main_split, rt, stream);
    else launch_main<T, true, LT_TABLE_REGISTER>(w, tokens, epilogue, main_split, rt, stream);
  } else {
    if (table == LT_TABLE_SHARED) launch_main<T, false, LT_TABLE_SHARED>(w, tokens, epilogue, main_split, rt, stream);
    else launch_main<T, false, LT_TABLE_REGISTER>(w, tokens, epilogue, main_split, rt, stream);
  }
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? LT_OK : fail_cuda(err, "launching the NF4 LoRA kernels");
}

bool aligned16(const void *p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Makes a device current for the scope of a call and restores the one that was current before.
class DeviceScope {
 public:
  DeviceScope() = default;
  DeviceScope(const DeviceScope &) = delete;
  DeviceScope &operator=(const DeviceScope &) = delete;
  cudaError_t select(int device) {
    cudaError_t err = cudaGetDevice(&previous_);
    if (err != cudaSuccess || previous_ == device) return err;
    err = cudaSetDevice(device);
    if (err == cudaSuccess) switched_ = true;
    return err;
  }
  ~DeviceScope() {
    if (switched_) cudaSetDevice(previous_);
  }

 private:
  int previous_ = -1;
  bool switched_ = false;
};

}  // namespace lt

// ---------------------------------------------------------------------------------- C interface
extern "C" {

int lt_abi_version(void) { return LT_ABI_VERSION; }

const char *lt_last_error(void) { return lt::last_error; }

int lt_nf4_lora_plan(int m, int n, int k, int r, const lt_config *config, int num_sms, lt_plan *out) {
  if (out == nullptr) return lt::fail(LT_ERR_INVALID, "plan must not be NULL");
  lt::Plan plan{};
  const int status = lt::make_plan(m, n, k, r, config, num_sms, &plan);
  if (status != LT_OK) return status;
  *out = lt_plan{plan.main.split_k, plan.main.row_tiles, plan.shrink.split_k, plan.workspace_bytes, plan.counters};
  return LT_OK;
}

int lt_nf4_lora_forward(int dtype, const void *x, int m, const lt_nf4_weight *weight, const void *lora_a,
                        const void *lora_b, int r, float scale, const void *bias, void *y, void *s,
                        const lt_config *config, int num_sms, void *workspace, size_t workspace_bytes,
                        int32_t *counters, int counters_len, int device, void *stream) {
  using namespace lt;
  if (dtype != LT_BF16 && dtype != LT_FP16) return fail(LT_ERR_INVALID, "dtype must be LT_BF16 or LT_FP16");
  if (weight == nullptr || !x || !weight->packed || !weight->absmax || !weight->code || !lora_a || !lora_b || !y || !s)
    return fail(LT_ERR_INVALID, "a required pointer is NULL");
  const lt_nf4_weight &w = *weight;
  const int bs = w.blocksize;
  if (bs < 32 || bs > 4096 || (bs & (bs - 1))) return fail(LT_ERR_INVALID, "blocksize must be a power of two in 32..4096");
  if (w.double_quant && (!w.nested_absmax || !w.nested_code))
    return fail(LT_ERR_INVALID, "double quantization needs nested_absmax and nested_code");
  if (!aligned16(x) || !aligned16(w.packed) || !aligned16(lora_a))
    return fail(LT_ERR_INVALID, "x, the packed bytes and lora_a must start on 16-byte boundaries");
  DeviceScope scope;  // the caller's current device is current again when this call returns
  if (device >= 0) {
    const cudaError_t err = scope.select(device);
    if (err != cudaSuccess) return fail_cuda(err, "selecting the device");
  }
  Plan plan{};
  const int status = make_plan(m, w.n, w.k, r, config, num_sms, &plan);
  if (status != LT_OK) return status;
  if (workspace_bytes < plan.workspace_bytes || (plan.workspace_bytes && !workspace))
    return fail(LT_ERR_WORKSPACE, "workspace smaller than lt_nf4_lora_plan's workspace_bytes");
  if (counters_len < plan.counters || (plan.counters && !counters))
    return fail(LT_ERR_WORKSPACE, "fewer tile counters than lt_nf4_lora_plan's counters");
  const int table = config ? config->table : LT_TABLE_SHARED;
  auto ws = static_cast<float *>(workspace);
  auto st = static_cast<cudaStream_t>(stream);
  if (dtype == LT_BF16) {
    using T = __nv_bfloat16;
    return forward<T>(static_cast<const T *>(x), m, w, static_cast<const T *>(lora_a), static_cast<const T *>(lora_b), r,
                      scale, static_cast<const T *>(bias), static_cast<T *>(y), static_cast<T *>(s), plan, table, ws,
                      counters, st);
  }
  using T = __half;
  return forward<T>(static_cast<const T *>(x), m, w, static_cast<const T *>(lora_a), static_cast<const T *>(lora_b), r,
                    scale, static_cast<const T *>(bias), static_cast<T *>(y), static_cast<T *>(s), plan, table, ws,
                    counters, st);
}

}  // extern "C"
