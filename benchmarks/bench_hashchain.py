"""Client prompt hashing: the pure-Python chain against lmcache._hashchain (C), for a Python list.

    python benchmarks/bench_hashchain.py [--algorithm blake3] [--chunk 256] [--tokens 8192 16384]

Prints microseconds per call (best of several repeats) for ``b"".join`` of the pure-Python hashes,
``chunk_hashes`` and ``chunk_digests`` (both native for a list when the extension is built).
"""

from __future__ import annotations

import argparse
import random
import timeit

from lmcache import keys
from lmcache.keys import HASH_ALGORITHMS, TokenHasher


def best_us(fn, number: int) -> float:
    return min(timeit.repeat(fn, number=number, repeat=7)) / number * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    ap.add_argument("--algorithm", default="blake3", choices=sorted(HASH_ALGORITHMS))
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--tokens", type=int, nargs="+", default=[8192, 16384])
    args = ap.parse_args()
    if keys.native_chain() is None:
        raise SystemExit("lmcache._hashchain is not built: python setup.py build_ext --inplace")
    hasher = TokenHasher(args.chunk, args.algorithm, "bench", b"bfloat16/L28/KV2/E8192/T32")
    rng = random.Random(0)
    print(f"{args.algorithm}, chunk {args.chunk}: us per call")
    for n in args.tokens:
        tokens = [rng.randrange(150_000) for _ in range(n)]
        number = max(200, 2_000_000 // n)
        pure = best_us(lambda t=tokens: b"".join(hasher.pure_chunk_hashes(t, None)), number)
        split = best_us(lambda t=tokens: hasher.chunk_hashes(t), number)
        native = best_us(lambda t=tokens: hasher.chunk_digests(t), number)
        assert hasher.chunk_digests(tokens) == b"".join(hasher.pure_chunk_hashes(tokens, None))
        print(
            f"{n:>7} tokens: pure join {pure:7.1f}  native chunk_hashes {split:7.1f}  "
            f"native chunk_digests {native:7.1f}  ({pure / native:.2f}x)"
        )


if __name__ == "__main__":
    main()
