/* Weight-only quantized matrix-vector products for batch-1 (small-M) decoding on CPU.

   y[m, n] = sum_k x[m, k] * w[n, k] (+ bias[n]), with w stored as integers:
     int8  w[n, k] = q[n, k] * scale[n]                      q: (N, K) int8, one scale per row
     int4  w[n, k] = (q[n, k] - zero[n, g]) * scale[n, g]    q: 4-bit codes, g = k / group
     bf16  a float head's weight rounded to bfloat16
   A decode step streams every weight once, so the time is the time to read the weights; the work
   per weight must keep up with memory. Each pass reads a block of ROWS weight rows for one
   activation row: the rows' accumulators are independent (no multiply-add waits on the previous
   one), the activation is loaded once for all of them, and the block's bytes stay in L1 for the
   next activation row when M > 1. Blocks are stored interleaved, so a pass reads memory front to
   back.

   bf16 widens each weight exactly to float32 and multiply-adds in float32: the result differs from
   "dequantise, then multiply" only by the order of float32 additions. int8 and int4 round the
   activation to int8 per 32 inputs first (see below), as llama.cpp does, because widening 8- or
   4-bit codes to float costs more instructions than memory gives time for. */
#include <stddef.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#include <immintrin.h>
#define LM_AVX512 1
#endif

#define ROWS 4
/* how far ahead of the current step to ask for the weights (bytes), into L2: the hardware
   prefetcher alone leaves one core at about half the memory rate float32 GEMV reaches (measured on
   a Sapphire Rapids core, 512 to 16384 bytes and L1/L2 hints tried; 2048 into L2 was best) */
#ifndef PF_HINT
#define PF_HINT _MM_HINT_T1
#endif
#ifndef PREFETCH
#define PREFETCH 2048
#endif
/* the same for the int4 kernel, whose steps read half the bytes per weight: 4096 measured ~5% faster
   than 2048 on 768 x 3072 and 3072 x 768 matrices (1024 to 8192 tried) */
#ifndef PREFETCH_INT4
#define PREFETCH_INT4 4096
#endif

int lm_kernel_abi(void) { return 6; }

int lm_kernel_simd(void) {
#ifdef LM_AVX512
    return 512;
#else
    return 0;
#endif
}

/* ---- int8 ------------------------------------------------------------------------------------ */
/* w: blocks of ROWS rows, each block stored as K32 / 16 steps of ROWS x 16 bytes (row r's inputs
   k..k+15 at step k / 16, slot r), zero-padded to K32 = K rounded up to 32 and to whole blocks: one
   decode pass reads the matrix strictly front to back, one cache line per step. Each byte holds
   q + 128 (the code with its sign bit flipped), an unsigned byte for VNNI.

   As for int4 below (and llama.cpp's Q8_0 x Q8_0 product), the activation is first rounded to int8
   per 32 inputs: one vpdpbusd then multiplies 64 weights, where widening each int8 weight to float
   costs three instructions per 16 and left one core short of the memory rate. The unsigned bias of
   the codes is taken out exactly in int32: sum (q + 128) xq = sum q xq + 128 sum xq. The result is
   exactly sum_k q[n, k] · d · xq[k] per block, then scaled, up to float32 rounding. */
static void int8q8_block(const int8_t *xq, const float *d, const int32_t *xsum, long K32, const uint8_t *w,
                         float *out) {
#ifdef LM_AVX512
    __m512 acc = _mm512_setzero_ps();  /* lane j: row j / 4 */
    for (long k = 0; k < K32; k += 32) {
        const uint8_t *step = w + k * ROWS;
        _mm_prefetch((const char *)step + PREFETCH, PF_HINT);
        _mm_prefetch((const char *)step + PREFETCH + 64, PF_HINT);
        __m512i w0 = _mm512_loadu_si512((const void *)step), w1 = _mm512_loadu_si512((const void *)(step + 64));
        __m512i x0 = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)(xq + k)));
        __m512i x1 = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)(xq + k + 16)));
        /* each row's first int32 lane starts at -128 sum xq, which removes the codes' bias */
        __m512i s = _mm512_maskz_set1_epi32((__mmask16)0x1111, -128 * xsum[k / 32]);
        s = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(s, w0, x0), w1, x1);
        acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_set1_ps(d[k / 32]), acc);
    }
    float lanes[16];
    _mm512_storeu_ps(lanes, acc);
    for (int r = 0; r < ROWS; r++) out[r] = (lanes[4 * r] + lanes[4 * r + 1]) + (lanes[4 * r + 2] + lanes[4 * r + 3]);
