/* BLAKE3 in hash mode (no key, no derive-key, 32-byte output), written from the specification:
 * https://github.com/BLAKE3-team/BLAKE3-specs (blake3.pdf). Tests check every digest against the
 * `blake3` package, the implementation lmcache.keys uses in Python.
 *
 * What is particular here: lmcache hashes many inputs of one length (the token bytes of every chunk
 * of a prompt). Those inputs are independent, so they are hashed side by side, one input per lane of
 * arrays that the compiler turns into SIMD vectors (AVX-512, AVX2 or SSE2 on x86-64, picked at run
 * time; NEON elsewhere). A one-call-per-chunk hash cannot do this.
 */
#include "_blake3.h"

#include <stdlib.h>
#include <string.h>

#define CHUNK_LEN 1024
#define BLOCK_LEN 64
#define LANES 16

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

/* The quarter-round in every lane. */
#define G_LANES(a, b, c, d, x, y)                                                                             \
    for (int l = 0; l < LANES; l++) {                                                                         \
        G(v[a][l], v[b][l], v[c][l], v[d][l], m[x][l], m[y][l]);                                              \
    }

/* One round in every lane, written out so that every index is a constant. */
#define ROUND_LANES(r)                                                                                        \
    do {                                                                                                      \
        G_LANES(0, 4, 8, 12, SCHEDULE[r][0], SCHEDULE[r][1]);                                                 \
        G_LANES(1, 5, 9, 13, SCHEDULE[r][2], SCHEDULE[r][3]);                                                 \
        G_LANES(2, 6, 10, 14, SCHEDULE[r][4], SCHEDULE[r][5]);                                                \
        G_LANES(3, 7, 11, 15, SCHEDULE[r][6], SCHEDULE[r][7]);                                                \
        G_LANES(0, 5, 10, 15, SCHEDULE[r][8], SCHEDULE[r][9]);                                                \
        G_LANES(1, 6, 11, 12, SCHEDULE[r][10], SCHEDULE[r][11]);                                              \
        G_LANES(2, 7, 8, 13, SCHEDULE[r][12], SCHEDULE[r][13]);                                               \
        G_LANES(3, 4, 9, 14, SCHEDULE[r][14], SCHEDULE[r][15]);                                               \
    } while (0)

/* Where the compiler and target allow it, one copy of compress_lanes per vector width, chosen at
 * load time by the CPU's features. */
#if defined(__x86_64__) && defined(__has_attribute)
#if __has_attribute(target_clones)
#define VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#endif
#endif
#ifndef VECTOR_CLONES
#define VECTOR_CLONES
#endif

/* compress() in every lane: the same block length, counter and flags, each lane its own chaining
 * value cv[.][l] (updated in place) and message m[.][l]. */
VECTOR_CLONES static void
compress_lanes(uint32_t cv[8][LANES], const uint32_t m[16][LANES], uint32_t block_len, uint64_t counter,
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
    ROUND_LANES(0);
    ROUND_LANES(1);
    ROUND_LANES(2);
    ROUND_LANES(3);
    ROUND_LANES(4);
    ROUND_LANES(5);
    ROUND_LANES(6);
    for (int i = 0; i < 8; i++) {
        for (int l = 0; l < LANES; l++) {
            cv[i][l] = v[i][l] ^ v[i + 8][l];
        }
    }
}

/* The chaining values of one chunk of every lane's input: bytes [offset, offset + len) of input l
 * starting at inputs[l], 0 < len <= CHUNK_LEN (an empty input is one empty block: len 0 is allowed
 * when offset is 0). `counter` is the chunk's index in its input; `root` is ROOT when the chunk is
 * the whole input. */
