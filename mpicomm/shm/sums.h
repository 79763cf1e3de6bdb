/* mpicomm.shm._core, the sums (sums.c): every rank's part summed in rank order, as docs/contract.md
   ("Sums") defines them: bf16/fp16 accumulated in fp32 and rounded once to nearest even (NaN as
   torch: see f32_to_bf16); fp32/fp64 (and complex, as pairs) in their own type; integers wrap;
   bool is or. Portable loops built for AVX-512, AVX2 and the baseline, and explicit AVX-512 loops
   for bf16, fp16 and fp32 where the CPU has it (choose_sums). No Python here. */
#ifndef MPICOMM_SHM_SUMS_H
#define MPICOMM_SHM_SUMS_H

#include <stddef.h>
#include <stdint.h>

/* Element kinds; transport.KINDS maps torch dtypes to them (integers of one width share one).
   The wide kinds (reduce_scatter only) sum bf16/fp16 elements into float32 results, unrounded. */
enum { KIND_BOOL = 1, KIND_I8, KIND_I16, KIND_I32, KIND_I64, KIND_F32, KIND_F64, KIND_BF16,
       KIND_F16, KIND_BF16_WIDE, KIND_F16_WIDE };

/* Bytes of an input element, and of a result element. */
static const size_t kind_size[] = {0, 1, 1, 2, 4, 8, 4, 8, 2, 2, 2, 2};
static const size_t out_size[] = {0, 1, 1, 2, 4, 8, 4, 8, 2, 2, 4, 4};

/* dst (and dst2 when not NULL) = src[0] + src[1] + ... + src[w-1], n elements of one kind. */
typedef void (*sum_fn)(void *dst, void *dst2, const void **src, int w, size_t n);
extern sum_fn sum_of[]; /* by kind */

/* Point sum_of at the AVX-512 loops where the CPU has AVX-512F/BW/VL (once, at import). */
void choose_sums(void);

#endif
