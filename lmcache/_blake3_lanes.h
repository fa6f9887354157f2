/* The lane code of _blake3.c for one vector width, included once per width with these defined:
 * LANES (inputs hashed side by side: 4 or 8), SUFFIX (appended to every name defined here) and
 * LANE_TARGET (the function attribute naming the instruction set the code may use, or nothing). They
 * are undefined at the end. It uses _blake3.c's constants and helpers (IV, SCHEDULE, ROUND, load32).
 *
 * Each lane's words are one element of a vector of LANES 32-bit words (the compiler's vector
 * extensions), so a compression's 16 state words and 16 message words are 32 vectors the compiler
 * keeps in registers where the target has them, instead of arrays it reads and writes around every
 * operation. */

#define LANE_CAT_(a, b) a##b
#define LANE_CAT(a, b) LANE_CAT_(a, b)
#define LANE_NAME(name) LANE_CAT(name, SUFFIX)
#define VEC LANE_NAME(vec)
#define LANE_FN static inline __attribute__((always_inline)) LANE_TARGET

typedef uint32_t VEC __attribute__((vector_size(4 * LANES)));

LANE_FN VEC
LANE_NAME(splat)(uint32_t x)
{
    return (VEC){0} + x;
}

/* The rotations G makes: with AVX2 a byte shuffle for 16 and 8, two shifts for 12 and 7; two shifts
 * elsewhere. */
