/* Native kernels for decode steps (one new token per sequence), compiled on first use by
 * lmforge/models/kernels.py, which checks every shape, stride and dtype these functions trust.
 *
 * lmforge_gemv: y (M, N) = x (M, K) @ w (N, K)^T + b for 1 <= M <= 8 rows, the matmul of a decode
 * step. A decode step is bound by reading the weights from memory, so the kernel reads each weight
 * row once for all M rows of x (which stay in L1/L2), with AVX2 + FMA, several weight rows at a
 * time so the FMAs of different outputs overlap. Threads split the output columns.
 *
 * Every output is summed in the same order (8-wide partial sums over k, then the 8 lanes, then the
 * k % 8 tail) whatever M and the tile shape are, so a row's result does not depend on which other
 * rows share the batch.
 *
 * lmforge_decode_attention: store each sequence's new key and value in its KV cache, then attend
 * its one query over the cache, in one pass over the keys and values (online softmax).
 *
 * lmforge_gelu_tanh(_backward): GPT-2's GELU and its derivative in one vectorised pass each;
 * PyTorch's tanh is slow on these CPUs (benchmarks/train_throughput.py). */

#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

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
 * x crowd out the hardware prefetcher's lead (a gain from 4 rows up, a loss at 1: benchmarks/decode.py). */
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

/* ---------------------------------------------------------------- int8 / int4 weight-only matmuls
 *
 * The same decode-step matmul over weights stored as integers (quantize/linear.py's formats), read
 * in their packed form and widened to float32 in registers, so a step streams 1 (int8) or 1/2
 * (int4) byte per weight instead of 4; the whole float matrix is never formed.
 *
 * int8: q (N, K) int8, one scale per row: y = s[n] * (x . q[n]) + b[n].
 * int4: q (N, K / 2) uint8, element k of a row in byte k / 2 (even k in the low nibble), groups of
 * G consecutive elements with a float32 scale and a uint8 zero point each: w = (q - z) * s. The
 * kernel forms each weight exactly as dequantize does (integer q - z, then one multiply by s) and
 * feeds it to the FMAs. Low nibbles hold the even elements and high nibbles the odd ones, so x is
 * first copied into the same order, 16 elements at a time (evens, then odds). K % G == 0 and
 * G % 32 == 0 (checked by kernels.py). */

/* Each weight row is prefetched QPF bytes ahead of its loads. The hardware prefetcher alone keeps
 * too few lines in flight for a kernel that reads 16 bytes of several rows per step: the loads
 * stall on memory, and a step ran at half the float kernel's bytes per second. With it, the
 * quantized matmuls stream at the float kernel's rate (benchmarks/decode.py's int8 / int4 rows). */
#define QPF 4096
#define PREFETCH(p) _mm_prefetch((const char *)(p) + QPF, _MM_HINT_T0)

static inline __m256 widen_q8(const int8_t *p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}

/* Outputs n .. n+R-1 of MB rows; int8 weights. */
#define Q8_BLOCK(MB, R)                                                                                      \
    static inline void q8_block_##MB##_##R(const float *x, const int8_t *w, const float *s, const float *b,     \
                                           float *y, int64_t N, int64_t K, int64_t n) {                    \
        __m256 acc[R][MB];                                                                                   \
        for (int r = 0; r < R; r++)                                                                          \
            for (int m = 0; m < MB; m++) acc[r][m] = _mm256_setzero_ps();                                    \
        int64_t k = 0;                                                                                       \
        for (; k + 8 <= K; k += 8)                                                                           \
            for (int r = 0; r < R; r++) {                                                                    \
                PREFETCH(w + (n + r) * K + k);                                                               \
                __m256 wv = widen_q8(w + (n + r) * K + k);                                                   \
                for (int m = 0; m < MB; m++) acc[r][m] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + m * K + k), acc[r][m]); \
            }                                                                                                \
        for (int r = 0; r < R; r++)                                                                          \
            for (int m = 0; m < MB; m++) {                                                                   \
                float t = hsum(acc[r][m]);                                                                   \
                for (int64_t j = k; j < K; j++) t += x[m * K + j] * (float)w[(n + r) * K + j];               \
                y[m * N + n + r] = t * s[n + r] + (b ? b[n + r] : 0.0f);                                     \
            }                                                                                                \
    }

