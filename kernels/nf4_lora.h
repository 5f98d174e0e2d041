/* Plain C interface of lora-triton's native decode-size QLoRA forward (kernels/README.md).
 *
 *   y = x @ dequant(W)^T + scale * (x @ A^T) @ B^T + bias,   S = x @ A^T
 *
 * x [M, K], W [N, K] as bitsandbytes stores NF4 (two codes per byte, first element in the high
 * nibble, one absmax per block of the flattened weight, optionally double-quantized), A [r, K],
 * B [N, r], bias [N]; y [M, N] and S [M, r]. Activations, adapter, bias, y and S share one dtype
 * (bf16 or fp16); accumulation is fp32. Every tensor is contiguous row-major device memory.
 * Limits: 1 <= M <= 16, K a multiple of 32 and of the block size, 1 <= r <= 128, block size a
 * power of two in 32..4096; x, the packed bytes, A and B start on 16-byte boundaries.
 *
 * No dependency on torch: raw device pointers, sizes and a cudaStream_t passed as void*.
 * Functions return LT_OK or an error code; lt_last_error() says what went wrong (per thread).
 */
#ifndef LORA_TRITON_NF4_LORA_H
#define LORA_TRITON_NF4_LORA_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define LT_ABI_VERSION 1
/* The library is built with hidden visibility: only what is marked LT_API is exported. */
#if defined(__GNUC__)
#define LT_API __attribute__((visibility("default")))
#else
#define LT_API
#endif

enum lt_status { LT_OK = 0, LT_ERR_INVALID = 1, LT_ERR_WORKSPACE = 2, LT_ERR_CUDA = 3 };
enum lt_dtype { LT_BF16 = 0, LT_FP16 = 1 };
/* Where the 16 NF4 code values live while decoding (a compile-time variant of the kernel). */
enum lt_table { LT_TABLE_SHARED = 0, LT_TABLE_REGISTER = 1 };

/* Launch choices; a 0 field means "choose for this shape" (lt_plan). */
typedef struct lt_config {
  int split_k;   /* K splits of the main kernel (0: fill the GPU about four CTAs per SM) */
  int row_tiles; /* 16-row MMA tiles per CTA: 2 or 4 (0: by N) */
  int table;     /* lt_table: LT_TABLE_SHARED (256 byte -> code pair table in shared memory)
                    or LT_TABLE_REGISTER (one code per lane, looked up with a warp shuffle) */
} lt_config;

/* The NF4 weight: packed bytes and its block scales. Without double quantization absmax is
 * float32 [n_blocks] and the nested fields are NULL / 0; with it absmax holds uint8 codes,
 * nested_absmax float32 [ceil(n_blocks / 256)], nested_code float32 [256], offset the mean. */
typedef struct lt_nf4_weight {
  const uint8_t *packed; /* [N * K / 2] */
  const void *absmax;
  const float *code; /* [16], the NF4 code book */
  const float *nested_absmax;
  const float *nested_code;
  float offset;
  int double_quant;
  int n, k, blocksize;
} lt_nf4_weight;

/* What a launch of this shape needs besides its operands. */
typedef struct lt_plan {
  int split_k;          /* main kernel splits actually used */
  int row_tiles;        /* 16-row tiles per CTA actually used */
  int shrink_split_k;   /* splits of the S = x @ A^T kernel */
  size_t workspace_bytes; /* fp32 split-K partials of both kernels (0 when neither splits) */
  int counters;         /* int32 tile counters needed (zero before the call; left zero after) */
} lt_plan;

LT_API int lt_abi_version(void);
LT_API const char *lt_last_error(void);

/* The launch configuration for this shape (config may be NULL). num_sms: multiprocessors of
 * the device (<= 0: ask the current device). */
LT_API int lt_nf4_lora_plan(int m, int n, int k, int r, const lt_config *config, int num_sms, lt_plan *plan);

/* Enqueue the forward on `stream` (two kernels: S = x @ A^T, then the NF4 GEMV whose epilogue
 * adds scale * S @ B^T + bias). workspace: at least plan.workspace_bytes of device memory (any
 * content); counters: plan.counters int32 that are zero, and are zero again when the stream
 * reaches the end of this call (two calls sharing counters must not run concurrently: the Python
 * caller gives each call counters of its own). device >= 0: launch there, and the caller's
 * current device is current again on return. */
LT_API int lt_nf4_lora_forward(int dtype, const void *x, int m, const lt_nf4_weight *weight, const void *lora_a,
                        const void *lora_b, int r, float scale, const void *bias, void *y, void *s,
                        const lt_config *config, int num_sms, void *workspace, size_t workspace_bytes,
                        int32_t *counters, int counters_len, int device, void *stream);

#ifdef __cplusplus
}
#endif

#endif /* LORA_TRITON_NF4_LORA_H */
