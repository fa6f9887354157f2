import io

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmcache.keys import FORMAT_VERSION, ChunkKey
from lmcache.storage import chunk_format as cf
from lmcache.storage.chunk_format import CorruptChunk, Namespace

KEY = ChunkKey(bytes(range(32)), 2, 1)
NS = Namespace("org/model-7b", b"bfloat16/L28/KV2/E8192/T32")
PAYLOAD = np.random.default_rng(0).integers(0, 256, 4096 + 17, dtype=np.uint8)


def test_round_trip_and_header_fields() -> None:
    blob = cf.encode(KEY, NS, 160, PAYLOAD)
    header, payload = cf.decode(blob, KEY, NS)
    assert bytes(payload) == PAYLOAD.tobytes()
    assert header.key == KEY and header.model == NS.model and header.signature == NS.signature
    assert header.num_tokens == 160 and header.payload_len == PAYLOAD.nbytes
    assert header.header_len % 64 == 0 and len(blob) == header.total_len
    assert blob[:4] == cf.MAGIC
    assert int.from_bytes(blob[6:8], "little") == FORMAT_VERSION
    assert header.checksum == cf.payload_checksum(PAYLOAD)
    # Zero-copy: the payload view points into the blob.
    assert payload.obj is memoryview(blob).obj or bytes(payload) == blob[header.header_len :]
    assert cf.read_header(io.BytesIO(blob)) == header
    # decode without expectations accepts any key/namespace
    assert cf.decode(blob)[0] == header


def test_header_is_reused_for_split_writes() -> None:
    header = cf.encode_header(KEY, NS, 64, memoryview(PAYLOAD))
    assert cf.decode(header + PAYLOAD.tobytes(), KEY, NS)[0].num_tokens == 64


def test_empty_and_odd_model_names() -> None:
    for ns in (Namespace("", b""), Namespace("m:é/ü", b"x" * 300)):
        blob = cf.encode(KEY, ns, 1, b"")
        header, payload = cf.decode(blob, KEY, ns)
        assert header.model == ns.model and payload.nbytes == 0


@pytest.mark.parametrize(
    "key, ns",
    [
        (ChunkKey(bytes(range(1, 33)), 2, 1), NS),
        (ChunkKey(KEY.chunk_hash, 1, 1), NS),
        (ChunkKey(KEY.chunk_hash, 2, 0), NS),
        (KEY, Namespace(NS.model, b"float16/L28/KV2/E8192/T32")),
        (KEY, Namespace("other-model", NS.signature)),
    ],
)
def test_wrong_key_or_namespace_is_a_miss(key: ChunkKey, ns: Namespace) -> None:
    blob = cf.encode(KEY, NS, 160, PAYLOAD)
    with pytest.raises(CorruptChunk):
        cf.decode(blob, key, ns)
    assert cf.try_decode(blob, key, ns) is None


def test_every_truncation_is_a_miss() -> None:
    blob = cf.encode(KEY, NS, 160, PAYLOAD[:300])
    for cut in range(len(blob)):
        assert cf.try_decode(blob[:cut], KEY, NS) is None, cut
    assert cf.try_decode(blob + b"\0", KEY, NS) is None  # trailing bytes too


def test_every_header_byte_flip_is_a_miss() -> None:
    blob = cf.encode(KEY, NS, 160, PAYLOAD)
    header_len = cf.parse_header(blob).header_len
    for i in range(header_len):
        bad = bytearray(blob)
        bad[i] ^= 0x01
        assert cf.try_decode(bytes(bad), KEY, NS) is None, i
        assert cf.try_decode(bytes(bad)) is None, i


@settings(max_examples=200, deadline=None)
@given(st.integers(0, PAYLOAD.nbytes - 1), st.integers(1, 255))
def test_payload_byte_flip_is_a_miss(pos: int, mask: int) -> None:
    blob = bytearray(cf.encode(KEY, NS, 160, PAYLOAD))
    blob[cf.parse_header(blob).header_len + pos] ^= mask
    assert cf.try_decode(bytes(blob), KEY, NS) is None


def test_garbage_and_none_are_misses() -> None:
    assert cf.try_decode(None) is None
    assert cf.try_decode(b"") is None
    assert cf.try_decode(b"not a chunk at all" * 10) is None
    bad_version = bytearray(cf.encode(KEY, NS, 1, b"abc"))
    bad_version[4] += 1
    with pytest.raises(CorruptChunk, match="version"):
        cf.decode(bytes(bad_version))


def test_namespace_names() -> None:
    assert len(NS.tag) == 16 and NS.tag == Namespace(NS.model, NS.signature).tag
    assert NS.tag != Namespace(NS.model, b"other").tag != Namespace("x", NS.signature).tag
    assert NS.remote_prefix.startswith(
        f"lmcache:v{FORMAT_VERSION}.{cf.CHUNK_FORMAT_VERSION}:org/model-7b:bfloat16/"
    )