/* Outputs n .. n+R-1 of MB rows; int4 weights, xp holds x in nibble order. A nibble q becomes the
 * float 2^23 + q by setting the exponent bits (exact, no conversion instruction), and subtracting
 * 2^23 + z leaves exactly q - z, as dequantize computes it. */
#define Q4_BLOCK(MB, R)                                                                                      \
    static inline void q4_block_##MB##_##R(const float *xp, const uint8_t *w, const float *s, const uint8_t *z, \
                                           const float *b, float *y, int64_t N, int64_t K, int64_t G, int64_t n) { \
        __m256 acc[R][MB], sv[R], zv[R];                                                                     \
        const __m256i low = _mm256_set1_epi32(0x0F), two23 = _mm256_set1_epi32(0x4B000000);                  \
        int64_t groups = K / G;                                                                              \
        for (int r = 0; r < R; r++)                                                                          \
            for (int m = 0; m < MB; m++) acc[r][m] = _mm256_setzero_ps();                                    \
        for (int64_t g = 0; g < groups; g++) {                                                               \
            for (int r = 0; r < R; r++) {                                                                    \
                sv[r] = _mm256_set1_ps(s[(n + r) * groups + g]);                                             \
                zv[r] = _mm256_set1_ps(8388608.0f + z[(n + r) * groups + g]);                                \
            }                                                                                                \
            for (int64_t k = g * G; k < (g + 1) * G; k += 16)                                                \
                for (int r = 0; r < R; r++) {                                                                \
                    PREFETCH(w + (n + r) * (K / 2) + k / 2);                                                 \
                    __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(w + (n + r) * (K / 2) + k / 2))); \
                    __m256 qe = _mm256_castsi256_ps(_mm256_or_si256(_mm256_and_si256(v, low), two23));       \
                    __m256 qo = _mm256_castsi256_ps(_mm256_or_si256(_mm256_srli_epi32(v, 4), two23));        \
                    __m256 even = _mm256_mul_ps(_mm256_sub_ps(qe, zv[r]), sv[r]);                            \
                    __m256 odd = _mm256_mul_ps(_mm256_sub_ps(qo, zv[r]), sv[r]);                             \
                    for (int m = 0; m < MB; m++) {                                                           \
                        acc[r][m] = _mm256_fmadd_ps(even, _mm256_loadu_ps(xp + m * K + k), acc[r][m]);       \
                        acc[r][m] = _mm256_fmadd_ps(odd, _mm256_loadu_ps(xp + m * K + k + 8), acc[r][m]);    \
                    }                                                                                        \
                }                                                                                            \
        }                                                                                                    \
        for (int r = 0; r < R; r++)                                                                          \
            for (int m = 0; m < MB; m++) y[m * N + n + r] = hsum(acc[r][m]) + (b ? b[n + r] : 0.0f);         \
    }

/* Columns [n0, n1) of MB rows: R outputs per pass, then one at a time (blocks defined below). */
#define Q_TILES(MB, R)                                                                                       \
    static void q8_tile_##MB(const float *x, const void *w, const float *s, const uint8_t *z, const float *b,  \
                             float *y, int64_t N, int64_t K, int64_t G, int64_t n0, int64_t n1) {            \
        (void)z, (void)G;                                                                                    \
        int64_t n = n0;                                                                                      \
        for (; n + R <= n1; n += R) q8_block_##MB##_##R(x, w, s, b, y, N, K, n);                             \
        for (; n < n1; n++) q8_block_##MB##_1(x, w, s, b, y, N, K, n);                                       \
    }                                                                                                        \
    static void q4_tile_##MB(const float *x, const void *w, const float *s, const uint8_t *z, const float *b,  \
                             float *y, int64_t N, int64_t K, int64_t G, int64_t n0, int64_t n1) {            \
        int64_t n = n0;                                                                                      \
        for (; n + R <= n1; n += R) q4_block_##MB##_##R(x, w, s, z, b, y, N, K, G, n);                       \
        for (; n < n1; n++) q4_block_##MB##_1(x, w, s, z, b, y, N, K, G, n);                                 \
    }

#define Q_BLOCKS(MB, R) Q8_BLOCK(MB, R) Q4_BLOCK(MB, R)
Q_BLOCKS(1, 1) Q_BLOCKS(2, 1) Q_BLOCKS(3, 1) Q_BLOCKS(4, 1) Q_BLOCKS(5, 1) Q_BLOCKS(6, 1) Q_BLOCKS(7, 1) Q_BLOCKS(8, 1)
Q_BLOCKS(1, 4) Q_BLOCKS(2, 4) Q_BLOCKS(3, 2) Q_BLOCKS(4, 2)

