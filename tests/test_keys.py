import os
import struct
import subprocess
import sys

import blake3
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lmcache import keys
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


def test_kept_seeds_equal_fresh_ones_and_keep_salts_apart(monkeypatch: pytest.MonkeyPatch) -> None:
    """A hasher keeps each salt's chain seed; what it returns from its memory is what a hasher that
    remembers nothing computes, salts equal as dict keys (1, True, 1.0) keep seeds of their own,
    long salts are never kept and the memory is bounded."""
    monkeypatch.setattr(keys, "SEED_CACHE_SIZE", 3)
    h, toks = hasher(), list(range(512))
    salts: list[object] = [None, 1, True, "1", "tenant-a", 1, True, None, "x" * 300, "x" * 300]
    for salt in salts:
        assert h.chunk_hashes(toks, salt=salt) == hasher().chunk_hashes(toks, salt=salt)  # type: ignore[arg-type]
    assert h.seed(1) != h.seed(True) and h.seed(1) != h.seed("1")
    assert h.seed("x" * 300) == hasher().seed("x" * 300)
    computed: list[bytes] = []
    counted = hasher()
    new_hash = counted.new_hash
    counted.new_hash = lambda data: computed.append(data) or new_hash(data)  # type: ignore[method-assign]
    for salt in [None, None, "x" * 300, "x" * 300, "a", "b", None, "c", None]:
        counted.seed(salt)  # type: ignore[arg-type]
    # None hashed once until a fourth salt cleared the three kept; long salts every time.
    assert len(computed) == 1 + 2 + 2 + 1 + 1


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


