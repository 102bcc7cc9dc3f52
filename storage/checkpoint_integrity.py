"""Is a checkpoint file whole? Its size and zip end, and a SHA-256 of its content stored in the file itself.

torch.save writes a zip archive. zipfile and torch.load check only its end (the central directory), so a block
damaged in the middle (a bad sector, a copy gone wrong) loads silently as wrong weights. write_sealed hashes
the bytes as torch.save streams them and stores the digest in the archive's comment, a field of zip's end
record that every zip reader (torch.load, zipfile, unzip) skips: the file stays an ordinary torch.save file,
and the checksum is part of the one atomic write (foundation/atomic_file.py), never a file of its own that could
be lost or go stale. The digest covers every byte torch.save wrote (its end record as written, with an
empty comment), so any damage anywhere in the file shows.

Files without a checksum (written before it existed, or by other code: official DiT, the DTR release) are
are read with lighter checks: only their size, first bytes and zip end.

Cost: one SHA-256 pass over the file on each side. Saving hashes the bytes in memory as they stream out
(lost in the fsync of the atomic write: benchmarks/checkpoint_integrity.py measured no difference for 1 GiB);
reading hashes the file before torch.load reads it again (from the page cache, where it now is). SHA-256
runs at ~0.9 GB/s on one core of a loaded 2-core dev machine (SHA-NI; 1.5-2 GB/s on an idle core), so a
10.8 GB DiT-XL/2 training checkpoint (model, EMA, two Adam moments) takes ~5-12 s more to load; zlib's CRC-32
would be ~2x faster but is a 32-bit check. train.py verifies a resumed checkpoint once, on rank 0; each
sampling rank verifies the file it loads.
"""
import hashlib
import os
import zipfile

END_RECORD = b"PK\x05\x06"               # signature of zip's end-of-central-directory record
END_RECORD_SIZE = 22                     # its size without a comment; the last 2 bytes: comment length
MAGIC = b"dtr-checkpoint-sha256:"        # the comment: MAGIC + 64 hex digits
COMMENT_SIZE = len(MAGIC) + 64
CHUNK = 64 << 20                         # bytes hashed per read


class _SealingFile:
    """The file torch.save writes to: hashes every byte and holds back the last END_RECORD_SIZE of them, so
    that the end record can be written with the checksum as its comment (no seeking back: any stream works)."""

    def __init__(self, f):
        self._f, self._hash, self._held = f, hashlib.sha256(), b""

    def write(self, data):
        data = memoryview(data).cast("B")
        self._hash.update(data)
        if len(data) >= END_RECORD_SIZE:
            self._f.write(self._held)
            self._f.write(data[:-END_RECORD_SIZE])
            self._held = bytes(data[-END_RECORD_SIZE:])
        else:
            held = self._held + bytes(data)
            self._f.write(held[:-END_RECORD_SIZE])
            self._held = held[-END_RECORD_SIZE:]
        return len(data)

    def flush(self):
        self._f.flush()

    def seal(self):
        """Write the held end record with the checksum as its comment."""
        record = self._held
        if len(record) != END_RECORD_SIZE or not record.startswith(END_RECORD) or record[-2:] != b"\0\0":
            raise RuntimeError("torch.save did not end its file with a zip end record without comment")
        comment = MAGIC + self._hash.hexdigest().encode()
        self._f.write(record[:-2] + len(comment).to_bytes(2, "little") + comment)


def write_sealed(f, save):
    """save(g) writes a torch.save archive to g; it reaches the open file f with its SHA-256 as zip comment."""
    sealing = _SealingFile(f)
    save(sealing)
    sealing.seal()


def stored_checksum(path):
    """The hex SHA-256 stored in a checkpoint's zip comment, or None for a file without one."""
    size = os.path.getsize(path)
    tail_size = END_RECORD_SIZE + COMMENT_SIZE
    if size < tail_size:
        return None
    with open(path, "rb") as f:
        f.seek(size - tail_size)
        tail = f.read(tail_size)
    if (tail.startswith(END_RECORD) and int.from_bytes(tail[20:22], "little") == COMMENT_SIZE
            and tail[END_RECORD_SIZE:].startswith(MAGIC)):
        return tail[END_RECORD_SIZE + len(MAGIC):].decode("ascii", "replace")
    return None


def content_checksum(path):
    """The SHA-256 of a sealed file's content as torch.save wrote it (its comment, and the comment's length,
    left out); compare with stored_checksum(path)."""
    digest, remaining = hashlib.sha256(), os.path.getsize(path) - COMMENT_SIZE - 2
    buffer = memoryview(bytearray(CHUNK))  # one buffer for the whole file: no 64 MB allocation per read
    with open(path, "rb", buffering=0) as f:
        while remaining > 0:
            n = f.readinto(buffer[:min(CHUNK, remaining)])
            if not n:
                break
            digest.update(buffer[:n])
            remaining -= n
    digest.update(b"\0\0")  # the comment length as torch.save wrote it
    return digest.hexdigest()


def integrity_problem(path, verify_checksum=True):
    """Why `path` cannot be a whole checkpoint (one phrase), or None if it may be one.

    Empty, truncated (its zip end is missing: cheap to see even for a 7 GB file, since zipfile.is_zipfile reads
    only that end), not a torch.save file at all, or a checksum that does not match the content (a full read).
    Files of torch < 1.6 are a pickle starting with protocol 2's b'\\x80\\x02'; torch.load judges those.
    """
    size = os.path.getsize(path)
    if size == 0:
        return "empty (0 bytes)"
    with open(path, "rb") as f:
        head = f.read(4)
    if head[:2] == b"\x80\x02":
        return None
    if head != b"PK\x03\x04":
        return "not a checkpoint file (neither a torch.save archive nor a legacy torch pickle)"
    if not zipfile.is_zipfile(path):
        return f"truncated ({size:,} bytes, the end of the archive is missing)"
    stored = stored_checksum(path) if verify_checksum else None
    if stored is not None and content_checksum(path) != stored:
        return "damaged (its content does not match the SHA-256 checksum stored in it)"
    return None