Q_TILES(1, 4)
Q_TILES(2, 4)
Q_TILES(3, 2)
Q_TILES(4, 2)
Q_TILES(5, 1)
Q_TILES(6, 1)
Q_TILES(7, 1)
Q_TILES(8, 1)

typedef void (*q_tile_fn)(const float *, const void *, const float *, const uint8_t *, const float *, float *,
                          int64_t, int64_t, int64_t, int64_t, int64_t);
static const q_tile_fn Q8_TILES[9] = {0, q8_tile_1, q8_tile_2, q8_tile_3, q8_tile_4, q8_tile_5, q8_tile_6, q8_tile_7, q8_tile_8};
static const q_tile_fn Q4_TILES[9] = {0, q4_tile_1, q4_tile_2, q4_tile_3, q4_tile_4, q4_tile_5, q4_tile_6, q4_tile_7, q4_tile_8};

/* The same blocks with AVX-512 (16 floats a vector), compiled for that ISA alone and chosen at run
 * time where the CPU has it: the int4 inner loop is bound by its widening instructions, not by
 * memory, so twice the width is up to twice the speed. int4 reads 32 weights (16 bytes) a step,
 * so here x's nibble order is by 32: the 16 even elements, then the 16 odd ones. */
#define AVX512 __attribute__((target("avx512f,avx512bw")))

#define Q8_BLOCK512(MB, R)                                                                                   \
    AVX512 static inline void q8w_block_##MB##_##R(const float *x, const int8_t *w, const float *s, const float *b, \
                                                   float *y, int64_t N, int64_t K, int64_t n) {            \
        __m512 acc[R][MB];                                                                                   \
        for (int r = 0; r < R; r++)                                                                          \
            for (int m = 0; m < MB; m++) acc[r][m] = _mm512_setzero_ps();                                    \
        int64_t k = 0;                                                                                       \
        for (; k + 16 <= K; k += 16)                                                                         \
            for (int r = 0; r < R; r++) {                                                                    \
                PREFETCH(w + (n + r) * K + k);                                                               \
                __m512 wv = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(w + (n + r) * K + k)))); \
                for (int m = 0; m < MB; m++) acc[r][m] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + m * K + k), acc[r][m]); \
            }                                                                                                \
        for (int r = 0; r < R; r++)                                                                          \
            for (int m = 0; m < MB; m++) {                                                                   \
                float t = _mm512_reduce_add_ps(acc[r][m]);                                                   \
                for (int64_t j = k; j < K; j++) t += x[m * K + j] * (float)w[(n + r) * K + j];               \
                y[m * N + n + r] = t * s[n + r] + (b ? b[n + r] : 0.0f);                                     \
            }                                                                                                \
    }

/* int4 here needs no arithmetic per weight but the FMA: per group and weight row, the 16 values
 * (q - z) * s a nibble q can stand for, formed exactly as dequantize forms them, fill one register,
 * and a permute (which reads only the low 4 bits of each index) looks each weight up in it. */
#define Q4_BLOCK512(MB, R)                                                                                   \
    AVX512 static inline void q4w_block_##MB##_##R(const float *xp, const uint8_t *w, const float *s, const uint8_t *z, \
                                                   const float *b, float *y, int64_t N, int64_t K, int64_t G, int64_t n) { \
        __m512 acc[R][MB], table[R];                                                                         \
        const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);            \
        int64_t groups = K / G;                                                                              \
        for (int r = 0; r < R; r++)                                                                          \
            for (int m = 0; m < MB; m++) acc[r][m] = _mm512_setzero_ps();                                    \
        for (int64_t g = 0; g < groups; g++) {                                                               \
            for (int r = 0; r < R; r++)                                                                      \
                table[r] = _mm512_mul_ps(_mm512_sub_ps(iota, _mm512_set1_ps((float)z[(n + r) * groups + g])), \
                                         _mm512_set1_ps(s[(n + r) * groups + g]));                           \
            for (int64_t k = g * G; k < (g + 1) * G; k += 32)                                                \
                for (int r = 0; r < R; r++) {                                                                \
                    PREFETCH(w + (n + r) * (K / 2) + k / 2);                                                 \
                    __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(w + (n + r) * (K / 2) + k / 2))); \
                    __m512 even = _mm512_permutexvar_ps(v, table[r]);                                        \
                    __m512 odd = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), table[r]);                   \
                    for (int m = 0; m < MB; m++) {                                                           \
                        acc[r][m] = _mm512_fmadd_ps(even, _mm512_loadu_ps(xp + m * K + k), acc[r][m]);       \
                        acc[r][m] = _mm512_fmadd_ps(odd, _mm512_loadu_ps(xp + m * K + k + 16), acc[r][m]);   \
                    }                                                                                        \
                }                                                                                            \
        }                                                                                                    \
        for (int r = 0; r < R; r++)                                                                          \
            for (int m = 0; m < MB; m++) y[m * N + n + r] = _mm512_reduce_add_ps(acc[r][m]) + (b ? b[n + r] : 0.0f); \
    }