#else
    for (int r = 0; r < ROWS; r++) {
        float s = 0.0f;
        for (long k = 0; k < K32; k += 32) {
            int32_t dot = 0;
            for (int j = 0; j < 32; j++) {
                long i = k + j;
                dot += ((int32_t)w[(i / 16) * 16 * ROWS + 16 * r + i % 16] - 128) * xq[i];
            }
            s += (float)dot * d[k / 32];
        }
        out[r] = s;
    }
#endif
}

static void quantize_q8(const float *x, long K, long K32, int8_t *xq, float *d, int32_t *xsum);

void lm_int8q8_gemm(const float *x, long M, long K, const uint8_t *w, const float *scale, const float *bias,
                    float *y, long N, int threads) {
    long K32 = (K + 31) & ~31L, blocks = (N + ROWS - 1) / ROWS;
    int8_t *xq = malloc((size_t)(M * K32));
    float *d = malloc(sizeof(float) * (size_t)(M * K32 / 32));
    int32_t *xsum = malloc(sizeof(int32_t) * (size_t)(M * K32 / 32));
    for (long m = 0; m < M; m++) quantize_q8(x + m * K, K, K32, xq + m * K32, d + m * K32 / 32, xsum + m * K32 / 32);
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (long b = 0; b < blocks; b++) {
        long n0 = b * ROWS, rows = N - n0 < ROWS ? N - n0 : ROWS;
        float out[ROWS];
        for (long m = 0; m < M; m++) {
            int8q8_block(xq + m * K32, d + m * K32 / 32, xsum + m * K32 / 32, K32, w + b * K32 * ROWS, out);
            for (long r = 0; r < rows; r++)
                y[m * N + n0 + r] = out[r] * scale[n0 + r] + (bias ? bias[n0 + r] : 0.0f);
        }
    }
    free(xq);
    free(d);
    free(xsum);
}

/* ---- bfloat16 -------------------------------------------------------------------------------- */
/* A float head read at half the bytes: w holds bfloat16 bit patterns in the int8 layout (blocks of
   ROWS rows, 16 inputs a row per step, inputs zero-padded to 16). A bfloat16 is the top half of a
   float32, so widening is exact and x stays float32. */
static void bf16_block(const float *x, long K, const uint16_t *w, float *out) {
    long K16 = (K + 15) & ~15L;
#ifdef LM_AVX512
    __m512 acc[ROWS];
    for (int r = 0; r < ROWS; r++) acc[r] = _mm512_setzero_ps();
    for (long k = 0; k < K16; k += 16) {
        __mmask16 mask = K - k >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (K - k)) - 1);
        __m512 xv = _mm512_maskz_loadu_ps(mask, x + k);
        const uint16_t *step = w + k * ROWS;
        _mm_prefetch((const char *)step + 2 * PREFETCH, PF_HINT);
        _mm_prefetch((const char *)step + 2 * PREFETCH + 64, PF_HINT);
        for (int r = 0; r < ROWS; r++) {
            __m512i v = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(step + 16 * r)));
            acc[r] = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(v, 16)), xv, acc[r]);
        }
    }
    for (int r = 0; r < ROWS; r++) out[r] = _mm512_reduce_add_ps(acc[r]);
#else
    for (int r = 0; r < ROWS; r++) {
        float s = 0.0f;
        for (long k = 0; k < K; k++) {
            union { uint32_t u; float f; } v = {(uint32_t)w[(k / 16) * 16 * ROWS + 16 * r + k % 16] << 16};
            s += x[k] * v.f;
        }
        out[r] = s;
    }
#endif
}

void lm_bf16_gemm(const float *x, long M, long K, const uint16_t *w, const float *bias, float *y, long N,
                  int threads) {
    long blocks = (N + ROWS - 1) / ROWS, block_elems = ((K + 15) & ~15L) * ROWS;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (long b = 0; b < blocks; b++) {
        long n0 = b * ROWS, rows = N - n0 < ROWS ? N - n0 : ROWS;
        float out[ROWS];
        for (long m = 0; m < M; m++) {
            bf16_block(x + m * K, K, w + b * block_elems, out);
            for (long r = 0; r < rows; r++) y[m * N + n0 + r] = out[r] + (bias ? bias[n0 + r] : 0.0f);
        }
    }
}

