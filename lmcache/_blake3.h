/* BLAKE3 in hash mode with 32-byte digests, for lmcache._hashchain (see _blake3.c). */
#ifndef LMCACHE_BLAKE3_H
#define LMCACHE_BLAKE3_H

#include <stddef.h>
#include <stdint.h>

#define LM_BLAKE3_OUT_LEN 32

/* How many inputs lm_blake3_many hashes side by side: more per call gain nothing. */
#define LM_BLAKE3_LANES 16

/* The BLAKE3 digests of `count` inputs of `len` bytes each, input i at data + i * len, digest i
 * written to out + 32 * i. Inputs are hashed side by side, one per SIMD lane. Needs no Python. */
int lm_blake3_many(const uint8_t *data, size_t len, size_t count, uint8_t *out);

/* The BLAKE3 digest of one 64-byte input (one compression). */
void lm_blake3_64(const uint8_t in[64], uint8_t out[LM_BLAKE3_OUT_LEN]);

#endif
