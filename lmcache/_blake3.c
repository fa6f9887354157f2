/* BLAKE3 in hash mode (no key, no derive-key, 32-byte output), written from the specification:
 * https://github.com/BLAKE3-team/BLAKE3-specs (blake3.pdf). Tests check every digest against the
 * `blake3` package, the implementation lmcache.keys uses in Python.
 *
 * What is particular here: lmcache hashes many inputs of one length (the token bytes of every chunk
 * of a prompt). Those inputs are independent, so they are hashed side by side, one input per lane of
 * SIMD vectors (_blake3_lanes.h): on x86-64 16 lanes with AVX-512, 8 with AVX2, else 4 (SSE2), picked
 * at run time; elsewhere 4 in what the build's target offers. A one-call-per-chunk hash cannot do this.
 */
#include "_blake3.h"

#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define LM_BLAKE3_X86 /* AVX2 and AVX-512 builds beside the baseline, picked at run time */
#include <immintrin.h>
#endif

#define CHUNK_LEN 1024
#define BLOCK_LEN 64
enum { CHUNK_START = 1, CHUNK_END = 2, PARENT = 4, ROOT = 8 };

static const uint32_t IV[8] = {0x6A09E667, 0xBB67AE85, 0x3C6EF372, 0xA54FF53A,
                               0x510E527F, 0x9B05688C, 0x1F83D9AB, 0x5BE0CD19};

/* SCHEDULE[r]: the message words G reads in round r, in order: the spec's permutation
 * {2, 6, 3, 10, 7, 0, 4, 13, 1, 11, 12, 5, 9, 14, 15, 8} applied r times. Constant, so that with the
 * rounds written out every message index is known to the compiler. */
static const uint8_t SCHEDULE[7][16] = {
    {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15},
    {2, 6, 3, 10, 7, 0, 4, 13, 1, 11, 12, 5, 9, 14, 15, 8},
    {3, 4, 10, 12, 13, 2, 7, 14, 6, 5, 9, 0, 11, 15, 8, 1},
    {10, 7, 12, 9, 14, 3, 13, 15, 4, 0, 11, 2, 5, 8, 1, 6},
    {12, 13, 9, 11, 15, 10, 14, 8, 7, 2, 5, 3, 0, 1, 6, 4},
    {9, 14, 11, 5, 8, 12, 15, 1, 13, 3, 0, 10, 2, 6, 4, 7},
    {11, 15, 5, 0, 1, 9, 8, 6, 14, 10, 2, 12, 3, 4, 7, 13},
};

static inline uint32_t
rotr32(uint32_t x, int n)
{
    return (x >> n) | (x << (32 - n));
}

static inline uint32_t
load32(const uint8_t *p)
{
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    uint32_t v;
    memcpy(&v, p, 4); /* one load */
    return v;
#else
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
#endif
}

static inline void
store32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
    p[2] = (uint8_t)(v >> 16);
    p[3] = (uint8_t)(v >> 24);
}

/* The quarter-round on state words a, b, c, d with message words x, y. */
#define G(a, b, c, d, x, y)                                                                                   \
    do {                                                                                                      \
        a = a + b + (x);                                                                                      \
        d = rotr32(d ^ a, 16);                                                                                \
        c = c + d;                                                                                            \
        b = rotr32(b ^ c, 12);                                                                                \
        a = a + b + (y);                                                                                      \
        d = rotr32(d ^ a, 8);                                                                                 \
        c = c + d;                                                                                            \
        b = rotr32(b ^ c, 7);                                                                                 \
    } while (0)

/* One compression, its first 8 output words (the chaining value) into out. */
static void
compress(const uint32_t cv[8], const uint32_t m[16], uint32_t block_len, uint64_t counter, uint32_t flags,
         uint32_t out[8])
{
    uint32_t v[16];
    memcpy(v, cv, sizeof(uint32_t) * 8);
    memcpy(v + 8, IV, sizeof(uint32_t) * 4);
    v[12] = (uint32_t)counter;
    v[13] = (uint32_t)(counter >> 32);
    v[14] = block_len;
    v[15] = flags;
    for (int r = 0; r < 7; r++) {
        const uint8_t *s = SCHEDULE[r];
        G(v[0], v[4], v[8], v[12], m[s[0]], m[s[1]]);
        G(v[1], v[5], v[9], v[13], m[s[2]], m[s[3]]);
        G(v[2], v[6], v[10], v[14], m[s[4]], m[s[5]]);
        G(v[3], v[7], v[11], v[15], m[s[6]], m[s[7]]);
        G(v[0], v[5], v[10], v[15], m[s[8]], m[s[9]]);
        G(v[1], v[6], v[11], v[12], m[s[10]], m[s[11]]);
        G(v[2], v[7], v[8], v[13], m[s[12]], m[s[13]]);
        G(v[3], v[4], v[9], v[14], m[s[14]], m[s[15]]);
    }
    for (int i = 0; i < 8; i++) {
        out[i] = v[i] ^ v[i + 8];
    }
}

#define MAX_DEPTH 56
/* Levels of a tree of chunks whose count fits a size_t length: at most 2**54 chunks of 1 KiB. */

#define LANES 4
#define SUFFIX _4
#define LANE_TARGET
#include "_blake3_lanes.h"

#ifdef LM_BLAKE3_X86
#define LANES 8
#define SUFFIX _8
#define LANE_TARGET __attribute__((target("avx2")))
#include "_blake3_lanes.h"

#define LANES 16
#define SUFFIX _16
#define LANE_TARGET __attribute__((target("avx512f")))
#include "_blake3_lanes.h"
#endif

int
lm_blake3_lane_widths(int widths[3])
{
    int n = 0;
#ifdef LM_BLAKE3_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f")) {
        widths[n++] = 16;
    }
    if (__builtin_cpu_supports("avx2")) {
        widths[n++] = 8;
    }
#endif
    widths[n++] = 4;
    return n;
}

int
lm_blake3_many_lanes(const uint8_t *data, size_t len, size_t count, uint8_t *out, int lanes)
{
    switch (lanes) {
    case 4:
        return hash_many_4(data, len, count, out);
#ifdef LM_BLAKE3_X86
    case 8:
        return hash_many_8(data, len, count, out);
    case 16:
        return hash_many_16(data, len, count, out);
#endif
    default:
        return -2;
    }
}

/* The widest vectors this CPU runs, found at the first call. */
static int widest;

int
lm_blake3_many(const uint8_t *data, size_t len, size_t count, uint8_t *out)
{
    if (widest == 0) {
        int widths[3];
        lm_blake3_lane_widths(widths);
        widest = widths[0];
    }
    return lm_blake3_many_lanes(data, len, count, out, widest);
}

void
lm_blake3_64(const uint8_t in[64], uint8_t out[LM_BLAKE3_OUT_LEN])
{
    uint32_t m[16], cv[8];
    for (int w = 0; w < 16; w++) {
        m[w] = load32(in + 4 * w);
    }
    compress(IV, m, BLOCK_LEN, 0, CHUNK_START | CHUNK_END | ROOT, cv);
    for (int i = 0; i < 8; i++) {
        store32(out + 4 * i, cv[i]);
    }
}