#define QW_TILES(MB, R)                                                                                      \
    AVX512 static void q8w_tile_##MB(const float *x, const void *w, const float *s, const uint8_t *z, const float *b, \
                                     float *y, int64_t N, int64_t K, int64_t G, int64_t n0, int64_t n1) {    \
        (void)z, (void)G;                                                                                    \
        int64_t n = n0;                                                                                      \
        for (; n + R <= n1; n += R) q8w_block_##MB##_##R(x, w, s, b, y, N, K, n);                            \
        for (; n < n1; n++) q8w_block_##MB##_1(x, w, s, b, y, N, K, n);                                      \
    }                                                                                                        \
    AVX512 static void q4w_tile_##MB(const float *x, const void *w, const float *s, const uint8_t *z, const float *b, \
                                     float *y, int64_t N, int64_t K, int64_t G, int64_t n0, int64_t n1) {    \
        int64_t n = n0;                                                                                      \
        for (; n + R <= n1; n += R) q4w_block_##MB##_##R(x, w, s, z, b, y, N, K, G, n);                      \
        for (; n < n1; n++) q4w_block_##MB##_1(x, w, s, z, b, y, N, K, G, n);                                \
    }

#define QW_BLOCKS(MB, R) Q8_BLOCK512(MB, R) Q4_BLOCK512(MB, R)
QW_BLOCKS(1, 1) QW_BLOCKS(2, 1) QW_BLOCKS(3, 1) QW_BLOCKS(4, 1) QW_BLOCKS(5, 1) QW_BLOCKS(6, 1) QW_BLOCKS(7, 1) QW_BLOCKS(8, 1)
QW_BLOCKS(1, 4) QW_BLOCKS(2, 4) QW_BLOCKS(3, 2) QW_BLOCKS(4, 2)

QW_TILES(1, 4)
QW_TILES(2, 4)
QW_TILES(3, 2)
QW_TILES(4, 2)
QW_TILES(5, 1)
QW_TILES(6, 1)
QW_TILES(7, 1)
QW_TILES(8, 1)

static const q_tile_fn Q8W_TILES[9] = {0, q8w_tile_1, q8w_tile_2, q8w_tile_3, q8w_tile_4, q8w_tile_5, q8w_tile_6, q8w_tile_7, q8w_tile_8};
static const q_tile_fn Q4W_TILES[9] = {0, q4w_tile_1, q4w_tile_2, q4w_tile_3, q4w_tile_4, q4w_tile_5, q4w_tile_6, q4w_tile_7, q4w_tile_8};

/* x (M, K) copied into nibble order by `chunk` (16 for AVX2, 32 for AVX-512): each chunk's even
 * elements, then its odd ones. */
static void nibble_order(const float *x, float *xp, int64_t M, int64_t K, int64_t chunk) {
    int64_t half = chunk / 2;
    for (int64_t m = 0; m < M; m++)
        for (int64_t k = 0; k < K; k += chunk)
            for (int64_t i = 0; i < half; i++) {
                xp[m * K + k + i] = x[m * K + k + 2 * i];
                xp[m * K + k + half + i] = x[m * K + k + 2 * i + 1];
            }
}

/* 1 where the AVX-512 kernels run: the CPU has AVX-512 F + BW and `isa` (0 = best, 2 = AVX2 only) allows it. */
static int wide(int isa) {
    static int have = -1;
    if (have < 0) have = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
    return isa != 2 && have;
}

