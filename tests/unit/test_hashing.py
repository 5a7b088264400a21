"""restok.hashing.sha256_file: the one file hash every manifest, provenance record and weights check stores."""

from __future__ import annotations

import hashlib

from restok.hashing import sha256_file


def test_chunked_hash_equals_the_hash_of_the_whole_file(tmp_path):
    data = bytes(range(256)) * 41 + b"tail"  # not a multiple of any chunk below
    path = tmp_path / "blob.bin"
    path.write_bytes(data)
    for chunk in (1, 7, 256, 1 << 20):
        assert sha256_file(path, chunk) == hashlib.sha256(data).hexdigest()
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert sha256_file(str(empty)) == hashlib.sha256(b"").hexdigest()
