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

/* One round of quarter-rounds in every lane, QUARTER(a, b, c, d, x, y) the lane code's quarter-round on
 * state words a, b, c, d with message words x, y; written out so that every index is a constant. */
#define ROUND(QUARTER, r)                                                                                     \
    do {                                                                                                      \
        QUARTER(0, 4, 8, 12, SCHEDULE[r][0], SCHEDULE[r][1]);                                                 \
        QUARTER(1, 5, 9, 13, SCHEDULE[r][2], SCHEDULE[r][3]);                                                 \
        QUARTER(2, 6, 10, 14, SCHEDULE[r][4], SCHEDULE[r][5]);                                                \
        QUARTER(3, 7, 11, 15, SCHEDULE[r][6], SCHEDULE[r][7]);                                                \
        QUARTER(0, 5, 10, 15, SCHEDULE[r][8], SCHEDULE[r][9]);                                                \
        QUARTER(1, 6, 11, 12, SCHEDULE[r][10], SCHEDULE[r][11]);                                              \
        QUARTER(2, 7, 8, 13, SCHEDULE[r][12], SCHEDULE[r][13]);                                               \
        QUARTER(3, 4, 9, 14, SCHEDULE[r][14], SCHEDULE[r][15]);                                               \
    } while (0)

/* Levels of a tree of chunks whose count fits a size_t length: at most 2**54 chunks of 1 KiB. */
#define MAX_DEPTH 56

#define LANES 4
#define SUFFIX _4
#define LANE_TARGET
#include "_blake3_lanes.h"

#ifdef LM_BLAKE3_X86
#define LANES 8
#define SUFFIX _8
#define LANE_TARGET __attribute__((target("avx2")))
#include "_blake3_lanes.h"

/* With AVX-512, 16 lanes: each lane's words are one element of arrays of 16 words, which the compiler
 * vectorizes into one 512-bit register each. On an AVX-512 host this hashed a 16k-token prompt faster
 * than the vector-extension form of _blake3_lanes.h did with two shifts per rotation (benchmarks/
 * RESULTS.md, D106); with AVX2 and the baseline the vector-extension form with fewer lanes is faster. */
#define LANES 16

/* The quarter-round in every lane. */
#define G_LANES(a, b, c, d, x, y)                                                                             \
    for (int l = 0; l < LANES; l++) {                                                                         \
        G(v[a][l], v[b][l], v[c][l], v[d][l], m[x][l], m[y][l]);                                              \
    }


#define AVX512 __attribute__((target("avx512f")))
#define LANE_INLINE static inline __attribute__((always_inline)) AVX512

/* The message words of one block of every lane's input, m[word][lane]: the block at byte `at` of
 * each input, the inputs `stride` bytes apart from `base`, zero-padded if shorter than BLOCK_LEN. */
LANE_INLINE void
load_lanes_16(uint32_t m[16][LANES], const uint8_t *base, size_t stride, size_t at, size_t block_len)
{
    if (block_len == BLOCK_LEN) {
        for (int w = 0; w < 16; w++) {
            for (int l = 0; l < LANES; l++) {
                m[w][l] = load32(base + l * stride + at + 4 * w);
            }
        }
        return;
    }
    for (int l = 0; l < LANES; l++) {
        uint8_t padded[BLOCK_LEN] = {0};
        memcpy(padded, base + l * stride + at, block_len);
        for (int w = 0; w < 16; w++) {
            m[w][l] = load32(padded + 4 * w);
        }
    }
}

/* compress() in every lane: the same block length, counter and flags, each lane its own chaining
 * value cv[.][l] (updated in place) and message m[.][l]. */
LANE_INLINE void
compress_lanes_16(uint32_t cv[8][LANES], const uint32_t m[16][LANES], uint32_t block_len, uint64_t counter,
                  uint32_t flags)
{
    uint32_t v[16][LANES];
    for (int l = 0; l < LANES; l++) {
        for (int i = 0; i < 8; i++) {
            v[i][l] = cv[i][l];
        }
        for (int i = 0; i < 4; i++) {
            v[8 + i][l] = IV[i];
        }
        v[12][l] = (uint32_t)counter;
        v[13][l] = (uint32_t)(counter >> 32);
        v[14][l] = block_len;
        v[15][l] = flags;
    }
    ROUND(G_LANES, 0);
    ROUND(G_LANES, 1);
    ROUND(G_LANES, 2);
    ROUND(G_LANES, 3);
    ROUND(G_LANES, 4);
    ROUND(G_LANES, 5);
    ROUND(G_LANES, 6);
    for (int i = 0; i < 8; i++) {
        for (int l = 0; l < LANES; l++) {
            cv[i][l] = v[i][l] ^ v[i + 8][l];
        }
    }
}

/* In every lane, cv becomes the parent of `left` and cv. */
LANE_INLINE void
parent_lanes_16(const uint32_t left[8][LANES], uint32_t cv[8][LANES], uint32_t flags)
{
    uint32_t m[16][LANES];
    memcpy(m, left, sizeof(uint32_t[8][LANES]));
    memcpy(m + 8, cv, sizeof(uint32_t[8][LANES]));
    for (int i = 0; i < 8; i++) {
        for (int l = 0; l < LANES; l++) {
            cv[i][l] = IV[i];
        }
    }
    compress_lanes_16(cv, (const uint32_t(*)[LANES])m, BLOCK_LEN, 0, PARENT | flags);
}