/* y (M, N) = x (M, K) @ dequantize(w)^T + b for 1 <= M <= 8; bits 8 or 4 (then groups of G, a
 * multiple of 32, and scratch holds M * K floats). isa: 0 = the widest the CPU has, 2 = AVX2 only.
 * Threads split the output columns as lmforge_gemv does. */
int lmforge_gemv_quant(const float *x, const void *w, const float *s, const uint8_t *z, const float *b, float *y,
                       int64_t M, int64_t N, int64_t K, int bits, int64_t G, float *scratch, int isa, int threads) {
    if (M < 1 || M > 8 || threads < 1 || (bits != 8 && bits != 4)) return 1;
    if (bits == 4 && (G < 32 || G % 32 || K % G)) return 1;
    int w512 = wide(isa);
    q_tile_fn tile = bits == 8 ? (w512 ? Q8W_TILES : Q8_TILES)[M] : (w512 ? Q4W_TILES : Q4_TILES)[M];
    if (bits == 4) {
        nibble_order(x, scratch, M, K, w512 ? 32 : 16);
        x = scratch;
    }
    int64_t per = ((N + threads - 1) / threads + 7) / 8 * 8;
#pragma omp parallel for num_threads(threads) schedule(static, 1)
    for (int t = 0; t < threads; t++) {
        int64_t n0 = t * per, n1 = n0 + per < N ? n0 + per : N;
        if (n0 < n1) tile(x, w, s, z, b, y, N, K, G, n0, n1);
    }
    return 0;
}

/* ---------------------------------------------------------------- decode attention */

static inline float dot(const float *a, const float *b, int64_t D) {
    __m256 acc = _mm256_setzero_ps();
    int64_t d = 0;
    for (; d + 8 <= D; d += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + d), _mm256_loadu_ps(b + d), acc);
    float s = hsum(acc);
    for (; d < D; d++) s += a[d] * b[d];
    return s;
}

/* o = o * c + p * v, D floats */
static inline void scale_add(float *o, float c, float p, const float *v, int64_t D) {
    __m256 cv = _mm256_set1_ps(c), pv = _mm256_set1_ps(p);
    int64_t d = 0;
    for (; d + 8 <= D; d += 8)
        _mm256_storeu_ps(o + d, _mm256_fmadd_ps(pv, _mm256_loadu_ps(v + d), _mm256_mul_ps(cv, _mm256_loadu_ps(o + d))));
    for (; d < D; d++) o[d] = o[d] * c + p * v[d];
}

/* softmax(q . K[s] * scale over the allowed s) weighted sum of V[s] into o (D floats): one pass,
 * rescaling the running sum whenever a larger score appears. Zeros if no key is allowed. */
static void attend_one(const float *q, const float *K, const float *V, const uint8_t *allowed, int64_t S,
                       int64_t D, float scale, float *o) {
    float peak = -INFINITY, total = 0.0f;
    memset(o, 0, D * sizeof(float));
    for (int64_t s = 0; s < S; s++) {
        if (!allowed[s]) continue;
        float score = dot(q, K + s * D, D) * scale;
        if (score > peak) {
            float c = expf(peak - score); /* 0 for the first key */
            total = total * c + 1.0f;
            scale_add(o, c, 1.0f, V + s * D, D);
            peak = score;
        } else {
            float p = expf(score - peak);
            total += p;
            scale_add(o, 1.0f, p, V + s * D, D);
        }
    }
    float inv = total > 0.0f ? 1.0f / total : 0.0f;
    for (int64_t d = 0; d < D; d++) o[d] *= inv;
}

/* B sequences, H query heads sharing Hk key/value heads (H % Hk == 0), head size D.
 * q: query of sequence b, head h at q + b*q_sb + h*q_sh; kn, vn: new key/value of b, kv head g at
 * + b*n_sb + g*n_sh (each D contiguous floats). kc, vc: caches (B, Hk, C, D), contiguous; the new
 * key/value of b is written at column cols[b] (0 <= cols[b] < C). allowed (B, S), S <= C: may b's
 * query see column s. out (B, H * D): head h of b at out + (b*H + h)*D, ready for the output
 * projection. Returns 1 on inconsistent sizes, 2 on a column outside the cache, 0 otherwise. */
