/* Weight-only quantized matrix-vector products for batch-1 (small-M) decoding on CPU.

   y[m, n] = sum_k x[m, k] * w[n, k] (+ bias[n]), with w stored as integers:
     int8  w[n, k] = q[n, k] * scale[n]                      q: (N, K) int8, one scale per row
     int4  w[n, k] = q[n, k] * scale[n, g] + offset[n, g]    q: 4-bit codes, g = k / group
   A decode step streams every weight once, so the time is the time to read the integers; the work
   per weight (widen, convert, multiply-add in float32) must keep up with memory. Each pass reads a
   block of ROWS weight rows for one activation row: the rows' accumulators are independent (no
   multiply-add waits on the previous one), the activation is loaded once for all of them, and the
   block's bytes stay in L1 for the next activation row when M > 1.

   int4 codes of each 32-input block are stored in 16 bytes, byte j holding input j (low nibble) and
   input j + 16 (high nibble), so one widening load yields two vectors of 16 consecutive inputs.
   The offset term sums to offset[n, g] * xsum[m, g], with xsum the activation's per-group sums,
   computed once per call instead of once per weight.

   Everything is float32 arithmetic on exactly converted integers: the result differs from
   "dequantise, then multiply" only by the order of float32 additions. */
#include <stddef.h>
#include <stdint.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX512F__) && defined(__AVX512BW__)
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

int lm_kernel_abi(void) { return 1; }

int lm_kernel_simd(void) {
#ifdef LM_AVX512
    return 512;
#else
    return 0;
#endif
}

/* ---- int8 ------------------------------------------------------------------------------------ */
/* w: blocks of ROWS rows, each block stored as K16 / 16 steps of ROWS x 16 bytes (row r's inputs
   k..k+15 at step k / 16, slot r), zero-padded to K16 = K rounded up to 16 and to whole blocks: one
   decode pass reads the matrix strictly front to back, one cache line per step. */
static void int8_block(const float *x, long K, const int8_t *w, float *out) {
    long K16 = (K + 15) & ~15L;
#ifdef LM_AVX512
    __m512 acc[ROWS];
    for (int r = 0; r < ROWS; r++) acc[r] = _mm512_setzero_ps();
    for (long k = 0; k < K16; k += 16) {
        __mmask16 mask = K - k >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (K - k)) - 1);
        __m512 xv = _mm512_maskz_loadu_ps(mask, x + k);
        const int8_t *step = w + k * ROWS;
        _mm_prefetch((const char *)step + PREFETCH, PF_HINT);
        for (int r = 0; r < ROWS; r++) {
            __m128i b = _mm_loadu_si128((const __m128i *)(step + 16 * r));
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b)), xv, acc[r]);
        }
    }
    for (int r = 0; r < ROWS; r++) out[r] = _mm512_reduce_add_ps(acc[r]);
#else
    for (int r = 0; r < ROWS; r++) {
        float s = 0.0f;
        for (long k = 0; k < K; k++) s += x[k] * (float)w[(k / 16) * 16 * ROWS + 16 * r + k % 16];
        out[r] = s;
    }
#endif
}

void lm_int8_gemm(const float *x, long M, long K, const int8_t *w, const float *scale, const float *bias,
                  float *y, long N, int threads) {
    long blocks = (N + ROWS - 1) / ROWS, block_bytes = ((K + 15) & ~15L) * ROWS;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (long b = 0; b < blocks; b++) {
        long n0 = b * ROWS, rows = N - n0 < ROWS ? N - n0 : ROWS;
        float out[ROWS];
        for (long m = 0; m < M; m++) {
            int8_block(x + m * K, K, w + b * block_bytes, out);
            for (long r = 0; r < rows; r++)
                y[m * N + n0 + r] = out[r] * scale[n0 + r] + (bias ? bias[n0 + r] : 0.0f);
        }
    }
}

/* ---- int4 ------------------------------------------------------------------------------------ */
/* w: blocks of ROWS rows, each stored as K / 32 steps of ROWS x 16 bytes (row r's inputs k..k+31 at
   step k / 32, slot r, byte j = input k + j | input k + 16 + j << 4); scale and offset per block as
   (K / group, ROWS), rows zero-padded to whole blocks. */
static void int4_block(const float *x, const float *xsum, long K, long group, const uint8_t *w,
                       const float *scale, const float *offset, float *out) {
    long G = K / group;
#ifdef LM_AVX512
    __m512 acc[ROWS];
    const __m512i low = _mm512_set1_epi32(0x0F);
    for (int r = 0; r < ROWS; r++) acc[r] = _mm512_setzero_ps();
    for (long g = 0; g < G; g++) {
        __m512 part[ROWS];
        for (int r = 0; r < ROWS; r++) part[r] = _mm512_setzero_ps();
        for (long k = g * group; k < (g + 1) * group; k += 32) {
            __m512 x0 = _mm512_loadu_ps(x + k), x1 = _mm512_loadu_ps(x + k + 16);
            const uint8_t *step = w + (k / 2) * ROWS;
            _mm_prefetch((const char *)step + PREFETCH, PF_HINT);
            for (int r = 0; r < ROWS; r++) {
                __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(step + 16 * r)));
                part[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(v, low)), x0, part[r]);
                part[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4)), x1, part[r]);
            }
        }
        for (int r = 0; r < ROWS; r++)
            acc[r] = _mm512_fmadd_ps(part[r], _mm512_set1_ps(scale[g * ROWS + r]), acc[r]);
    }
    for (int r = 0; r < ROWS; r++) {
        float s = _mm512_reduce_add_ps(acc[r]);
        for (long g = 0; g < G; g++) s += offset[g * ROWS + r] * xsum[g];
        out[r] = s;
    }
#else
    for (int r = 0; r < ROWS; r++) {
        float s = 0.0f;
        for (long g = 0; g < G; g++) {
            float part = 0.0f;
            for (long k = g * group; k < (g + 1) * group; k += 32) {
                const uint8_t *b = w + (k / 2) * ROWS + 16 * r;
                for (int j = 0; j < 16; j++)
                    part += x[k + j] * (float)(b[j] & 15) + x[k + 16 + j] * (float)(b[j] >> 4);
            }
            s += part * scale[g * ROWS + r] + offset[g * ROWS + r] * xsum[g];
        }
        out[r] = s;
    }
#endif
}

/* xsum: scratch of M * (K / group) floats. K is a multiple of group, group of 32. */
void lm_int4_gemm(const float *x, long M, long K, long group, const uint8_t *w, const float *scale,
                  const float *offset, const float *bias, float *y, long N, float *xsum, int threads) {
    long G = K / group, blocks = (N + ROWS - 1) / ROWS;
    for (long m = 0; m < M; m++)
        for (long g = 0; g < G; g++) {
            float s = 0.0f;
            for (long k = g * group; k < (g + 1) * group; k++) s += x[m * K + k];
            xsum[m * G + g] = s;
        }
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (long b = 0; b < blocks; b++) {
        long n0 = b * ROWS, rows = N - n0 < ROWS ? N - n0 : ROWS;
        float out[ROWS];
        for (long m = 0; m < M; m++) {
            int4_block(x + m * K, xsum + m * G, K, group, w + b * (K / 2) * ROWS, scale + b * G * ROWS,
                       offset + b * G * ROWS, out);
            for (long r = 0; r < rows; r++) y[m * N + n0 + r] = out[r] + (bias ? bias[n0 + r] : 0.0f);
        }
    }
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
