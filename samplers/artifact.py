# SPDX-License-Identifier: GPL-3.0-or-later
"""Saved artifacts that detect their own corruption: safetensors files with a SHA-256 digest.

A file written here is an ordinary safetensors file (any safetensors reader opens it)::

    8 bytes   little-endian length n of the JSON header
    n bytes   JSON header {"__metadata__": {...}, "<tensor>": {"dtype", "shape", "data_offsets"}, ...},
              padded with spaces to a multiple of 8
    rest      the tensors' bytes, one after another

The metadata carries ``"sha256": "sha256:<64 hex digits>"``: the SHA-256 of the *whole file as
written*, with those 64 digits replaced by ``0`` characters.  So the digest covers every byte -- the
length prefix, the header's keys, values, whitespace and padding, and all tensor data -- and a flip
anywhere, even one that keeps the JSON valid, changes it.

A file with no digest (written before digests existed) still loads, with one warning per file.  A
flip cannot pass a digested file off as an old one: a file counts as digested when its raw header
holds the key ``"sha256"`` *or* a ``sha256:<hex>`` value, and one flip cannot remove both.

Loading reads the file once, in chunks, into one buffer, hashing each chunk as it arrives; the
tensors are views of that buffer (no second copy).
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
from pathlib import Path

import torch

from .dpm_encoder import CodeError

DIGEST_KEY = "sha256"
_DIGEST_PREFIX = "sha256:"
_PLACEHOLDER = "0" * 64
_DIGEST_VALUE = re.compile(r"^sha256:[0-9a-f]{64}$")
_RAW_DIGEST_VALUE = re.compile(rb"sha256:[0-9a-fA-F]{64}")
_MAX_HEADER = 100 * 2 ** 20
_CHUNK = 8 * 2 ** 20

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}

_warned: set = set()
log = logging.getLogger("dpm_latent")


class ArtifactError(CodeError):
    """A saved artifact that cannot be used: corrupt, truncated, or of another kind."""


def _layout(tensors: dict[str, torch.Tensor]):
    """(name, cpu contiguous tensor) sorted so that every tensor starts aligned to its item size."""
    items = []
    for name, t in tensors.items():
        if not isinstance(name, str) or not name or name == "__metadata__":
            raise ArtifactError(f"tensor name {name!r} cannot be stored")
        if not isinstance(t, torch.Tensor) or t.dtype not in _DTYPE_NAMES:
            raise ArtifactError(f"tensor {name!r}: dtype {getattr(t, 'dtype', type(t))} cannot be stored")
        items.append((name, t.detach().to("cpu").contiguous()))
    items.sort(key=lambda kv: (-kv[1].element_size(), kv[0]))
    return items


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy()).cast("B")


def _header_bytes(meta: dict[str, str], items) -> bytes:
    header: dict = {"__metadata__": meta}
    offset = 0
    for name, t in items:
        n = t.numel() * t.element_size()
        header[name] = {"dtype": _DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=True).encode("ascii")
    return raw + b" " * (-len(raw) % 8)


def save_artifact(path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    """Write ``tensors`` and string ``metadata`` as safetensors with a SHA-256 digest of the whole file.

    Written to a temporary file and renamed, so a crash never leaves half a file under ``path``."""
    meta = {}
    for k, v in metadata.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise ArtifactError(f"metadata must map str to str, got {k!r}: {type(v).__name__}")
        meta[k] = v
    if DIGEST_KEY in meta:
        raise ArtifactError(f"metadata key {DIGEST_KEY!r} is reserved for the digest")
    meta[DIGEST_KEY] = _DIGEST_PREFIX + _PLACEHOLDER
    items = _layout(tensors)
    header = _header_bytes(meta, items)
    prefix = len(header).to_bytes(8, "little")
    h = hashlib.sha256(prefix)
    h.update(header)
    blobs = [_tensor_bytes(t) for _n, t in items]
    for b in blobs:
        h.update(b)
    marker = (_DIGEST_PREFIX + _PLACEHOLDER).encode("ascii")
    if header.count(marker) != 1:
        raise ArtifactError("a metadata value repeats the digest placeholder; it cannot be stored")
    header = header.replace(marker, (_DIGEST_PREFIX + h.hexdigest()).encode("ascii"))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(prefix)
            f.write(header)
            for b in blobs:
                f.write(b)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _corrupt(name: str, why: str) -> ArtifactError:
    return ArtifactError(f"{name}: the file is corrupt ({why})")


def _parse_entries(name: str, header: dict, data_len: int):
    """[(tensor name, dtype, shape, begin, end)] checked to tile the data region exactly."""
    entries = []
    for key, spec in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype = _DTYPES[spec["dtype"]]
            shape = [int(v) for v in spec["shape"]]
            begin, end = (int(v) for v in spec["data_offsets"])
            if not all(isinstance(v, int) and not isinstance(v, bool) for v in (*spec["shape"], *spec["data_offsets"])):
                raise TypeError("non-integer shape or offset")
        except (KeyError, TypeError, ValueError) as e:
            raise _corrupt(name, f"tensor entry {key!r} is malformed: {type(e).__name__}: {e}") from None
        if any(v < 0 for v in shape) or begin < 0 or end < begin:
            raise _corrupt(name, f"tensor {key!r} has a negative size or offset")
        nbytes = math.prod(shape) * (torch.empty((), dtype=dtype).element_size())
        if end - begin != nbytes:
            raise _corrupt(name, f"tensor {key!r} declares shape {shape} ({nbytes} bytes) but "
                                 f"occupies {end - begin} bytes")
        entries.append((key, dtype, shape, begin, end))
    pos = 0
    for key, _dtype, _shape, begin, end in sorted(entries, key=lambda e: (e[3], e[4])):
        if begin != pos:
            raise _corrupt(name, f"tensor {key!r} starts at byte {begin}, expected {pos} (gap or overlap)")
        pos = end
    if pos != data_len:
        raise _corrupt(name, f"the tensors take {pos} bytes but the file holds {data_len} data bytes "
                             "(truncated or padded)")
    return entries


def load_artifact(path, fmt: str, what: str = "file") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read an artifact written by :func:`save_artifact`; verify its digest while reading.

    ``fmt`` must equal the header's ``format`` metadata; ``what`` names the kind of file in messages
    ("latent code", "Asyrp direction", ...).  Raises :class:`ArtifactError` naming the file."""
    path = Path(path)
    name = path.name
    if not path.is_file():
        raise ArtifactError(f"{what} {name!r} does not exist")
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            if size < 10:
                raise _corrupt(name, f"only {size} bytes: empty or truncated; not a safetensors {what}")
            prefix = f.read(8)
            n = int.from_bytes(prefix, "little")
            if n < 2 or n > _MAX_HEADER or 8 + n > size:
                raise _corrupt(name, f"header length {n} does not fit a {size}-byte file; truncated, damaged, "
                                     f"or not a safetensors {what}")
            raw_header = f.read(n)
            if len(raw_header) != n:
                raise _corrupt(name, "truncated header")
            try:
                header = json.loads(raw_header.decode("utf-8"))
            except (UnicodeDecodeError, ValueError) as e:
                raise _corrupt(name, f"the header is not valid JSON: {e}; not a safetensors {what}") from None
            if not isinstance(header, dict):
                raise _corrupt(name, "the header is not a JSON object")
            meta = header.get("__metadata__", {}) or {}
            if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                     for k, v in meta.items()):
                raise _corrupt(name, "the header metadata is not a map of strings")
            digested = f'"{DIGEST_KEY}"'.encode() in raw_header or _RAW_DIGEST_VALUE.search(raw_header)
            if not digested and meta.get("format") != fmt:
                raise ArtifactError(f"{name}: not a {what} (header format is {meta.get('format')!r}, "
                                    f"expected {fmt!r})")
            data_len = size - 8 - n
            entries = _parse_entries(name, header, data_len)
            hasher = None
            if digested:
                stored = meta.get(DIGEST_KEY)
                if stored is None or not _DIGEST_VALUE.match(stored) or raw_header.count(stored.encode()) != 1:
                    raise _corrupt(name, "its integrity record is damaged")
                hasher = hashlib.sha256(prefix)
                hasher.update(raw_header.replace(stored.encode(), (_DIGEST_PREFIX + _PLACEHOLDER).encode()))
            buf = bytearray(data_len)
            view = memoryview(buf)
            pos = 0
            while pos < data_len:
                got = f.readinto(view[pos:pos + _CHUNK])
                if not got:
                    raise _corrupt(name, "truncated data")
                if hasher is not None:
                    hasher.update(view[pos:pos + got])
                pos += got
            if f.read(1):
                raise _corrupt(name, "the file grew while it was read")
    except ArtifactError:
        raise
    except OSError as e:
        raise ArtifactError(f"{name}: cannot be read ({e})") from None

    if hasher is not None:
        if hasher.hexdigest() != stored[len(_DIGEST_PREFIX):]:
            raise _corrupt(name, "checksum mismatch")
        if meta.get("format") != fmt:
            raise ArtifactError(f"{name}: not a {what} (header format is {meta.get('format')!r}, "
                                f"expected {fmt!r})")
    else:
        key = (str(path.resolve()), size, path.stat().st_mtime_ns)
        if key not in _warned:
            _warned.add(key)
            log.warning("%s: this %s carries no checksum (written before DPM Latent stored one), so corruption "
                        "cannot be detected; save it again to add one", name, what)

    tensors = {}
    for key, dtype, shape, begin, end in entries:
        item = torch.empty((), dtype=dtype).element_size()
        count = (end - begin) // item
        if count == 0:
            tensors[key] = torch.empty(shape, dtype=dtype)
        elif begin % item == 0:
            tensors[key] = torch.frombuffer(buf, dtype=dtype, count=count, offset=begin).reshape(shape)
        else:  # unaligned (a foreign writer): copy
            tensors[key] = torch.frombuffer(bytearray(view[begin:end]), dtype=dtype).reshape(shape)
    return tensors, dict(meta)
