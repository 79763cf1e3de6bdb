/* mpicomm.shm._core, the sums: see sums.h. Conversions as torch makes them, then the sums. */
#include <math.h>
#include <string.h>

#include "sums.h"

#define BLK 256 /* elements summed per block (the accumulator stays in L1) */

/* ------------------------------------------------------------------ conversions (as torch) */

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* torch's vectorised conversion (ATen cvtfp32_bf16, AVX2/AVX512): round to nearest even, every
   NaN becomes 0xFFFF. The scalar c10 conversion gives 0x7FC0 instead; torch's CPU kernels use the
   vectorised one for all elements of a contiguous sum, so that is the one matched here (the unit
   tests compare bits with torch, NaN included). */
static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    return f != f ? (uint16_t)0xFFFFu : (uint16_t)r;
}

/* fp16 <-> fp32 as c10's fp16_ieee_to_fp32_value / fp16_ieee_from_fp32_value (bit exact, round
   to nearest even), except that a NaN keeps its sign and the top 10 bits of its payload, quieted,
   as torch's vectorised conversion (F16C vcvtps2ph) does; c10's scalar code gives 0x7E00. */
static inline float fp32_from_bits(uint32_t w) {
    float f;
    memcpy(&f, &w, 4);
    return f;
}
static inline uint32_t fp32_to_bits(float f) {
    uint32_t w;
    memcpy(&w, &f, 4);
    return w;
}

static inline float f16_to_f32(uint16_t h) {
    const uint32_t w = (uint32_t)h << 16;
    const uint32_t sign = w & 0x80000000u;
    const uint32_t two_w = w + w;
    const uint32_t exp_offset = 0xE0u << 23;
    const float exp_scale = 0x1.0p-112f;
    const float normalized = fp32_from_bits((two_w >> 4) + exp_offset) * exp_scale;
    const uint32_t magic_mask = 126u << 23;
    const float magic_bias = 0.5f;
    const float denormalized = fp32_from_bits((two_w >> 17) | magic_mask) - magic_bias;
    const uint32_t denormalized_cutoff = 1u << 27;
    const uint32_t result =
        sign | (two_w < denormalized_cutoff ? fp32_to_bits(denormalized) : fp32_to_bits(normalized));
    return fp32_from_bits(result);
}

static inline uint16_t f32_to_f16(float f) {
    const float scale_to_inf = 0x1.0p+112f;
    const float scale_to_zero = 0x1.0p-110f;
    float base = (fabsf(f) * scale_to_inf) * scale_to_zero;
    const uint32_t w = fp32_to_bits(f);
    const uint32_t shl1_w = w + w;
    const uint32_t sign = w & 0x80000000u;
    uint32_t bias = shl1_w & 0xFF000000u;
    if (bias < 0x71000000u) bias = 0x71000000u;
    base = fp32_from_bits((bias >> 1) + 0x07800000u) + base;
    const uint32_t bits = fp32_to_bits(base);
    const uint32_t exp_bits = (bits >> 13) & 0x00007C00u;
    const uint32_t mantissa_bits = bits & 0x00000FFFu;
    const uint32_t nonsign = exp_bits + mantissa_bits;
    const uint32_t nan = 0x7E00u | ((w >> 13) & 0x03FFu);
    return (uint16_t)((sign >> 16) | (shl1_w > 0xFF000000u ? nan : nonsign));
}

/* ------------------------------------------------------------------ sums in rank order */

/* dst (and dst2 when not NULL) = src[0] + src[1] + ... + src[w-1], n elements, left to right. */
#define SUM_SAME(NAME, T, OP)                                                                   \
    __attribute__((target_clones("avx512f", "avx2", "default"))) void NAME(                    \
        void *dst_, void *dst2_, const void **src_, int w, size_t n) {                          \
        T *dst = (T *)dst_, *dst2 = (T *)dst2_;                                                 \
        const T **src = (const T **)src_;                                                       \
        T acc[BLK];                                                                             \
        for (size_t i0 = 0; i0 < n; i0 += BLK) {                                                \
            size_t m = n - i0 < BLK ? n - i0 : BLK;                                             \
            const T *s0 = src[0] + i0;                                                          \
            if (w == 2) {                                                                       \
                const T *s1 = src[1] + i0;                                                      \
                for (size_t j = 0; j < m; j++) acc[j] = (T)(s0[j] OP s1[j]);                    \
            } else {                                                                            \
                for (size_t j = 0; j < m; j++) acc[j] = s0[j];                                  \
                for (int r = 1; r < w; r++) {                                                   \
                    const T *s = src[r] + i0;                                                   \
                    for (size_t j = 0; j < m; j++) acc[j] = (T)(acc[j] OP s[j]);                \
                }                                                                               \
            }                                                                                   \
            memcpy(dst + i0, acc, m * sizeof(T));                                               \
            if (dst2) memcpy(dst2 + i0, acc, m * sizeof(T));                                    \
        }                                                                                       \
    }