static void
chunk_lanes(const uint8_t *const inputs[LANES], size_t offset, size_t len, uint64_t counter, uint32_t root,
            uint32_t cv[8][LANES])
{
    uint32_t m[16][LANES];
    size_t blocks = len ? (len + BLOCK_LEN - 1) / BLOCK_LEN : 1;
    for (int i = 0; i < 8; i++) {
        for (int l = 0; l < LANES; l++) {
            cv[i][l] = IV[i];
        }
    }
    for (size_t b = 0; b < blocks; b++) {
        size_t at = offset + b * BLOCK_LEN;
        size_t block_len = len - b * BLOCK_LEN < BLOCK_LEN ? len - b * BLOCK_LEN : BLOCK_LEN;
        for (int l = 0; l < LANES; l++) {
            const uint8_t *p = inputs[l] + at;
            uint8_t padded[BLOCK_LEN];
            if (block_len < BLOCK_LEN) {
                memset(padded, 0, BLOCK_LEN);
                memcpy(padded, p, block_len);
                p = padded;
            }
            for (int w = 0; w < 16; w++) {
                m[w][l] = load32(p + 4 * w);
            }
        }
        uint32_t flags = (b == 0 ? CHUNK_START : 0) | (b == blocks - 1 ? CHUNK_END | root : 0);
        compress_lanes(cv, (const uint32_t(*)[LANES])m, (uint32_t)block_len, counter, flags);
    }
}

/* The chaining value of the subtree over chunk values cvs[0..n) (n >= 1), the root's if `root` is
 * ROOT (then n >= 2). The left subtree holds the largest power of two of chunks that leaves at least
 * one chunk to the right. */
static void
subtree(const uint32_t (*cvs)[8], size_t n, uint32_t root, uint32_t out[8])
{
    if (n == 1) {
        memcpy(out, cvs[0], sizeof(uint32_t) * 8);
        return;
    }
    size_t left = 1;
    while (left * 2 < n) {
        left *= 2;
    }
    uint32_t m[16];
    subtree(cvs, left, 0, m);
    subtree(cvs + left, n - left, 0, m + 8);
    compress(IV, m, BLOCK_LEN, 0, PARENT | root, out);
}

int
lm_blake3_many(const uint8_t *data, size_t len, size_t count, uint8_t *out)
{
    size_t chunks = len ? (len + CHUNK_LEN - 1) / CHUNK_LEN : 1;
    /* Every chunk value of one group of lanes, by lane then chunk (unused for one-chunk inputs). */
    uint32_t (*cvs)[8] = chunks > 1 ? malloc(sizeof(uint32_t[8]) * LANES * chunks) : NULL;
    if (chunks > 1 && cvs == NULL) {
        return -1;
    }
    for (size_t first = 0; first < count; first += LANES) {
        const uint8_t *inputs[LANES];
        for (int l = 0; l < LANES; l++) {
            /* Lanes past the last input repeat it; their results are dropped. */
            size_t i = first + l < count ? first + l : count - 1;
            inputs[l] = data + i * len;
        }
        size_t used = count - first < LANES ? count - first : LANES;
        for (size_t c = 0; c < chunks; c++) {
            uint32_t cv[8][LANES];
            size_t begin = c * CHUNK_LEN;
            size_t clen = len - begin < CHUNK_LEN ? len - begin : CHUNK_LEN;
            chunk_lanes(inputs, begin, clen, c, chunks == 1 ? ROOT : 0, cv);
            for (size_t l = 0; l < used; l++) {
                for (int i = 0; i < 8; i++) {
                    if (chunks == 1) {
                        store32(out + (first + l) * LM_BLAKE3_OUT_LEN + 4 * i, cv[i][l]);
                    }
                    else {
                        cvs[l * chunks + c][i] = cv[i][l];
                    }
                }
            }
        }
        if (chunks > 1) {
            for (size_t l = 0; l < used; l++) {
                uint32_t root[8];
                subtree((const uint32_t(*)[8])(cvs + l * chunks), chunks, ROOT, root);
                for (int i = 0; i < 8; i++) {
                    store32(out + (first + l) * LM_BLAKE3_OUT_LEN + 4 * i, root[i]);
                }
            }
        }
    }
    free(cvs);
    return 0;
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