/* ---- int4 ------------------------------------------------------------------------------------ */
/* w: blocks of ROWS rows, each stored as K / 32 steps of ROWS x 16 bytes (row r's inputs k..k+31 at
   step k / 32, slot r, byte j = input k + j | input k + 16 + j << 4). Per block, the groups' scales
   (bfloat16) and zero points (uint8) as (G4 / 4, ROWS, 4): row r's groups 4i .. 4i + 3 side by side,
   groups zero-padded to G4 = G rounded up to 4, rows to whole blocks. A scale costs 2 bytes and a
   zero 1: with groups of 32, 19 bytes per 32 weights, against 24 with both as float32, and the
   weights' bytes are what a decode step waits for. A bfloat16 is the top half of a float32 (exact to
   widen), and `int4_quantize` rounds its scales to bfloat16, so these are the saved values.

   As llama.cpp does for its 4-bit types, the activation is first rounded to int8 per 32 inputs
   (xq = round(x · 127 / amax), step d = amax / 127), so a multiply-add takes 4-bit codes and 8-bit
   activations whole: one VNNI instruction (vpdpbusd) does 64 of them, where widening every code to
   float costs ~7 instructions per 32. With xsum[g] = sum over group g of d · xq,
     sum_k (q − z)·s·d·xq = s · (sum_k q·d·xq) − z·s · xsum[g]
   exactly, up to float32 rounding. */
/* x (K values, zero-padded to K32) rounded to int8 per 32 inputs; d: the steps, xsum: sum of xq per 32 */
static void quantize_q8(const float *x, long K, long K32, int8_t *xq, float *d, int32_t *xsum) {
    for (long b = 0; b < K32 / 32; b++) {
        long n = K - 32 * b < 32 ? K - 32 * b : 32;
        float amax = 0.0f;
        for (long j = 0; j < n; j++) {
            float a = x[32 * b + j] < 0 ? -x[32 * b + j] : x[32 * b + j];
            amax = a > amax ? a : amax;
        }
        float inv = amax > 0 ? 127.0f / amax : 0.0f;
        int32_t sum = 0;
        d[b] = amax / 127.0f;
        for (long j = 0; j < 32; j++) {
            xq[32 * b + j] = j < n ? (int8_t)lrintf(x[32 * b + j] * inv) : 0;
            sum += xq[32 * b + j];
        }
        xsum[b] = sum;
    }
}

/* Four groups' scales and zeros are one vector each: lane 4r + j is row r's group 4i + j. The
   zero term z·s·xsum of four groups is one multiply-add (xsum[4i .. 4i + 3] broadcast to each row's
   four lanes), and group 4i + j's scales are lanes 4r + j spread over row r's four lanes; lanes
   4r .. 4r + 3 then all belong to row r, as in the codes' products. The block is compiled once per
   group size (a constant `group`), so the loops over a group's steps unroll and the step's
   arithmetic is all the loop does: a group of 32 is one step, and index arithmetic and branches
   per step cost as much as the step itself. */
#ifdef LM_AVX512
/* one group's products, sum over its steps of d · (codes · xq), lane j: row j / 4 */
static inline __attribute__((always_inline)) __m512 int4_group(const int8_t *xq, const float *d,
                                                               const uint8_t *w, const long group) {
    const __m512i low = _mm512_set1_epi8(0x0F);
    __m512 part = _mm512_setzero_ps();
    for (long k = 0; k < group; k += 32) {
        const uint8_t *step = w + (k / 2) * ROWS;
        _mm_prefetch((const char *)step + PREFETCH_INT4, PF_HINT);
        __m512i v = _mm512_loadu_si512((const void *)step);
        __m512i lo = _mm512_and_si512(v, low), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
        __m512i x0 = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)(xq + k)));
        __m512i x1 = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)(xq + k + 16)));
        __m512i s = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, x0), hi, x1);
        __m512 dv = _mm512_set1_ps(d[k / 32]);
        part = k == 0 ? _mm512_mul_ps(_mm512_cvtepi32_ps(s), dv) : _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), dv, part);
    }
    return part;
}

