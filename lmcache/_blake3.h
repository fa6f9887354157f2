/* BLAKE3 in hash mode with 32-byte digests, for lmcache._hashchain (see _blake3.c). */
#ifndef LMCACHE_BLAKE3_H
#define LMCACHE_BLAKE3_H

#include <stddef.h>
#include <stdint.h>

#define LM_BLAKE3_OUT_LEN 32

/* The most inputs lm_blake3_many hashes side by side: more per call gain nothing. */
#define LM_BLAKE3_LANES 16

/* The BLAKE3 digests of `count` inputs of `len` bytes each, input i at data + i * len, digest i
 * written to out + 32 * i. Inputs are hashed side by side, one per SIMD lane. Needs no Python. */
int lm_blake3_many(const uint8_t *data, size_t len, size_t count, uint8_t *out);

/* lm_blake3_many with `lanes` inputs side by side: -2 (nothing hashed) unless `lanes` is one of the
 * widths lm_blake3_lane_widths gives, -1 out of memory. */
int lm_blake3_many_lanes(const uint8_t *data, size_t len, size_t count, uint8_t *out, int lanes);

/* The lane widths this CPU runs, widest first, into `widths`; returns how many (1 to 3). */
int lm_blake3_lane_widths(int widths[3]);

/* The BLAKE3 digest of one 64-byte input (one compression). */
void lm_blake3_64(const uint8_t in[64], uint8_t out[LM_BLAKE3_OUT_LEN]);

#endif
