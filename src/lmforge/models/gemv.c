/* y (M, N) = x (M, K) @ w (N, K)^T + b for 1 <= M <= 8 rows: the matmul of a decode step.
 *
 * A decode step is bound by reading the weights from memory, so the kernel reads each weight
 * row once for all M rows of x (which stay in L1/L2), with AVX2 + FMA, several weight rows at a
 * time so the FMAs of different outputs overlap. Threads split the output columns.
 *
 * Every output is summed in the same order (8-wide partial sums over k, then the 8 lanes, then the
 * k % 8 tail) whatever M and the tile shape are, so a row's result does not depend on which other
 * rows share the batch.
 *
 * Compiled on first use by lmforge/models/kernels.py; all tensors contiguous float32. */

#include <immintrin.h>
#include <stdint.h>

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* One output: the dot product of x row m and w row n, plus the bias. */
static inline float finish(__m256 acc, const float *x, const float *w, const float *b, int64_t n, int64_t k, int64_t K) {
    float s = hsum(acc);
    for (; k < K; k++) s += x[k] * w[k];
    return s + (b ? b[n] : 0.0f);
}

/* Columns [n0, n1) of y for MB rows of x, R weight rows per pass (MB * R <= 8 accumulators).
 * PF > 0 prefetches each weight row PF floats ahead: with many rows of x per weight the loads of
 * x crowd out the hardware prefetcher's lead (measured +15-20% at 8 rows, a loss at 1 row). */
#define TILE(MB, R, PF)                                                                                    \
    static void tile_##MB(const float *x, const float *w, const float *b, float *y, int64_t N, int64_t K, \
                          int64_t n0, int64_t n1) {                                                      \
        int64_t n = n0;                                                                                  \
        for (; n + R <= n1; n += R) {                                                                    \
            __m256 acc[R][MB];                                                                           \
            for (int r = 0; r < R; r++)                                                                  \
                for (int m = 0; m < MB; m++) acc[r][m] = _mm256_setzero_ps();                            \
            int64_t k = 0;                                                                               \
            for (; k + 8 <= K; k += 8) {                                                                 \
                __m256 xv[MB];                                                                           \
                for (int m = 0; m < MB; m++) xv[m] = _mm256_loadu_ps(x + m * K + k);                     \
                for (int r = 0; r < R; r++) {                                                            \
                    __m256 wv = _mm256_loadu_ps(w + (n + r) * K + k);                                    \
                    if (PF) _mm_prefetch((const char *)(w + (n + r) * K + k + PF), _MM_HINT_T0);         \
                    for (int m = 0; m < MB; m++) acc[r][m] = _mm256_fmadd_ps(wv, xv[m], acc[r][m]);      \
                }                                                                                        \
            }                                                                                            \
            for (int r = 0; r < R; r++)                                                                  \
                for (int m = 0; m < MB; m++)                                                             \
                    y[m * N + n + r] = finish(acc[r][m], x + m * K, w + (n + r) * K, b, n + r, k, K);    \
        }                                                                                                \
        for (; n < n1; n++)                                                                              \
            for (int m = 0; m < MB; m++) {                                                               \
                __m256 acc = _mm256_setzero_ps();                                                        \
                int64_t k = 0;                                                                           \
                for (; k + 8 <= K; k += 8)                                                               \
                    acc = _mm256_fmadd_ps(_mm256_loadu_ps(w + n * K + k), _mm256_loadu_ps(x + m * K + k), acc); \
                y[m * N + n] = finish(acc, x + m * K, w + n * K, b, n, k, K);                            \
            }                                                                                            \
    }

TILE(1, 4, 0)
TILE(2, 4, 0)
TILE(3, 2, 0)
TILE(4, 2, 512)
TILE(5, 1, 512)
TILE(6, 1, 512)
TILE(7, 1, 512)
TILE(8, 1, 512)

typedef void (*tile_fn)(const float *, const float *, const float *, float *, int64_t, int64_t, int64_t, int64_t);
static const tile_fn TILES[9] = {0, tile_1, tile_2, tile_3, tile_4, tile_5, tile_6, tile_7, tile_8};

int lmforge_gemv(const float *x, const float *w, const float *b, float *y, int64_t M, int64_t N, int64_t K,
                 int threads) {
    if (M < 1 || M > 8 || threads < 1) return 1;
    tile_fn tile = TILES[M];
    int64_t per = ((N + threads - 1) / threads + 7) / 8 * 8; /* columns per thread, a multiple of 8 */
#pragma omp parallel for num_threads(threads) schedule(static, 1)
    for (int t = 0; t < threads; t++) {
        int64_t n0 = t * per, n1 = n0 + per < N ? n0 + per : N;
        if (n0 < n1) tile(x, w, b, y, N, K, n0, n1);
    }
    return 0;
}