static inline __attribute__((always_inline)) void int4q8_block_g(
    const int8_t *xq, const float *d, const float *xsum, long K, const long group, const uint8_t *w,
    const uint16_t *scale, const uint8_t *zero, float *out) {
    const long G = K / group, G4 = (G + 3) & ~3L, steps = group / 32;
    const __m512i rows = _mm512_set_epi32(12, 12, 12, 12, 8, 8, 8, 8, 4, 4, 4, 4, 0, 0, 0, 0);
    __m512 acc = _mm512_setzero_ps(), acc_zero = _mm512_setzero_ps();  /* lane j: row j / 4 */
    for (long g4 = 0; g4 < G4; g4 += 4) {
        __m512 sq = _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(scale + g4 * ROWS))), 16));
        __m512 zq = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(zero + g4 * ROWS))));
        acc_zero = _mm512_fmadd_ps(_mm512_mul_ps(zq, sq), _mm512_broadcast_f32x4(_mm_loadu_ps(xsum + g4)), acc_zero);
        const int8_t *xg = xq + g4 * group;
        const float *dg = d + g4 * steps;
        const uint8_t *wg = w + g4 * group / 2 * ROWS;
        if (g4 + 4 <= G) {
            for (int j = 0; j < 4; j++) {
                __m512 part = int4_group(xg + j * group, dg + j * steps, wg + j * group / 2 * ROWS, group);
                acc = _mm512_fmadd_ps(part, _mm512_permutexvar_ps(_mm512_add_epi32(rows, _mm512_set1_epi32(j)), sq), acc);
            }
        } else {
            for (int j = 0; j < G - g4; j++) {
                __m512 part = int4_group(xg + j * group, dg + j * steps, wg + j * group / 2 * ROWS, group);
                acc = _mm512_fmadd_ps(part, _mm512_permutexvar_ps(_mm512_add_epi32(rows, _mm512_set1_epi32(j)), sq), acc);
            }
        }
    }
    float lanes[16];
    _mm512_storeu_ps(lanes, _mm512_sub_ps(acc, acc_zero));
    for (int r = 0; r < ROWS; r++) out[r] = (lanes[4 * r] + lanes[4 * r + 1]) + (lanes[4 * r + 2] + lanes[4 * r + 3]);
}
#endif

static void int4q8_block(const int8_t *xq, const float *d, const float *xsum, long K, long group,
                         const uint8_t *w, const uint16_t *scale, const uint8_t *zero, float *out) {
#ifdef LM_AVX512
    switch (group) {  /* INT4_GROUP_SIZES */
    case 32: int4q8_block_g(xq, d, xsum, K, 32, w, scale, zero, out); return;
    case 64: int4q8_block_g(xq, d, xsum, K, 64, w, scale, zero, out); return;
    case 128: int4q8_block_g(xq, d, xsum, K, 128, w, scale, zero, out); return;
    default: int4q8_block_g(xq, d, xsum, K, group, w, scale, zero, out); return;
    }
#else
    long G = K / group, G4 = (G + 3) & ~3L;
    for (int r = 0; r < ROWS; r++) {
        float s = 0.0f, z = 0.0f;
        for (long g = 0; g < G4; g++) {
            long meta = (g / 4) * 4 * ROWS + 4 * r + g % 4;
            union { uint32_t u; float f; } sg = {(uint32_t)scale[meta] << 16};
            float part = 0.0f;
            for (long k = g * group; k < (g + 1) * group && g < G; k += 32) {
                const uint8_t *b = w + (k / 2) * ROWS + 16 * r;
                int32_t dot = 0;
                for (int j = 0; j < 16; j++) dot += xq[k + j] * (b[j] & 15) + xq[k + 16 + j] * (b[j] >> 4);
                part += (float)dot * d[k / 32];
            }
            s += part * sg.f;
            z += (float)zero[meta] * sg.f * xsum[g];
        }
        out[r] = s - z;
    }
#endif
}

void lm_int4q8_gemm(const float *x, long M, long K, long group, const uint8_t *w, const uint16_t *scale,
                    const uint8_t *zero, const float *bias, float *y, long N, int threads) {
    long G = K / group, G4 = (G + 3) & ~3L, blocks = (N + ROWS - 1) / ROWS;
    /* per activation row: K int8 values, K / 32 steps and G4 group sums (zero-padded to G4) */
    int8_t *xq = malloc((size_t)(M * K));
    float *d = malloc(sizeof(float) * (size_t)(M * (K / 32))), *xsum = malloc(sizeof(float) * (size_t)(M * G4));
    int32_t *isums = malloc(sizeof(int32_t) * (size_t)(K / 32));
    for (long m = 0; m < M; m++) {
        quantize_q8(x + m * K, K, K, xq + m * K, d + m * (K / 32), isums);
        for (long g = 0; g < G4; g++) {
            float s = 0.0f;
            for (long b = g * group / 32; b < (g + 1) * group / 32 && g < G; b++) s += (float)isums[b] * d[m * (K / 32) + b];
            xsum[m * G4 + g] = s;
        }
    }
    free(isums);
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (long b = 0; b < blocks; b++) {
        long n0 = b * ROWS, rows = N - n0 < ROWS ? N - n0 : ROWS;
        float out[ROWS];
        for (long m = 0; m < M; m++) {
            int4q8_block(xq + m * K, d + m * (K / 32), xsum + m * G4, K, group, w + b * (K / 2) * ROWS,
                         scale + b * G4 * ROWS, zero + b * G4 * ROWS, out);
            for (long r = 0; r < rows; r++) y[m * N + n0 + r] = out[r] + (bias ? bias[n0 + r] : 0.0f);
        }
    }
    free(xq);
    free(d);
    free(xsum);
}