#define LANE_ROT(n)                                                                                           \
    LANE_FN VEC LANE_NAME(rot##n)(VEC x)                                                                      \
    {                                                                                                         \
        return (x >> n) | (x << (32 - n));                                                                    \
    }
LANE_ROT(12)
LANE_ROT(7)
#if LANES == 8 && defined(LM_BLAKE3_X86)
LANE_FN VEC
LANE_NAME(rot16)(VEC x)
{
    const __m256i order = _mm256_setr_epi8(2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13, 2, 3, 0, 1, 6, 7, 4,
                                           5, 10, 11, 8, 9, 14, 15, 12, 13);
    return (VEC)_mm256_shuffle_epi8((__m256i)x, order);
}

LANE_FN VEC
LANE_NAME(rot8)(VEC x)
{
    const __m256i order = _mm256_setr_epi8(1, 2, 3, 0, 5, 6, 7, 4, 9, 10, 11, 8, 13, 14, 15, 12, 1, 2, 3, 0, 5, 6, 7,
                                           4, 9, 10, 11, 8, 13, 14, 15, 12);
    return (VEC)_mm256_shuffle_epi8((__m256i)x, order);
}
#else
LANE_ROT(16)
LANE_ROT(8)
#endif
#undef LANE_ROT

/* The quarter-round in every lane. */
#define LANE_G(a, b, c, d, x, y)                                                                              \
    do {                                                                                                      \
        v[a] = v[a] + v[b] + m[x];                                                                            \
        v[d] = LANE_NAME(rot16)(v[d] ^ v[a]);                                                                 \
        v[c] = v[c] + v[d];                                                                                   \
        v[b] = LANE_NAME(rot12)(v[b] ^ v[c]);                                                               \
        v[a] = v[a] + v[b] + m[y];                                                                            \
        v[d] = LANE_NAME(rot8)(v[d] ^ v[a]);                                                                  \
        v[c] = v[c] + v[d];                                                                                   \
        v[b] = LANE_NAME(rot7)(v[b] ^ v[c]);                                                                \
    } while (0)

/* compress() in every lane: the same block length, counter and flags, each lane its own chaining
 * value (cv, updated in place) and message (m). */
LANE_FN void
LANE_NAME(compress)(VEC cv[8], const VEC m[16], uint32_t block_len, uint64_t counter, uint32_t flags)
{
    VEC v[16];
    for (int i = 0; i < 8; i++) {
        v[i] = cv[i];
        v[8 + i] = LANE_NAME(splat)(i < 4 ? IV[i] : 0);
    }
    v[12] = LANE_NAME(splat)((uint32_t)counter);
    v[13] = LANE_NAME(splat)((uint32_t)(counter >> 32));
    v[14] = LANE_NAME(splat)(block_len);
    v[15] = LANE_NAME(splat)(flags);
    ROUND(LANE_G, 0);
    ROUND(LANE_G, 1);
    ROUND(LANE_G, 2);
    ROUND(LANE_G, 3);
    ROUND(LANE_G, 4);
    ROUND(LANE_G, 5);
    ROUND(LANE_G, 6);
    for (int i = 0; i < 8; i++) {
        cv[i] = v[i] ^ v[i + 8];
    }
}

/* The message words of one block of every lane's input: the block at byte `at` of each input, the
 * inputs `stride` bytes apart from `base`, zero-padded if shorter than BLOCK_LEN. */
LANE_FN void
LANE_NAME(load_block)(VEC m[16], const uint8_t *base, size_t stride, size_t at, size_t block_len)
{
    uint32_t words[16][LANES];
    for (int l = 0; l < LANES; l++) {
        const uint8_t *block = base + l * stride + at;
        uint8_t padded[BLOCK_LEN];
        if (block_len < BLOCK_LEN) {
            memset(padded, 0, BLOCK_LEN);
            memcpy(padded, block, block_len);
            block = padded;
        }
        for (int w = 0; w < 16; w++) {
            words[w][l] = load32(block + 4 * w);
        }
    }
    memcpy(m, words, sizeof(words));
}

/* In every lane, cv becomes the parent of `left` and cv. */
LANE_FN void
LANE_NAME(parent)(const VEC left[8], VEC cv[8], uint32_t flags)
{
    VEC m[16];
    for (int i = 0; i < 8; i++) {
        m[i] = left[i];
        m[8 + i] = cv[i];
        cv[i] = LANE_NAME(splat)(IV[i]);
    }
    LANE_NAME(compress)(cv, m, BLOCK_LEN, 0, PARENT | flags);
}

/* The digests' words out[word][lane] of LANES inputs of `len` bytes, `len` bytes apart from `base`.
 * Chunks are merged as the spec's incremental hasher merges them: the left subtree of every parent
 * holds the largest power of two of chunks that leaves at least one to the right, and `stack` the
 * chaining values of subtrees waiting for a right sibling, one per level of the tree. */
LANE_TARGET static void
LANE_NAME(hash_group)(const uint8_t *base, size_t len, VEC out[8])
{
    size_t chunks = len ? (len + CHUNK_LEN - 1) / CHUNK_LEN : 1;
    size_t depth = 0;
    VEC stack[MAX_DEPTH][8];
    VEC m[16];
    for (size_t c = 0; c < chunks; c++) {
        size_t offset = c * CHUNK_LEN;
        size_t clen = len - offset < CHUNK_LEN ? len - offset : CHUNK_LEN;
        size_t blocks = clen ? (clen + BLOCK_LEN - 1) / BLOCK_LEN : 1;
        for (int i = 0; i < 8; i++) {
            out[i] = LANE_NAME(splat)(IV[i]);
        }
        for (size_t b = 0; b < blocks; b++) {
            size_t block_len = clen - b * BLOCK_LEN < BLOCK_LEN ? clen - b * BLOCK_LEN : BLOCK_LEN;
            uint32_t flags = b == 0 ? CHUNK_START : 0;
            if (b == blocks - 1) {
                flags |= CHUNK_END | (chunks == 1 ? ROOT : 0);
            }
            LANE_NAME(load_block)(m, base, len, offset + b * BLOCK_LEN, block_len);
            LANE_NAME(compress)(out, m, (uint32_t)block_len, c, flags);
        }
        if (c == chunks - 1) {
            break;
        }
        /* More chunks follow: merge every complete subtree this chunk closes, then wait for the
         * right sibling. */
        for (size_t total = c + 1; (total & 1) == 0; total >>= 1) {
            LANE_NAME(parent)(stack[--depth], out, 0);
        }
        memcpy(stack[depth++], out, sizeof(VEC[8]));
    }
    while (depth > 0) {
        depth--;
        LANE_NAME(parent)(stack[depth], out, depth == 0 ? ROOT : 0);
    }
}

/* lm_blake3_many, LANES inputs at a time. */
LANE_TARGET static int
LANE_NAME(hash_many)(const uint8_t *data, size_t len, size_t count, uint8_t *out)
{
    /* The last group's inputs, copied where every lane can read a whole input (the lanes past the
     * last input read zeros; their results are dropped). */
    uint8_t *tail = count % LANES && len ? calloc(LANES, len) : NULL;
    if (count % LANES && len && tail == NULL) {
        return -1;
    }
    for (size_t first = 0; first < count; first += LANES) {
        size_t used = count - first < LANES ? count - first : LANES;
        const uint8_t *base = data + first * len;
        if (used < LANES && tail != NULL) {
            memcpy(tail, base, used * len);
            base = tail;
        }
        VEC digests[8];
        LANE_NAME(hash_group)(base, len, digests);
        for (size_t l = 0; l < used; l++) {
            for (int i = 0; i < 8; i++) {
                store32(out + (first + l) * LM_BLAKE3_OUT_LEN + 4 * i, digests[i][l]);
            }
        }
    }
    free(tail);
    return 0;
}

#undef LANE_G
#undef LANE_FN
#undef VEC
#undef LANE_NAME
#undef LANE_CAT
#undef LANE_CAT_
#undef LANES
#undef SUFFIX
#undef LANE_TARGET