@pytest.mark.parametrize("algorithm", sorted(HASH_ALGORITHMS))
@pytest.mark.parametrize("num_chunks", [0, 1, 2, 3, 16, 17, 40])
def test_lazy_list_hashes_equal_the_reference_chain(algorithm: str, num_chunks: int) -> None:
    """A list hashed lazily (a save's path) chains as the reference does, whole or up to ``end``."""
    h = hasher(algorithm, chunk=8)
    toks = [int(t) for t in np.random.default_rng(num_chunks).integers(0, 2**40, size=num_chunks * 8 + 5)]
    want = _reference(h, toks, "s")
    assert list(h.iter_chunk_hashes(toks, "s")) == want
    for end in (num_chunks * 8 // 2, num_chunks * 8 - 1):
        assert list(h.iter_chunk_hashes(toks, "s", end)) == want[: max(end, 0) // 8]


def test_a_bad_token_in_a_later_group_raises_after_the_hashes_before_it() -> None:
    """The lazy path hashes groups of chunks natively: a bad token fails when its group is reached,
    with the message the Python path gives, after the chunks before it were yielded."""
    h = hasher("blake3", chunk=8)
    toks = list(range(40 * 8))
    want = _reference(h, toks, "s")
    toks[20 * 8 + 3] = 2**70
    got = []
    with pytest.raises(ValueError, match="int64"):
        for digest in h.iter_chunk_hashes(toks, "s"):
            got.append(digest)
    assert got == want[:20]


# -- lmcache._hashchain: the C chain for Python lists ------------------------------------------------

INT64 = st.integers(-(2**63), 2**63 - 1)
TOKEN = st.one_of(
    st.integers(-5, 300), st.integers(-(2**31), 2**31), INT64, st.sampled_from([-(2**63), 2**63 - 1])
)


# The native tests import lmcache._hashchain themselves (no importorskip): CI builds it (setup.py), so a
# broken build fails them, while the pure-Python tests above still run.


def test_native_chain_is_built_and_used(monkeypatch: pytest.MonkeyPatch) -> None:
    """A broken build must fail here, not fall back to pure Python silently; blake3 (the default)
    takes the native BLAKE3 chain, the others the generic one."""
    from lmcache import _hashchain

    assert keys.native_chain() is _hashchain.chain_digests
    calls: list[str] = []
    for name in ("chain_digests", "blake3_chain_digests"):
        native = getattr(_hashchain, name)
        monkeypatch.setattr(
            keys,
            f"_native_{name.removesuffix('_digests')}",
            lambda *a, n=name, f=native: calls.append(n) or f(*a),
        )
    hasher("blake3", chunk=4).chunk_digests(list(range(8)))
    hasher("sha256", chunk=4).chunk_digests(list(range(8)))
    assert calls == ["blake3_chain_digests", "chain_digests"]


def test_without_the_c_chain_lists_hash_in_python_and_say_so_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    h = TokenHasher(4, "blake3", "m", b"sig")
    tokens = list(range(-3, 10))
    native = h.chunk_digests(tokens, "salt")
    monkeypatch.setattr(keys, "_native_chain", None)
    monkeypatch.setattr(keys, "_told_pure", False)
    with caplog.at_level("WARNING", logger="lmcache"):
        assert h.chunk_digests(tokens, "salt") == native
        assert b"".join(h.chunk_hashes(tokens, "salt")) == native
    assert [m for m in caplog.messages if "lmcache._hashchain is not built" in m] == [caplog.messages[0]]


def _reference(h: TokenHasher, tokens: list[int], salt: object) -> list[bytes]:
    """The chain spelled out, independent of keys.py's code paths: h_i = H(h_{i-1} || H(chunk i))."""
    size, parent, out = h.chunk_size, h.seed(salt), []  # type: ignore[arg-type]
    for begin in range(0, len(tokens) // size * size, size):
        inner = h.new_hash(struct.pack(f"<{size}q", *tokens[begin : begin + size])).digest()
        parent = h.new_hash(parent + inner).digest()
        out.append(parent)
    return out


@settings(max_examples=150, deadline=None)
@given(
    algorithm=st.sampled_from(sorted(HASH_ALGORITHMS)),
    chunk=st.integers(1, 40),
    tokens=st.lists(TOKEN, max_size=300),
    salt=st.one_of(st.none(), st.text(max_size=8), st.integers()),
)
def test_native_chain_equals_pure_python(algorithm: str, chunk: int, tokens: list[int], salt: object) -> None:
    from lmcache._hashchain import blake3_chain_digests, chain_digests

    h = hasher(algorithm, chunk=chunk)
    want = _reference(h, tokens, salt)
    assert h.pure_chunk_hashes(tokens, salt) == want  # type: ignore[arg-type]
    assert h.chunk_hashes(tokens, salt) == want  # type: ignore[arg-type]
    assert h.chunk_digests(tokens, salt) == b"".join(want)  # type: ignore[arg-type]
    assert h.chunk_digests(np.array(tokens, dtype=np.int64), salt) == b"".join(want)  # type: ignore[arg-type]
    seed = h.seed(salt)  # type: ignore[arg-type]
    for n in {0, len(want) // 2, len(want)}:
        assert chain_digests(tokens, chunk, n, seed, h.new_hash) == b"".join(want[:n])
        if algorithm == "blake3":
            assert blake3_chain_digests(tokens, chunk, n, seed) == b"".join(want[:n])


# Chunk sizes whose token bytes (8 per token) make every shape of BLAKE3 input: part of one block,
# exactly one block, one partial 1 KiB chunk, exactly one chunk, a two-chunk tree, two chunks and a
# partial one, a power of two of chunks, and deeper unbalanced trees (3000 tokens: 24 chunks).
BLAKE3_SHAPES = [1, 7, 8, 9, 100, 127, 128, 129, 256, 300, 512, 1000, 1024, 3000]


@pytest.mark.parametrize("chunk", BLAKE3_SHAPES)
@pytest.mark.parametrize("num_chunks", [1, 15, 16, 17, 40])  # SIMD lanes: under, exactly, over one group
def test_native_blake3_equals_the_blake3_package(chunk: int, num_chunks: int) -> None:
    """The native BLAKE3 (lmcache/_blake3.c) gives the `blake3` package's digests for every input
    shape and any number of chunks, the last group of lanes partly empty included."""
    from lmcache._hashchain import blake3_chain_digests

    rng = np.random.default_rng(chunk * 100 + num_chunks)
    size = chunk * num_chunks + chunk - 1  # and a partial tail, never hashed
    tokens = [int(t) for t in rng.integers(-(2**63), 2**63 - 1, size=size, dtype=np.int64)]
    h = hasher("blake3", chunk=chunk)
    want = _reference(h, tokens, "salt")
    assert blake3_chain_digests(tokens, chunk, num_chunks, h.seed("salt")) == b"".join(want)
    assert h.chunk_hashes(tokens, "salt") == want


# Input lengths in bytes, of every shape (see BLAKE3_SHAPES).
@pytest.mark.parametrize("length", [8, 56, 64, 72, 1000, 1024, 1032, 2048, 2400, 24_000])
@pytest.mark.parametrize("count", [1, 3, 4, 5, 8, 15, 16, 17, 33])  # under, at and over each width's groups
def test_every_lane_width_this_cpu_runs_gives_the_blake3_packages_digests(length: int, count: int) -> None:
    """Each vector width of the native BLAKE3 this CPU can run (not only the widest, which the chain
    uses), the last group partly empty included."""
    from lmcache._hashchain import blake3_digests, blake3_lane_widths

    data = np.random.default_rng(length * 100 + count).bytes(length * count)
    want = b"".join(blake3.blake3(data[i * length : (i + 1) * length]).digest() for i in range(count))
    for lanes in blake3_lane_widths():
        assert blake3_digests(data, length, lanes) == want, lanes


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as info:
            return next((set(line.split()) for line in info if line.startswith("flags")), set())
    except OSError:
        return set()


def test_the_lane_widths_are_the_cpus_widest_first_and_no_other_width_is_taken() -> None:
    from lmcache._hashchain import blake3_digests, blake3_lane_widths

    widths = blake3_lane_widths()
    assert widths[-1] == 4 and list(widths) == sorted(widths, reverse=True)
    flags = _cpu_flags()
    if os.uname().machine == "x86_64" and flags:
        assert (16 in widths) == ("avx512f" in flags) and (8 in widths) == ("avx2" in flags)
    for lanes in {4, 5, 8, 16, 2**40} - set(widths):  # not a width, or one this CPU lacks: never run
        for data in (b"x" * 64, b""):
            with pytest.raises((ValueError, OverflowError), match="blake3_lane_widths|too large"):
                blake3_digests(data, 64, lanes)
    with pytest.raises(ValueError, match="length must be positive"):
        blake3_digests(b"x" * 64, 0, 4)


def test_native_blake3_chain_rejects_bad_arguments() -> None:
    from lmcache._hashchain import blake3_chain_digests

    seed = b"s" * 32
    with pytest.raises(ValueError, match="32-byte"):
        blake3_chain_digests([1, 2], 2, 1, b"s" * 16)
    with pytest.raises(TypeError, match="seed must be bytes"):
        blake3_chain_digests([1, 2], 2, 1, "s" * 32)
    with pytest.raises(TypeError, match="list"):
        blake3_chain_digests((1, 2), 2, 1, seed)
    with pytest.raises(ValueError, match="num_chunks"):
        blake3_chain_digests([1, 2, 3], 2, 2, seed)
    with pytest.raises(ValueError, match="chunk_size"):
        blake3_chain_digests([1, 2, 3], 0, 0, seed)
    with pytest.raises(ValueError, match="item 1 "):
        blake3_chain_digests([1, 2**64], 2, 1, seed)
    with pytest.raises(TypeError):
        blake3_chain_digests([1, 2], 2, 1, seed, blake3.blake3)
    assert blake3_chain_digests([1, 2], 2, 0, seed) == b""
    assert blake3_chain_digests([], 2**55, 0, seed) == b""  # no buffer sized by a chunk of 2**55 tokens


# -- blake3_chain_bytes: token ids already in key format (the server's wire arrays) -----------------


def _wire_arrays(tokens: list[int]) -> list[np.ndarray]:
    """The forms an int64-LE token array takes on its way in: read-only over a received frame,
    writable, and a strided view (not contiguous: copied first)."""
    data = struct.pack(f"<{len(tokens)}q", *tokens)
    doubled = np.repeat(np.array(tokens, dtype="<i8"), 2)
    return [np.frombuffer(data, dtype="<i8"), np.array(tokens, dtype="<i8"), doubled[::2]]


@pytest.mark.parametrize("chunk", BLAKE3_SHAPES)
@pytest.mark.parametrize("num_chunks", [0, 1, 16, 17, 40])
def test_native_blake3_bytes_equals_the_reference_chain(chunk: int, num_chunks: int) -> None:
    from lmcache._hashchain import blake3_chain_bytes

    rng = np.random.default_rng(chunk * 7 + num_chunks)
    tokens = [int(t) for t in rng.integers(-(2**63), 2**63 - 1, size=chunk * num_chunks + chunk // 2)]
    h = hasher("blake3", chunk=chunk)
    want = _reference(h, tokens, "salt")
    data = struct.pack(f"<{len(tokens)}q", *tokens)
    for n in {0, num_chunks // 2, num_chunks}:
        assert blake3_chain_bytes(data, chunk, n, h.seed("salt")) == b"".join(want[:n])
        assert blake3_chain_bytes(memoryview(data), chunk, n, h.seed("salt")) == b"".join(want[:n])
    for form in _wire_arrays(tokens):
        assert h.chunk_digests(form, "salt") == b"".join(want)  # type: ignore[arg-type]


@pytest.mark.parametrize("end", [None, 0, 7, 8, 9, 130, 320, 10_000])
def test_arrays_hash_lazily_in_native_groups(end: int | None, monkeypatch: pytest.MonkeyPatch) -> None:
    """An array (the server's tokens) hashes lazily through the native bytes chain, a group of chunks
    per call and the first chunk alone, with the reference's digests."""
    from lmcache import _hashchain

    calls: list[int] = []
    native = _hashchain.blake3_chain_bytes
    monkeypatch.setattr(
        keys, "_native_blake3_bytes", lambda d, c, n, s: calls.append(n) or native(d, c, n, s)
    )
    h = hasher("blake3", chunk=8)
    tokens = list(range(-50, 40 * 8 - 50))
    want = _reference(h, tokens[:end], None)
    for form in _wire_arrays(tokens):
        calls.clear()
        assert list(h.iter_chunk_hashes(form, None, end)) == want  # type: ignore[arg-type]
        assert sum(calls) == len(want) and calls[:1] == [1][: len(want)]
        assert all(n <= keys.NATIVE_GROUP_CHUNKS for n in calls)


def test_arrays_of_other_algorithms_take_the_python_path() -> None:
    tokens = list(range(100))
    array = np.array(tokens, dtype="<i8")
    for algorithm in ("sha256", "xxh3_128"):
        h = hasher(algorithm, chunk=8)
        assert h.chunk_hashes(array) == list(h.iter_chunk_hashes(array)) == _reference(h, tokens, None)
    h = hasher("blake3", chunk=8)
    with pytest.raises(ValueError, match="flat"):
        h.chunk_digests(np.zeros((2, 8), dtype="<i8"))


def test_native_blake3_bytes_rejects_bad_arguments() -> None:
    from lmcache._hashchain import blake3_chain_bytes

    seed, data = b"s" * 32, bytes(8 * 4)
    with pytest.raises(ValueError, match="32-byte"):
        blake3_chain_bytes(data, 2, 1, b"s" * 16)
    with pytest.raises(ValueError, match="32-byte"):
        blake3_chain_bytes(data, 2, 1, "s" * 32)
    with pytest.raises(TypeError):
        blake3_chain_bytes([1, 2], 2, 1, seed)  # a list is not a buffer: blake3_chain_digests takes it
    with pytest.raises(ValueError, match="num_chunks"):
        blake3_chain_bytes(data, 2, 3, seed)
    with pytest.raises(ValueError, match="num_chunks"):
        blake3_chain_bytes(data, 2, -1, seed)
    with pytest.raises(ValueError, match="chunk_size"):
        blake3_chain_bytes(data, 0, 0, seed)
    with pytest.raises(TypeError, match="4 positional"):
        blake3_chain_bytes(data, 2, 1)
    with pytest.raises((BufferError, ValueError), match="contiguous"):
        blake3_chain_bytes(np.arange(8, dtype="<i8")[::2], 2, 1, seed)  # not contiguous
    assert blake3_chain_bytes(data, 2**55, 0, seed) == b""
    assert blake3_chain_bytes(bytearray(data), 2, 2, seed) == blake3_chain_bytes(data, 2, 2, seed)


def test_native_chain_takes_what_struct_takes() -> None:
    """Items that are not exact ints but index as ints (bools, numpy ints) hash as the pure path does."""
    h = hasher(chunk=4)
    toks = [True, np.int64(-3), np.int32(7), 2**62, False, 1, 2, 3, 9]
    assert h.chunk_hashes(toks) == h.pure_chunk_hashes(toks, None) == _reference(h, toks, None)


@pytest.mark.parametrize("bad", [2**63, -(2**63) - 1, 1.5, "7", None])
@pytest.mark.parametrize("where", [0, 5, 9])  # first chunk, second chunk, the partial tail
def test_bad_token_ids_raise_value_error_on_every_path(bad: object, where: int) -> None:
    from lmcache._hashchain import chain_digests

    h = hasher(chunk=4)
    toks: list = list(range(10))
    toks[where] = bad
    for fn in (h.pure_chunk_hashes, h.chunk_hashes, h.chunk_digests):
        with pytest.raises(ValueError, match="token ids must be integers in int64 range"):
            fn(toks, None)
    if where < 8:
        with pytest.raises(ValueError, match=f"item {where} "):
            chain_digests(toks, 4, 2, h.seed(None), h.new_hash)


def test_native_chain_rejects_bad_arguments() -> None:
    from lmcache._hashchain import chain_digests

    seed, new = b"s" * 32, blake3.blake3
    with pytest.raises(TypeError, match="list"):
        chain_digests((1, 2, 3, 4), 2, 2, seed, new)
    with pytest.raises(TypeError, match="list"):
        chain_digests(np.arange(4), 2, 2, seed, new)
    with pytest.raises(ValueError, match="num_chunks"):
        chain_digests([1, 2, 3], 2, 2, seed, new)
    with pytest.raises(ValueError, match="num_chunks"):
        chain_digests([1, 2, 3], 2, -1, seed, new)
    with pytest.raises(ValueError, match="chunk_size"):
        chain_digests([1, 2, 3], 0, 0, seed, new)
    with pytest.raises(TypeError, match="seed"):
        chain_digests([1, 2], 2, 1, "s", new)
    with pytest.raises(TypeError, match="callable"):
        chain_digests([1, 2], 2, 1, seed, None)
    with pytest.raises(TypeError):
        chain_digests([1, 2], 2, 1, seed)
    with pytest.raises(TypeError):
        chain_digests([1, 2], "2", 1, seed, new)
    with pytest.raises(TypeError, match="not bytes"):
        chain_digests([1, 2], 2, 1, seed, lambda data: type("H", (), {"digest": lambda self: "x"})())
    with pytest.raises(ZeroDivisionError):
        chain_digests([1, 2], 2, 1, seed, lambda data: 1 / 0)


def test_native_chain_survives_the_list_shrinking_under_it() -> None:
    """An item's ``__index__`` is Python code: if it empties the list, an error, not a read past the
    end. ``new`` runs after every token is copied, so emptying the list there changes nothing."""
    from lmcache._hashchain import blake3_chain_digests, chain_digests

    class Shrinks:
        def __init__(self, victim: list) -> None:
            self.victim = victim

        def __index__(self) -> int:
            self.victim.clear()
            return 1

    for chain, extra in ((chain_digests, (blake3.blake3,)), (blake3_chain_digests, ())):
        toks: list = list(range(64))
        toks[3] = Shrinks(toks)
        with pytest.raises(RuntimeError, match="changed size"):
            chain(toks, 8, 8, b"s" * 32, *extra)

    h = hasher(chunk=8)
    toks = list(range(64))
    want = b"".join(_reference(h, toks, None))

    def new(data: bytes) -> object:
        toks.clear()
        return blake3.blake3(data)

    assert chain_digests(toks, 8, 8, h.seed(None), new) == want