SUM_SAME(sum_bool, uint8_t, |)
SUM_SAME(sum_i8, uint8_t, +)
SUM_SAME(sum_i16, uint16_t, +)
SUM_SAME(sum_i32, uint32_t, +)
SUM_SAME(sum_i64, uint64_t, +)
SUM_SAME(sum_f32, float, +)
SUM_SAME(sum_f64, double, +)

#define SUM_NARROW(NAME, TO32, FROM32)                                                          \
    __attribute__((target_clones("avx512f", "avx2", "default"))) void NAME(                    \
        void *dst_, void *dst2_, const void **src_, int w, size_t n) {                          \
        uint16_t *dst = (uint16_t *)dst_, *dst2 = (uint16_t *)dst2_;                            \
        const uint16_t **src = (const uint16_t **)src_;                                         \
        float acc[BLK];                                                                         \
        uint16_t out[BLK];                                                                      \
        for (size_t i0 = 0; i0 < n; i0 += BLK) {                                                \
            size_t m = n - i0 < BLK ? n - i0 : BLK;                                             \
            const uint16_t *s0 = src[0] + i0;                                                   \
            for (size_t j = 0; j < m; j++) acc[j] = TO32(s0[j]);                                \
            for (int r = 1; r < w; r++) {                                                       \
                const uint16_t *s = src[r] + i0;                                                \
                for (size_t j = 0; j < m; j++) acc[j] += TO32(s[j]);                            \
            }                                                                                   \
            for (size_t j = 0; j < m; j++) out[j] = FROM32(acc[j]);                             \
            memcpy(dst + i0, out, m * 2);                                                       \
            if (dst2) memcpy(dst2 + i0, out, m * 2);                                            \
        }                                                                                       \
    }

SUM_NARROW(sum_bf16, bf16_to_f32, f32_to_bf16)
SUM_NARROW(sum_f16, f16_to_f32, f32_to_f16)

/* SUM_NARROW without the rounding: float32 results (the wide kinds), copied straight from the
   accumulator; a shared macro staging them through SUM_NARROW's second buffer was measured
   slower (docs/shm.md, "Measured"). */
#define SUM_WIDE(NAME, TO32)                                                                    \
    __attribute__((target_clones("avx512f", "avx2", "default"))) void NAME(                    \
        void *dst_, void *dst2_, const void **src_, int w, size_t n) {                          \
        float *dst = (float *)dst_, *dst2 = (float *)dst2_;                                     \
        const uint16_t **src = (const uint16_t **)src_;                                         \
        float acc[BLK];                                                                         \
        for (size_t i0 = 0; i0 < n; i0 += BLK) {                                                \
            size_t m = n - i0 < BLK ? n - i0 : BLK;                                             \
            const uint16_t *s0 = src[0] + i0;                                                   \
            for (size_t j = 0; j < m; j++) acc[j] = TO32(s0[j]);                                \
            for (int r = 1; r < w; r++) {                                                       \
                const uint16_t *s = src[r] + i0;                                                \
                for (size_t j = 0; j < m; j++) acc[j] += TO32(s[j]);                            \
            }                                                                                   \
            memcpy(dst + i0, acc, m * 4);                                                       \
            if (dst2) memcpy(dst2 + i0, acc, m * 4);                                            \
        }                                                                                       \
    }

SUM_WIDE(sum_bf16_wide, bf16_to_f32)
SUM_WIDE(sum_f16_wide, f16_to_f32)

