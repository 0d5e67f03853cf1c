/* One AdamW step with block-wise 8-bit moments (optim8bit.py's AdamW8bit), fused: each block of the
   moments is dequantised, updated, applied to the weights and quantised again in one pass over
   memory, where PyTorch's version runs a dozen whole-chunk operations (and a binary search per
   value for the quantisation).

   The arithmetic is the Python version's, operation for operation and in the same order (float32,
   built with -ffp-contract=off: a*b+c is fused into one multiply-add exactly where PyTorch's CPU
   kernels fuse it, `add` with an alpha and `addcmul`). The new moments and their codes agree to the
   last bit; the weights too, but for the ~1% of elements where PyTorch's vectorised sqrt (not
   correctly rounded) differs from sqrtf by one unit in the last place.

   Quantisation: the code of x is the number of midpoints between consecutive map values that are
   below x (torch.bucketize). Instead of a binary search, `table` (built in Python) gives for the
   top 16 bits of x's float32 pattern the code of the lowest value with those bits; a few
   comparisons with the following midpoints finish it. Exact: codes grow with x. */
#include <math.h>
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define MAX_BLOCK 4096

int lm_adamw8bit_abi(void) { return 1; }
int lm_adamw8bit_max_block(void) { return MAX_BLOCK; }

static inline uint8_t quantize(float x, const float *mid, const uint8_t *table) {
    uint32_t bits;
    memcpy(&bits, &x, sizeof bits);
    unsigned c = table[bits >> 16];
    while (c < 255 && mid[c] < x) c++;
    return (uint8_t)c;
}

/* hyper: beta1, 1-beta1, beta2, 1-beta2, sqrt(1-beta2^t), eps, 1-lr*wd, -lr/(1-beta1^t), decay? (0/1)
   maps: 256 values; mids: 255 midpoints; tables: 65536 codes (see above). m signed, v unsigned. */
void lm_adamw8bit_step(float *p, const float *g, uint8_t *m_codes, float *m_absmax, uint8_t *v_codes,
                       float *v_absmax, long n, long block, const float *m_map, const float *m_mid,
                       const uint8_t *m_table, const float *v_map, const float *v_mid, const uint8_t *v_table,
                       const float *hyper, int threads) {
    const float beta1 = hyper[0], one_minus_beta1 = hyper[1], beta2 = hyper[2], one_minus_beta2 = hyper[3];
    const float correction2 = hyper[4], eps = hyper[5], decay = hyper[6], step_size = hyper[7];
    const int decayed = hyper[8] != 0.0f;
    const long blocks = (n + block - 1) / block;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long b = 0; b < blocks; b++) {
        float m_new[MAX_BLOCK], v_new[MAX_BLOCK];
        const long start = b * block, len = (start + block < n ? start + block : n) - start;
        float *restrict w = p + start;
        const float *restrict gb = g + start;
        uint8_t *restrict mc = m_codes + start, *restrict vc = v_codes + start;
        const float m_scale = m_absmax[b], v_scale = v_absmax[b];
        for (long i = 0; i < len; i++) { /* dequantise (table lookups, kept apart so the rest vectorises) */
            m_new[i] = m_map[mc[i]] * m_scale;
            v_new[i] = v_map[vc[i]] * v_scale;
        }
        if (decayed) /* weights.mul_(1 - lr * wd), before the step */
            for (long i = 0; i < len; i++) w[i] = w[i] * decay;
        for (long i = 0; i < len; i++) {
            const float gi = gb[i];
            const float m = fmaf(gi, one_minus_beta1, m_new[i] * beta1); /* m.mul_(b1).add_(g, alpha=1-b1) */
            const float v = fmaf(one_minus_beta2 * gi, gi, v_new[i] * beta2); /* v.mul_(b2).addcmul_(g, g, value=1-b2) */
            const float denom = sqrtf(v) / correction2 + eps;
            w[i] = w[i] + step_size * m / denom; /* addcdiv_: self + value * t1 / t2 */
            m_new[i] = m;
            v_new[i] = v;
        }
        /* absmax on the bit patterns of |x|: for non-negative floats they order as integers (which
           vectorises), and a NaN comes out on top, as in torch.amax */
        uint32_t m_bits = 0, v_bits = 0;
        for (long i = 0; i < len; i++) {
            uint32_t a, c;
            memcpy(&a, &m_new[i], 4);
            memcpy(&c, &v_new[i], 4);
            a &= 0x7fffffffu;
            c &= 0x7fffffffu;
            m_bits = a > m_bits ? a : m_bits;
            v_bits = c > v_bits ? c : v_bits;
        }
        float m_max, v_max;
        memcpy(&m_max, &m_bits, 4);
        memcpy(&v_max, &v_bits, 4);
        const float m_div = fmaxf(m_max, 1.17549435e-38f), v_div = fmaxf(v_max, 1.17549435e-38f);
        for (long i = 0; i < len; i++) {
            m_new[i] = m_new[i] / m_div;
            v_new[i] = v_new[i] / v_div;
        }
        for (long i = 0; i < len; i++) {
            mc[i] = quantize(m_new[i], m_mid, m_table);
            vc[i] = quantize(v_new[i], v_mid, v_table);
        }
        m_absmax[b] = m_max;
        v_absmax[b] = v_max;
    }
}
