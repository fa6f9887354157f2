import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from lmcache.keys import HASH_ALGORITHMS, ChunkKey, TokenHasher, token_array

SIG = b"bfloat16/L28/KV2/E8192/T32"


def hasher(algorithm: str = "blake3", model: str = "m", sig: bytes = SIG, chunk: int = 256) -> TokenHasher:
    return TokenHasher(chunk, algorithm, model, sig)


@pytest.mark.parametrize("algorithm", sorted(HASH_ALGORITHMS))
def test_only_full_chunks_get_hashes(algorithm: str) -> None:
    h = hasher(algorithm)
    assert len(h.chunk_hashes(list(range(255)))) == 0
    assert len(h.chunk_hashes(list(range(256)))) == 1
    assert len(h.chunk_hashes(list(range(700)))) == 2


def test_prefix_chaining() -> None:
    h = hasher()
    a = list(range(1024))
    b = a[:512] + [7] * 512
    ha, hb = h.chunk_hashes(a), h.chunk_hashes(b)
    assert ha[:2] == hb[:2]
    assert ha[2] != hb[2] and ha[3] != hb[3]
    # Same chunk content at a different position after a different prefix: different hash.
    c = [9] * 256 + a[256:512]
    assert h.chunk_hashes(c)[1] != ha[1]


def test_input_types_agree() -> None:
    h = hasher()
    toks = list(range(1000, 1512))
    expect = h.chunk_hashes(toks)
    assert h.chunk_hashes(np.array(toks, dtype=np.int32)) == expect
    assert h.chunk_hashes(torch.tensor(toks)) == expect


def test_key_space_separates() -> None:
    toks = list(range(512))
    base = hasher().chunk_hashes(toks)
    assert hasher(model="other").chunk_hashes(toks) != base
    assert hasher(sig=b"float16/L28/KV2/E8192/T32").chunk_hashes(toks) != base
    assert hasher().chunk_hashes(toks, salt="tenant-a") != base
    assert hasher().chunk_hashes(toks, salt="tenant-a") != hasher().chunk_hashes(toks, salt="tenant-b")
    assert hasher().chunk_hashes(toks, salt=1) != hasher().chunk_hashes(toks, salt="1")
    assert hasher("sha256").chunk_hashes(toks) != base


def test_storage_key_adds_rank() -> None:
    h = hasher().chunk_hashes(list(range(256)))[0]
    assert ChunkKey(h, 2, 0) != ChunkKey(h, 2, 1)
    assert ChunkKey(h, 2, 0).hex() != ChunkKey(h, 1, 0).hex()


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="hash algorithm"):
        TokenHasher(256, "md5", "m", SIG)
    with pytest.raises(ValueError, match="chunk_size"):
        TokenHasher(0, "blake3", "m", SIG)
    with pytest.raises(ValueError, match="token ids"):
        token_array([[1, 2], [3, 4]])


def test_long_prompt_hashes() -> None:
    toks = list(range(131_072))
    hashes = hasher().chunk_hashes(toks)
    assert len(hashes) == 512 and len(set(hashes)) == 512


_CHILD = """
import sys
from lmcache.keys import TokenHasher
h = TokenHasher(64, sys.argv[1], "model", b"sig")
print(",".join(x.hex() for x in h.chunk_hashes(list(range(300)), salt="s")))
"""


@pytest.mark.parametrize("algorithm", sorted(HASH_ALGORITHMS))
def test_same_keys_in_every_process_whatever_pythonhashseed(algorithm: str) -> None:
    outs = []
    for seed in ("0", "12345", "random"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        out = subprocess.run(
            [sys.executable, "-c", _CHILD, algorithm], env=env, capture_output=True, text=True, check=True
        ).stdout.strip()
        outs.append(out)
    assert len(set(outs)) == 1
    assert outs[0] == ",".join(
        x.hex() for x in TokenHasher(64, algorithm, "model", b"sig").chunk_hashes(list(range(300)), salt="s")
    )


def test_list_fast_path_matches_numpy_and_rejects_non_integers() -> None:
    toks = [0, 1, 2**40, 151_000]
    assert token_array(toks).tolist() == np.asarray(toks, dtype=np.int64).tolist()
    with pytest.raises(ValueError, match="integers"):
        token_array([1, 2.5])


@pytest.mark.parametrize("form", [list, np.array, torch.tensor])
@pytest.mark.parametrize("end", [None, 0, 255, 256, 600, 10_000])
def test_lazy_chunk_hashes_equal_the_eager_ones(form: object, end: int | None) -> None:
    toks = list(range(1000, 1700))
    h = hasher()
    want = h.chunk_hashes(toks[:end], salt="s")
    assert list(h.iter_chunk_hashes(form(toks), "s", end)) == want  # type: ignore[operator]