/* The digests' words out[word][lane] of LANES inputs of `len` bytes, `len` bytes apart from `base`.
 * `stack` holds the chaining values of subtrees waiting for a right sibling: one entry per level of
 * the tree. Chunks are merged as the spec's incremental hasher merges them, so the left subtree of
 * every parent holds the largest power of two of chunks that leaves at least one to the right. */
AVX512 static void
hash_group_16(const uint8_t *base, size_t len, uint32_t (*stack)[8][LANES], uint32_t out[8][LANES])
{
    size_t chunks = len ? (len + CHUNK_LEN - 1) / CHUNK_LEN : 1;
    size_t depth = 0;
    uint32_t m[16][LANES];
    for (size_t c = 0; c < chunks; c++) {
        size_t offset = c * CHUNK_LEN;
        size_t clen = len - offset < CHUNK_LEN ? len - offset : CHUNK_LEN;
        size_t blocks = clen ? (clen + BLOCK_LEN - 1) / BLOCK_LEN : 1;
        for (int i = 0; i < 8; i++) {
            for (int l = 0; l < LANES; l++) {
                out[i][l] = IV[i];
            }
        }
        for (size_t b = 0; b < blocks; b++) {
            size_t block_len = clen - b * BLOCK_LEN < BLOCK_LEN ? clen - b * BLOCK_LEN : BLOCK_LEN;
            uint32_t flags = b == 0 ? CHUNK_START : 0;
            if (b == blocks - 1) {
                flags |= CHUNK_END | (chunks == 1 ? ROOT : 0);
            }
            load_lanes_16(m, base, len, offset + b * BLOCK_LEN, block_len);
            compress_lanes_16(out, (const uint32_t(*)[LANES])m, (uint32_t)block_len, c, flags);
        }
        if (c == chunks - 1) {
            break;
        }
        /* More chunks follow: merge every complete subtree this chunk closes, then wait for the
         * right sibling. */
        for (size_t total = c + 1; (total & 1) == 0; total >>= 1) {
            parent_lanes_16((const uint32_t(*)[LANES])stack[--depth], out, 0);
        }
        memcpy(stack[depth++], out, sizeof(uint32_t[8][LANES]));
    }
    while (depth > 0) {
        depth--;
        parent_lanes_16((const uint32_t(*)[LANES])stack[depth], out, depth == 0 ? ROOT : 0);
    }
}

/* lm_blake3_many, 16 inputs at a time. */
AVX512 static int
hash_many_16(const uint8_t *data, size_t len, size_t count, uint8_t *out)
{
    size_t chunks = len ? (len + CHUNK_LEN - 1) / CHUNK_LEN : 1;
    size_t levels = 1;
    while (((size_t)1 << (levels - 1)) < chunks) {
        levels++;
    }
    uint32_t (*stack)[8][LANES] = malloc(sizeof(uint32_t[8][LANES]) * levels);
    /* The last group's inputs, copied where every lane can read a whole input (the lanes past the
     * last input read zeros; their results are dropped). */
    uint8_t *tail = count % LANES && len ? calloc(LANES, len) : NULL;
    if (stack == NULL || (count % LANES && len && tail == NULL)) {
        free(stack);
        free(tail);
        return -1;
    }
    for (size_t first = 0; first < count; first += LANES) {
        size_t used = count - first < LANES ? count - first : LANES;
        const uint8_t *base = data + first * len;
        if (used < LANES && tail != NULL) {
            memcpy(tail, base, used * len);
            base = tail;
        }
        uint32_t digests[8][LANES];
        hash_group_16(base, len, stack, digests);
        for (size_t l = 0; l < used; l++) {
            for (int i = 0; i < 8; i++) {
                store32(out + (first + l) * LM_BLAKE3_OUT_LEN + 4 * i, digests[i][l]);
            }
        }
    }
    free(tail);
    free(stack);
    return 0;
}

#undef LANE_INLINE
#undef AVX512
#undef G_LANES
#undef LANES
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

/* lm_blake3_many at a width this CPU runs (the caller checked). */
static int
hash_many(const uint8_t *data, size_t len, size_t count, uint8_t *out, int lanes)
{
#ifdef LM_BLAKE3_X86
    if (lanes == 16) {
        return hash_many_16(data, len, count, out);
    }
    if (lanes == 8) {
        return hash_many_8(data, len, count, out);
    }
#endif
    return hash_many_4(data, len, count, out);
}

int
lm_blake3_many_lanes(const uint8_t *data, size_t len, size_t count, uint8_t *out, int lanes)
{
    /* A width the CPU lacks would run instructions it does not have (SIGILL): refused, not run. */
    int widths[3];
    int n = lm_blake3_lane_widths(widths);
    for (int i = 0; i < n; i++) {
        if (widths[i] == lanes) {
            return hash_many(data, len, count, out, lanes);
        }
    }
    return -2;
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
    return hash_many(data, len, count, out, widest);
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
