/* Portable int8 / int4 weight-only decode matmuls: plain C99 + OpenMP, no intrinsics, for CPUs
 * where kernels.c (AVX2 + FMA) cannot run (an x86-64 CPU without AVX2, aarch64, ...). Compiled
 * by lmforge/models/kernels.py with -O3 for the architecture's baseline (on x86-64 without -mavx2),
 * so it loads on any CPU of that architecture; the compiler vectorises the loops.
 *
 * Same contract and C signature as kernels.c's lmforge_gemv_quant (kernels.py checks every
 * shape, stride and dtype): y (M, N) = x (M, K) @ dequantize(w)^T + b for 1 <= M <= 8, with w in
 * quantize/linear.py's formats, read in packed form, so a step streams 1 (int8) or 1/2 (int4)
 * byte per weight; the float matrix is never formed. Each weight row is widened to float32 a
 * CHUNK at a time into a buffer that stays in L1, then multiplied with every row of x.
 *
 * int8: w (N, K) int8, one scale per row: y = s[n] * (x . w[n]) + b[n].
 * int4: w (N, K / 2) uint8, element k of a row in byte k / 2 (even k in the low nibble), groups of
 * G consecutive elements with a float32 scale and a uint8 zero point each: w = (q - z) * s, formed
 * exactly as dequantize forms it (q - z exact in float, then one multiply by s).
 *
 * Vectorised without -ffast-math: each output keeps LANES independent partial sums (lane l takes
 * elements l, l + LANES, ...), so the inner loop is element-wise over lanes and needs no
 * reassociation; LANES is a multiple of every vector width (4, 8 or 16 floats). The lanes are then
 * added in one fixed order, then the K % LANES tail: a row's result does not depend on which other
 * rows share the batch. */

#include <stdint.h>

#define LANES 16  /* partial sums per output */
#define CHUNK 512 /* weights widened at a time (a multiple of LANES): 2 KB of floats, in L1 */
#define MAX_M 8   /* rows of x per call */

/* The LANES partial sums of one output, added in a fixed order (pairwise). */
static float lanes_sum(const float *acc) {
    float t[LANES / 2];
    for (int l = 0; l < LANES / 2; l++) t[l] = acc[l] + acc[l + LANES / 2];
    for (int h = LANES / 4; h >= 1; h /= 2)
        for (int l = 0; l < h; l++) t[l] += t[l + h];
    return t[0];
}

/* acc (LANES partial sums) += w . x over len floats, len a multiple of LANES. */
static inline void dot_lanes(float *restrict acc, const float *restrict w, const float *restrict x, int64_t len) {
    float a[LANES];
    for (int l = 0; l < LANES; l++) a[l] = acc[l];
    for (int64_t k = 0; k < len; k += LANES)
        for (int l = 0; l < LANES; l++) a[l] += w[k + l] * x[k + l];
    for (int l = 0; l < LANES; l++) acc[l] = a[l];
}

/* Elements [c, e) of an int8 row as floats (the row's scale is applied to the sum). */
static inline void widen_int8(float *restrict out, const int8_t *restrict row, int64_t c, int64_t e) {
    for (int64_t k = c; k < e; k++) out[k - c] = (float)row[k];
}

/* Elements [c, e) of an int4 row (c, e even) as dequantize forms them, group by group; s and z
 * are the row's scales and zero points. */
static inline void widen_int4(float *restrict out, const uint8_t *restrict row, const float *s, const uint8_t *z,
                              int64_t G, int64_t c, int64_t e) {
    for (int64_t k = c; k < e;) {
        int64_t g = k / G, end = (g + 1) * G < e ? (g + 1) * G : e;
        float scale = s[g], zero = (float)z[g];
        const uint8_t *bytes = row + k / 2;
        float *o = out + (k - c);
        for (int64_t i = 0; i < (end - k) / 2; i++) {
            o[2 * i] = ((float)(bytes[i] & 0x0F) - zero) * scale;
            o[2 * i + 1] = ((float)(bytes[i] >> 4) - zero) * scale;
        }
        k = end;
    }
}

/* Columns [n0, n1) of all M rows: each weight row is read once, a CHUNK at a time. */
static void columns(const float *x, const void *w, const float *s, const uint8_t *z, const float *b, float *y,
                    int64_t M, int64_t N, int64_t K, int bits, int64_t G, int64_t n0, int64_t n1) {
    float wf[CHUNK];
    int64_t groups = bits == 4 ? K / G : 0, body = K / LANES * LANES;
    for (int64_t n = n0; n < n1; n++) {
        float acc[MAX_M][LANES] = {{0}};
        for (int64_t c = 0; c < K; c += CHUNK) {
            int64_t e = c + CHUNK < K ? c + CHUNK : K;
            if (bits == 8) widen_int8(wf, (const int8_t *)w + n * K, c, e);
            else widen_int4(wf, (const uint8_t *)w + n * (K / 2), s + n * groups, z + n * groups, G, c, e);
            for (int64_t m = 0; m < M; m++) dot_lanes(acc[m], wf, x + m * K + c, (e < body ? e : body) - c);
        }
        int64_t c = (K - 1) / CHUNK * CHUNK; /* the last chunk, still in wf: it holds the tail */
        for (int64_t m = 0; m < M; m++) {
            float t = lanes_sum(acc[m]);
            for (int64_t j = body; j < K; j++) t += x[m * K + j] * wf[j - c];
            y[m * N + n] = (bits == 8 ? t * s[n] : t) + (b ? b[n] : 0.0f);
        }
    }
}

/* y (M, N) = x (M, K) @ dequantize(w)^T + b for 1 <= M <= 8; bits 8 or 4 (then groups of G, a
 * multiple of 32, dividing K). `scratch` and `isa` are kernels.c's (nibble-ordered x, instruction
 * set), unused here. Threads split the output columns as kernels.c does. Returns 1 on bad sizes. */
int lmforge_gemv_quant(const float *x, const void *w, const float *s, const uint8_t *z, const float *b, float *y,
                       int64_t M, int64_t N, int64_t K, int bits, int64_t G, float *scratch, int isa, int threads) {
    (void)scratch, (void)isa;
    if (M < 1 || M > MAX_M || K < 1 || threads < 1 || (bits != 8 && bits != 4)) return 1;
    if (bits == 4 && (G < 32 || G % 32 || K % G)) return 1;
    int64_t per = ((N + threads - 1) / threads + 7) / 8 * 8; /* columns per thread, a multiple of 8 */
#pragma omp parallel for num_threads(threads) schedule(static, 1)
    for (int t = 0; t < threads; t++) {
        int64_t n0 = t * per, n1 = n0 + per < N ? n0 + per : N;
        if (n0 < n1) columns(x, w, s, z, b, y, M, N, K, bits, G, n0, n1);
    }
    return 0;
}