/* The same sums written for AVX-512 (16 floats per instruction; compilers vectorise the portable
   ones above only 8 wide, and the narrow-float conversions dominate): the conversions are the ones
   above, lane for lane, so the bits are the same. Chosen at import where the CPU has AVX-512. */
#if defined(__x86_64__)
#include <immintrin.h>
#define AVX512 __attribute__((target("avx512f,avx512bw,avx512vl")))

AVX512 static inline __m512 load_bf16(const uint16_t *p) {
    __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}
AVX512 static inline __m256i to_bf16(__m512 v) { /* f32_to_bf16, 16 lanes */
    __m512i x = _mm512_castps_si512(v);
    __m512i odd = _mm512_and_si512(_mm512_srli_epi32(x, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(x, odd), _mm512_set1_epi32(0x7FFF)), 16);
    r = _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(v, v, _CMP_ORD_Q), _mm512_set1_epi32(0xFFFF), r);
    return _mm512_cvtepi32_epi16(r);
}
AVX512 static inline __m512 load_f16(const uint16_t *p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
}
AVX512 static inline __m256i to_f16(__m512 v) { /* f32_to_f16, 16 lanes (vcvtps2ph) */
    return _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}

AVX512 static inline void store_bf16(uint16_t *o, __m512 v) {
    _mm256_storeu_si256((__m256i *)o, to_bf16(v));
}
AVX512 static inline void store_f16(uint16_t *o, __m512 v) {
    _mm256_storeu_si256((__m256i *)o, to_f16(v));
}
AVX512 static inline __m512 load_f32(const float *p) { return _mm512_loadu_ps(p); }
AVX512 static inline void store_f32(float *o, __m512 v) { _mm512_storeu_ps(o, v); }
static inline float as_f32(float v) { return v; }

/* SUM_SAME / SUM_NARROW above, 16 lanes at a time (the tail of a block element by element):
   T in memory, LOAD/STORE convert 16 of them to/from float32, TO32/FROM32 one. */
#define SUM_512(NAME, T, LOAD, STORE, TO32, FROM32)                                             \
    AVX512 static void NAME(void *dst_, void *dst2_, const void **src_, int w, size_t n) {   \
        T *dst = (T *)dst_, *dst2 = (T *)dst2_;                                                 \
        const T **src = (const T **)src_;                                                       \
        T out[BLK];                                                                             \
        for (size_t i0 = 0; i0 < n; i0 += BLK) {                                                \
            size_t m = n - i0 < BLK ? n - i0 : BLK, j = 0;                                      \
            T *o = dst2 ? out : dst + i0;                                                       \
            for (; j + 16 <= m; j += 16) {                                                      \
                __m512 a = LOAD(src[0] + i0 + j);                                               \
                for (int r = 1; r < w; r++) a = _mm512_add_ps(a, LOAD(src[r] + i0 + j));        \
                STORE(o + j, a);                                                                \
            }                                                                                   \
            for (; j < m; j++) {                                                                \
                float a = TO32(src[0][i0 + j]);                                                 \
                for (int r = 1; r < w; r++) a += TO32(src[r][i0 + j]);                          \
                o[j] = FROM32(a);                                                               \
            }                                                                                   \
            if (o == out) {                                                                     \
                memcpy(dst + i0, out, m * sizeof(T));                                           \
                memcpy(dst2 + i0, out, m * sizeof(T));                                          \
            }                                                                                   \
        }                                                                                       \
    }

SUM_512(sum_bf16_512, uint16_t, load_bf16, store_bf16, bf16_to_f32, f32_to_bf16)
SUM_512(sum_f16_512, uint16_t, load_f16, store_f16, f16_to_f32, f32_to_f16)
SUM_512(sum_f32_512, float, load_f32, store_f32, as_f32, as_f32)
#endif

sum_fn sum_of[] = {NULL,    sum_bool, sum_i8,  sum_i16,  sum_i32,       sum_i64,
                   sum_f32, sum_f64,  sum_bf16, sum_f16, sum_bf16_wide, sum_f16_wide};

void choose_sums(void) {
#if defined(__x86_64__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl")) {
        sum_of[KIND_BF16] = sum_bf16_512;
        sum_of[KIND_F16] = sum_f16_512;
        sum_of[KIND_F32] = sum_f32_512;
    }
#endif
}