int lmforge_decode_attention(const float *q, int64_t q_sb, int64_t q_sh, const float *kn, const float *vn,
                             int64_t n_sb, int64_t n_sh, float *kc, float *vc, int64_t C, const int64_t *cols,
                             const uint8_t *allowed, int64_t S, int64_t B, int64_t H, int64_t Hk, int64_t D,
                             float scale, float *out, int threads) {
    if (B < 1 || Hk < 1 || H % Hk || D < 1 || S < 1 || S > C || threads < 1) return 1;
    for (int64_t b = 0; b < B; b++)
        if (cols[b] < 0 || cols[b] >= C) return 2;
    for (int64_t b = 0; b < B; b++)
        for (int64_t g = 0; g < Hk; g++) {
            int64_t at = ((b * Hk + g) * C + cols[b]) * D;
            memcpy(kc + at, kn + b * n_sb + g * n_sh, D * sizeof(float));
            memcpy(vc + at, vn + b * n_sb + g * n_sh, D * sizeof(float));
        }
    int64_t group = H / Hk;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t bh = 0; bh < B * H; bh++) {
        int64_t b = bh / H, h = bh % H, g = h / group;
        attend_one(q + b * q_sb + h * q_sh, kc + (b * Hk + g) * C * D, vc + (b * Hk + g) * C * D, allowed + b * S, S, D,
                   scale, out + bh * D);
    }
    return 0;
}

/* ---------------------------------------------------------------- GELU, tanh approximation */

/* e^x for 8 floats, x clamped to [-87, 88]: 2^n e^r with |r| <= ln2 / 2, e^r by its degree-6
 * Taylor polynomial (ln2 split in two parts for an exact r). Within a few ulp of expf. */
static inline __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.0f / 720);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    __m256i scale = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(scale));
}

#define GELU_C 0.7978845608f /* sqrt(2 / pi) */
#define GELU_A 0.044715f

/* gelu(x) = x s(x), s(x) = (1 + tanh(c (x + a x^3))) / 2 = 1 / (1 + e^(-2c (x + a x^3))) */
static inline __m256 gate8(__m256 x) {
    __m256 cubic = _mm256_fmadd_ps(_mm256_mul_ps(x, x), _mm256_set1_ps(GELU_A), _mm256_set1_ps(1.0f));
    __m256 u = _mm256_mul_ps(_mm256_mul_ps(x, _mm256_set1_ps(-2.0f * GELU_C)), cubic);
    return _mm256_div_ps(_mm256_set1_ps(1.0f), _mm256_add_ps(_mm256_set1_ps(1.0f), exp8(u)));
}

static inline float gate1(float x) { return 1.0f / (1.0f + expf(-2.0f * GELU_C * x * (1.0f + GELU_A * x * x))); }

/* ds/dx = s (1 - s) 2c (1 + 3a x^2) */
static inline float slope1(float x, float s) { return s * (1.0f - s) * 2.0f * GELU_C * (1.0f + 3.0f * GELU_A * x * x); }

/* y = gelu(x), n floats */
void lmforge_gelu_tanh(const float *x, float *y, int64_t n, int threads) {
    int64_t body = n / 8 * 8;
#pragma omp parallel for num_threads(threads) schedule(static) if (n >= 65536)
    for (int64_t i = 0; i < body; i += 8) {
        __m256 v = _mm256_loadu_ps(x + i);
        _mm256_storeu_ps(y + i, _mm256_mul_ps(v, gate8(v)));
    }
    for (int64_t i = body; i < n; i++) y[i] = x[i] * gate1(x[i]);
}

/* out = grad * d gelu(x) / dx = grad (s + x ds/dx), n floats */
void lmforge_gelu_tanh_backward(const float *grad, const float *x, float *out, int64_t n, int threads) {
    int64_t body = n / 8 * 8;
#pragma omp parallel for num_threads(threads) schedule(static) if (n >= 65536)
    for (int64_t i = 0; i < body; i += 8) {
        __m256 v = _mm256_loadu_ps(x + i), s = gate8(v);
        __m256 du = _mm256_fmadd_ps(_mm256_mul_ps(v, v), _mm256_set1_ps(6.0f * GELU_A * GELU_C), _mm256_set1_ps(2.0f * GELU_C));
        __m256 slope = _mm256_mul_ps(_mm256_mul_ps(s, _mm256_sub_ps(_mm256_set1_ps(1.0f), s)), du);
        _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_loadu_ps(grad + i), _mm256_fmadd_ps(v, slope, s)));
    }
    for (int64_t i = body; i < n; i++) {
        float s = gate1(x[i]);
        out[i] = grad[i] * (s + x[i] * slope1(x[i], s));
    }
}
