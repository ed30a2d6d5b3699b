/* fp8 e4m3fn kernels for the CPU, built once per machine by fp8_native.py (cc -O3 -march=native
 * -ffp-contract=off: no fused multiply-add, no fast-math, so every fp32 operation rounds exactly as
 * torch's kernels do and the results equal the torch route bit for bit; tests/test_fp8_native.py).
 *
 * torch needs about five passes over a block to decode e4m3 and two more to quantize (each a Python
 * call); here each job is one vectorised pass, and the merge of tensor-wise scaled inputs is one pass
 * over all of them.
 *
 * Decoding moves a code's bits into an fp32 (see fp8.py): `s eeee mmm` -> `s 0000eeee mmm0...0`, the
 * e4m3 value / 2^120 exactly (the small codes are fp32 subnormals: the caller checks that its thread
 * keeps them), then one multiply by the folded factor 2^120 * scale is the single rounding of q * scale.
 * Its NaN codes land on +-480 / 2^120: the kernels report them and the caller takes the exact route.
 */
#include <stdint.h>
#include <string.h>

#define E4M3_MASK 0x87F00000u

static inline float moved(int8_t code) {
    uint32_t bits = ((uint32_t)(int32_t)code << 20) & E4M3_MASK;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline int is_nan_code(int8_t code) { return ((uint8_t)code & 0x7F) == 0x7F; }

/* out[i] = moved(q[i]) * f1 (then * f2 when two_factors); returns 1 when a NaN code was seen (out then
 * holds a finite stand-in there, which the caller overwrites). */
int ws_decode_e4m3(const int8_t *restrict q, float *restrict out, int64_t n, float f1, float f2,
                   int two_factors) {
    int nan = 0;
    if (two_factors) {
        for (int64_t i = 0; i < n; i++) {
            out[i] = moved(q[i]) * f1 * f2;
            nan |= is_nan_code(q[i]);
        }
    } else {
        for (int64_t i = 0; i < n; i++) {
            out[i] = moved(q[i]) * f1;
            nan |= is_nan_code(q[i]);
        }
    }
    return nan;
}

static inline uint32_t abs_bits(float v) {
    uint32_t b;
    memcpy(&b, &v, 4);
    return b & 0x7FFFFFFFu;
}

#define TILE 2048 /* elements per tile: the tile's sums (8 KB) stay in L1 while each input is added */

/* One tile of the weighted sum: yt[i] = sum over inputs j of (moved(q_j[i]) * f_j) * w_j, added in input
 * order: what decoding each input (q * scale) and then weighted_sum_ (x0 * w0, += xj * wj) computes,
 * each step rounded to fp32. Returns 1 when a NaN code was seen. */
static int wsum_tile(int k, const int8_t *const *q, const float *f, const float *w, int64_t t0,
                     int64_t len, float *restrict yt) {
    int nan = 0;
    const int8_t *restrict q0 = q[0] + t0;
    const float f0 = f[0], w0 = w[0];
    for (int64_t i = 0; i < len; i++) {
        float x = moved(q0[i]) * f0;
        yt[i] = x * w0;
        nan |= is_nan_code(q0[i]);
    }
    for (int j = 1; j < k; j++) {
        const int8_t *restrict qj = q[j] + t0;
        const float fj = f[j], wj = w[j];
        for (int64_t i = 0; i < len; i++) {
            float x = moved(qj[i]) * fj;
            yt[i] = yt[i] + x * wj;
            nan |= is_nan_code(qj[i]);
        }
    }
    return nan;
}

/* The weighted sum's max |y| only, as fp32 bits (integer max: it vectorises where a float max may not;
 * above 0x7F800000 a NaN, equal to it an Inf), without storing y: a key written fp8-scaled needs the
 * amax of all its rows before any can be quantized, and recomputing the sum costs less than writing
 * and re-reading a 4-byte result per element. Returns 1 when a NaN code was seen. */
int ws_wsum_e4m3_amax(int k, const int8_t *const *q, const float *f, const float *w, int64_t n,
                      uint32_t *amax_bits) {
    float yt[TILE];
    int nan = 0;
    uint32_t m = 0;
    for (int64_t t0 = 0; t0 < n; t0 += TILE) {
        int64_t len = n - t0 < TILE ? n - t0 : TILE;
        nan |= wsum_tile(k, q, f, w, t0, len, yt);
        for (int64_t i = 0; i < len; i++) {
            uint32_t a = abs_bits(yt[i]);
            m = a > m ? a : m;
        }
    }
    *amax_bits = m;
    return nan;
}

/* y stored (fp32) with its max |y| as above: for a caller that keeps the sum (a plain output dtype). */
int ws_wsum_e4m3(int k, const int8_t *const *q, const float *f, const float *w, float *restrict y,
                 int64_t n, uint32_t *amax_bits) {
    int nan = 0;
    uint32_t m = 0;
    for (int64_t t0 = 0; t0 < n; t0 += TILE) {
        int64_t len = n - t0 < TILE ? n - t0 : TILE;
        nan |= wsum_tile(k, q, f, w, t0, len, y + t0);
        for (int64_t i = 0; i < len; i++) {
            uint32_t a = abs_bits(y[t0 + i]);
            m = a > m ? a : m;
        }
    }
    *amax_bits = m;
    return nan;
}

/* fp32 -> e4m3fn as torch 2.x casts on the CPU: rounding to nearest even and saturating, so anything
 * above 464 (halfway between 448 and the absent 480), infinities included, gives +-448 (0x7E), and NaN
 * gives the NaN code 0x7F, each with x's sign. From 2^-6 up, the mantissa is rounded to 3 bits by
 * integer arithmetic (add 0x7FFFF plus the kept bit's parity, drop 20 bits) and the exponent rebiased;
 * below 2^-6, adding 2^14 (whose fp32 ulp is 2^-9, the e4m3 subnormal step) lets the hardware's own
 * rounding leave the code in the low bits. All are computed and one picked, so the loop vectorises.
 * (Checked against torch over all 2^32 fp32 bit patterns when written.) */
static inline uint8_t to_e4m3(float x) {
    const uint32_t half_up = 0x43E80000u;   /* 464.0f: above it rounds past 448 */
    const uint32_t inf_bits = 0x7F800000u;
    const uint32_t min_normal = 121u << 23; /* 2^-6 */
    const uint32_t magic_bits = 141u << 23; /* 2^14 */
    uint32_t bits;
    memcpy(&bits, &x, 4);
    uint32_t sign = bits & 0x80000000u;
    uint32_t a = bits ^ sign;
    float af, magic;
    memcpy(&af, &a, 4);
    memcpy(&magic, &magic_bits, 4);
    float t = af + magic;
    uint32_t tb;
    memcpy(&tb, &t, 4);
    uint32_t sub = tb - magic_bits;
    uint32_t norm = (a + ((uint32_t)(7 - 127) << 23) + 0x7FFFFu + ((a >> 20) & 1u)) >> 20;
    uint32_t r = a > inf_bits ? 0x7Fu : (a > half_up ? 0x7Eu : (a < min_normal ? sub : norm));
    return (uint8_t)((r & 0xFFu) | (sign >> 24));
}

/* q[i] = e4m3(y[i] / scale): torch's quantize_fp8 route (div, clamp to +-448 when asked, cast) in one
 * pass. The cast saturates by itself, so the clamp changes no code and `saturate` needs no work. */
void ws_quantize_e4m3(const float *restrict y, uint8_t *restrict q, int64_t n, float scale, int saturate) {
    (void)saturate;
    for (int64_t i = 0; i < n; i++) q[i] = to_e4m3(y[i] / scale);
}

/* The weighted sum quantized straight to e4m3 with `scale` (y / scale, cast): the second pass of a key
 * written fp8-scaled. Returns 1 when a NaN code was seen. */
int ws_wsum_quantize_e4m3(int k, const int8_t *const *q, const float *f, const float *w, int64_t n,
                          float scale, uint8_t *restrict out) {
    float yt[TILE];
    int nan = 0;
    for (int64_t t0 = 0; t0 < n; t0 += TILE) {
        int64_t len = n - t0 < TILE ? n - t0 : TILE;
        nan |= wsum_tile(k, q, f, w, t0, len, yt);
        for (int64_t i = 0; i < len; i++) out[t0 + i] = to_e4m3(yt[i] / scale);
    }
    return nan;
}

/* ---- lossless mix (mix.py): per element, the candidate nearest to (or farthest from) the reference ---- */

enum { KIND_F32 = 0, KIND_BF16 = 1, KIND_E4M3 = 2 };
enum { OUT_F32 = 0, OUT_RAW16 = 1 };
#define MAX_CANDIDATES 8

/* a tile of an input as fp32: fp32 copied, bf16 moved to the upper half (exact, NaN payloads kept),
 * e4m3 moved and multiplied by its folded factor (2^120 * scale: the decoded value, one rounding) */
static void load_tile(int kind, const void *p, int64_t t0, int64_t len, float factor, float *restrict out) {
    if (kind == KIND_F32) {
        memcpy(out, (const float *)p + t0, (size_t)len * 4);
    } else if (kind == KIND_BF16) {
        const uint16_t *restrict s = (const uint16_t *)p + t0;
        for (int64_t i = 0; i < len; i++) {
            uint32_t b = (uint32_t)s[i] << 16;
            memcpy(&out[i], &b, 4);
        }
    } else {
        const int8_t *restrict s = (const int8_t *)p + t0;
        for (int64_t i = 0; i < len; i++) out[i] = moved(s[i]) * factor;
    }
}

/* The mix of mix.py's _choose/_gather for one range, without statistics beyond the shares taken:
 * distance_j = |scale_j * x_j - a| (a plain subtraction where scale_j is 1), each rounded to fp32 as
 * torch computes it; candidate j replaces the best so far where the best is strictly farther (min) or
 * where it is not (max); the picked element is written as its fp32 value (OUT_F32) or as its own
 * 16-bit pattern (OUT_RAW16: every candidate stored in the output's 16-bit dtype). taken[j] counts the
 * elements taken from candidate j; *dist_max_bits is the largest |distance| as fp32 bits (>= 0x7F800000:
 * some distance is Inf or NaN, i.e. an input holds one, or fp32 overflowed). Returns 0, or -1 when the
 * arguments are out of range. */
int ws_mix(int n, int kind_a, const void *a, float factor_a, const int *kinds, const void *const *xs,
           const float *factors, const float *scales, int mode_max, int64_t len_total, int out_kind, void *out,
           int64_t *taken, uint32_t *dist_max_bits) {
    if (n < 2 || n > MAX_CANDIDATES) return -1;
    float at[TILE], xt[TILE], best[TILE], d[TILE];
    uint8_t idx[TILE];
    uint32_t dm = 0;
    int64_t counts[MAX_CANDIDATES] = {0};
    for (int64_t t0 = 0; t0 < len_total; t0 += TILE) {
        int64_t len = len_total - t0 < TILE ? len_total - t0 : TILE;
        load_tile(kind_a, a, t0, len, factor_a, at);
        for (int j = 0; j < n; j++) {
            load_tile(kinds[j], xs[j], t0, len, factors[j], xt);
            const float s = scales[j];
            if (s == 1.0f) {
                for (int64_t i = 0; i < len; i++) {
                    float v = xt[i] - at[i];
                    d[i] = v < 0 ? -v : v;
                }
            } else {
                for (int64_t i = 0; i < len; i++) {
                    float v = xt[i] * s - at[i];
                    d[i] = v < 0 ? -v : v;
                }
            }
            for (int64_t i = 0; i < len; i++) {
                uint32_t b = abs_bits(d[i]);
                dm = b > dm ? b : dm;
            }
            if (j == 0) {
                memcpy(best, d, (size_t)len * 4);
                memset(idx, 0, (size_t)len);
                if (out_kind == OUT_F32) memcpy((float *)out + t0, xt, (size_t)len * 4);
                else memcpy((uint16_t *)out + t0, (const uint16_t *)xs[0] + t0, (size_t)len * 2);
                continue;
            }
            /* take where the best so far is strictly farther (min); max: where it is not (ties, NaN) */
            if (out_kind == OUT_F32) {
                float *restrict o = (float *)out + t0;
                for (int64_t i = 0; i < len; i++) {
                    int take = (best[i] > d[i]) ^ mode_max;
                    o[i] = take ? xt[i] : o[i];
                    idx[i] = take ? (uint8_t)j : idx[i];
                    best[i] = take ? d[i] : best[i];
                }
            } else {
                uint16_t *restrict o = (uint16_t *)out + t0;
                const uint16_t *restrict r = (const uint16_t *)xs[j] + t0;
                for (int64_t i = 0; i < len; i++) {
                    int take = (best[i] > d[i]) ^ mode_max;
                    o[i] = take ? r[i] : o[i];
                    idx[i] = take ? (uint8_t)j : idx[i];
                    best[i] = take ? d[i] : best[i];
                }
            }
        }
        for (int j = 0; j < n; j++) {
            int64_t c = 0;
            for (int64_t i = 0; i < len; i++) c += idx[i] == j;
            counts[j] += c;
        }
    }
    for (int j = 0; j < n; j++) taken[j] = counts[j];
    *dist_max_bits = dm;
    return 0;
}

/* ---- TIES-merging (merge/methods.py `ties`) in passes over row ranges (merge/ties_native.py) ---- */

#define MAX_INPUTS 8

/* Pass 1 (refine = 0): per delta j (each input but the base, in order), hist[j][bits >> 16]++ of
 * |x_j - x_base| as fp32 bits (non-negative floats order as their bits; NaN sorts highest, as in torch's
 * kthvalue). Pass 2 (refine = 1): only elements whose top 16 bits equal hi[j]: hist[j][bits & 0xFFFF]++.
 * hist: (n - 1) x 65536 counts, added to. */
int ws_ties_hist(int n, const int *kinds, const void *const *xs, const float *factors, int base, int64_t len_total,
                 int refine, const uint32_t *hi, int64_t *hist) {
    if (n < 2 || n > MAX_INPUTS || base < 0 || base >= n) return -1;
    float bt[TILE], xt[TILE];
    uint32_t bits[TILE];
    for (int64_t t0 = 0; t0 < len_total; t0 += TILE) {
        int64_t len = len_total - t0 < TILE ? len_total - t0 : TILE;
        load_tile(kinds[base], xs[base], t0, len, factors[base], bt);
        int slot = 0;
        for (int j = 0; j < n; j++) {
            if (j == base) continue;
            load_tile(kinds[j], xs[j], t0, len, factors[j], xt);
            for (int64_t i = 0; i < len; i++) bits[i] = abs_bits(xt[i] - bt[i]);
            int64_t *h = hist + (int64_t)slot * 65536;
            if (!refine) {
                for (int64_t i = 0; i < len; i++) h[bits[i] >> 16]++;
            } else {
                const uint32_t want = hi[slot];
                for (int64_t i = 0; i < len; i++)
                    if ((bits[i] >> 16) == want) h[bits[i] & 0xFFFFu]++;
            }
            slot++;
        }
    }
    return 0;
}

/* Pass 3: the merged values y of elements [0, len_total) of this range, as `ties` computes them: delta j
 * kept where |d| > thr[j], or == thr[j] while fewer than quota[j] equal ones were kept before in flat
 * order (quota: the room left for this range; < 0: none, a huge value: all), else +0.0; weighted
 * wd = d * w; total = 0 + wd_0 + wd_1 ...; elected = total >= 0 ? 1 : -1; merged and divisor add wd and w
 * where sign(d) == elected; merged /= divisor (0 -> 1) when normalize; y = x_base + merged * scale.
 * sums (when given): |x_i|^2 for every input, x_A . x_i (A = input 0) and |y - x_A|^2, in double.
 * Returns the largest |y| as fp32 bits in *amax_bits (>= 0x7F800000: Inf/NaN). */
int ws_ties_apply(int n, const int *kinds, const void *const *xs, const float *factors, int base, int64_t len_total,
                  const uint32_t *thr, const int64_t *quota, const float *w, int normalize, float scale,
                  float *restrict y, double *sums, uint32_t *amax_bits) {
    if (n < 2 || n > MAX_INPUTS || base < 0 || base >= n) return -1;
    float xt[MAX_INPUTS][TILE];
    float total[TILE], merged[TILE], divisor[TILE], wd[MAX_INPUTS - 1][TILE], dt[MAX_INPUTS - 1][TILE];
    int64_t kept_eq[MAX_INPUTS] = {0};
    uint32_t m = 0;
    double sq[MAX_INPUTS] = {0}, dot[MAX_INPUTS] = {0}, change = 0;
    for (int64_t t0 = 0; t0 < len_total; t0 += TILE) {
        int64_t len = len_total - t0 < TILE ? len_total - t0 : TILE;
        for (int j = 0; j < n; j++) load_tile(kinds[j], xs[j], t0, len, factors[j], xt[j]);
        const float *bt = xt[base];
        for (int64_t i = 0; i < len; i++) total[i] = 0.0f;
        int slot = 0;
        for (int j = 0; j < n; j++) {
            if (j == base) continue;
            float *restrict d = dt[slot];
            const uint32_t t = thr[slot];
            for (int64_t i = 0; i < len; i++) {
                float v = xt[j][i] - bt[i];
                uint32_t b = abs_bits(v);
                /* NaN is never kept: torch's comparisons with it are false (its magnitude sorts highest) */
                d[i] = (b > t && b <= 0x7F800000u) ? v : 0.0f;
            }
            if (quota[slot] > kept_eq[slot] && t <= 0x7F800000u) { /* equal magnitudes at the threshold: first ones */
                for (int64_t i = 0; i < len; i++) {
                    float v = xt[j][i] - bt[i];
                    if (abs_bits(v) == t && kept_eq[slot] < quota[slot]) {
                        d[i] = v;
                        kept_eq[slot]++;
                    }
                }
            }
            const float wj = w[slot];
            float *restrict o = wd[slot];
            for (int64_t i = 0; i < len; i++) {
                o[i] = d[i] * wj;
                total[i] = total[i] + o[i];
            }
            slot++;
        }
        for (int64_t i = 0; i < len; i++) {
            merged[i] = 0.0f;
            divisor[i] = 0.0f;
        }
        for (int s = 0; s < slot; s++) {
            const float ws_ = w[s];
            for (int64_t i = 0; i < len; i++) {
                float e = total[i] >= 0.0f ? 1.0f : -1.0f;
                float sg = dt[s][i] > 0.0f ? 1.0f : (dt[s][i] < 0.0f ? -1.0f : 0.0f);
                int agree = sg == e;
                merged[i] = merged[i] + (agree ? wd[s][i] : 0.0f);
                divisor[i] = divisor[i] + (agree ? ws_ : 0.0f);
            }
        }
        for (int64_t i = 0; i < len; i++) {
            float mg = merged[i];
            if (normalize) mg = mg / (divisor[i] == 0.0f ? 1.0f : divisor[i]);
            float v = bt[i] + mg * scale;
            y[t0 + i] = v;
            uint32_t b = abs_bits(v);
            m = b > m ? b : m;
        }
        if (sums) {
            for (int j = 0; j < n; j++) {
                double s = 0, dd = 0;
                for (int64_t i = 0; i < len; i++) {
                    s += (double)xt[j][i] * xt[j][i];
                    dd += (double)xt[0][i] * xt[j][i];
                }
                sq[j] += s;
                dot[j] += dd;
            }
            double c = 0;
            for (int64_t i = 0; i < len; i++) {
                double v = (double)y[t0 + i] - xt[0][i];
                c += v * v;
            }
            change += c;
        }
    }
    if (sums) {
        for (int j = 0; j < n; j++) {
            sums[j] = sq[j];
            sums[n + j] = dot[j];
        }
        sums[2 * n] = change;
    }
    *amax_bits = m;
    return 0;
}
