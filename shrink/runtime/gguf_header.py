"""The header of a GGUF file (metadata and tensor table), read without touching tensor data.

Hand-written rather than ``gguf.GGUFReader``: that reader builds a numpy view for every element
of every array, so a file with a 49k-token vocabulary and its merges takes seconds to open. This
reader reads the header with buffered reads and skips arrays longer than ``max_array`` (a
string array is skipped by reading each item's length only). Type names and sizes come from the
gguf package (``GGMLQuantizationType``, ``GGML_QUANT_SIZES``).

Layout (versions 2 and 3, little endian): ``GGUF`` magic, u32 version, u64 tensor count, u64
key/value count; each key/value: string key, u32 value type, value; each tensor: string name,
u32 n_dims, u64 dims[n_dims], u32 ggml type, u64 offset from the data start. A string is a u64
length and utf-8 bytes; an array is a u32 item type, a u64 count and the items. The data starts
at the next multiple of ``general.alignment`` (default 32) after the tensor table.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

from shrink.core.errors import ShrinkError

CHUNK = 1 << 20
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 8
STRING, ARRAY = 8, 9
# value type -> struct format of one item (7 is bool, one byte)
SCALARS = {
    0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d",
}  # fmt: skip
ONE = {vtype: struct.Struct("<" + fmt) for vtype, fmt in SCALARS.items()}
U32, U64 = ONE[4], ONE[10]


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of the table. ``shape`` is in GGUF order (fastest-varying dimension first, as
    ``GGUFReader``'s ``shape``); ``offset`` is absolute, from the start of the file."""

    name: str
    shape: tuple[int, ...]
    type_name: str
    type_id: int
    offset: int
    n_bytes: int


@dataclass
class GgufHeader:
    """``kv``: key -> python value (int, float, bool, str or list), arrays longer than the
    reader's ``max_array`` left out and their lengths in ``skipped``."""

    version: int
    kv: dict[str, object]
    skipped: dict[str, int] = field(default_factory=dict)
    tensors: list[TensorInfo] = field(default_factory=list)
    alignment: int = DEFAULT_ALIGNMENT
    data_start: int = 0


class _Bad(Exception):
    """The header cannot be read: a short file or a value out of range."""


@dataclass(frozen=True)
class _Skip:
    """An array left out, and its length."""

    count: int


class _Stream:
    """Little-endian reads over a file through a buffer of ``CHUNK`` bytes."""

    def __init__(self, f, size: int):
        self.f, self.size = f, size
        self.buf, self.pos, self.base = b"", 0, 0  # base: file offset of buf[0]

    def tell(self) -> int:
        return self.base + self.pos

    def _need(self, n: int) -> None:
        if self.pos + n <= len(self.buf):
            return
        if self.tell() + n > self.size:
            raise _Bad(f"the header runs past the end of the file at byte {self.size}")
        self.base += self.pos
        self.buf = self.buf[self.pos :] + self.f.read(max(n, CHUNK))
        self.pos = 0
        if len(self.buf) < n:
            raise _Bad(f"the file ends early at byte {self.base + len(self.buf)}")

    def unpack(self, st: struct.Struct) -> tuple:
        self._need(st.size)
        out = st.unpack_from(self.buf, self.pos)
        self.pos += st.size
        return out

    def u32(self) -> int:
        return self.unpack(U32)[0]

    def u64(self) -> int:
        return self.unpack(U64)[0]

    def string(self) -> str:
        n = self.u64()
        self._need(n)
        raw = self.buf[self.pos : self.pos + n]
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise _Bad(f"a string at byte {self.tell() - n} is not utf-8") from None

    def skip(self, n: int) -> None:
        if self.pos + n <= len(self.buf):
            self.pos += n
            return
        target = self.tell() + n
        if target > self.size:
            raise _Bad(f"the header runs past the end of the file at byte {self.size}")
        self.f.seek(target)
        self.buf, self.pos, self.base = b"", 0, target


def _value(s: _Stream, vtype: int, max_array: int):
    """One value of type ``vtype``; ``_Skip(count)`` for an array longer than ``max_array``."""
    if vtype == STRING:
        return s.string()
    if vtype in SCALARS:
        return s.unpack(ONE[vtype])[0]
    if vtype != ARRAY:
        raise _Bad(f"unknown value type {vtype} at byte {s.tell() - 4}")
    item, count = s.u32(), s.u64()
    if count > max_array:
        _skip_items(s, item, count)
        return _Skip(count)
    if item in SCALARS:
        return list(s.unpack(struct.Struct(f"<{count}{SCALARS[item]}")))
    return [_value(s, item, max_array) for _ in range(count)]


def _skip_items(s: _Stream, item: int, count: int) -> None:
    if item in SCALARS:
        s.skip(count * ONE[item].size)
    elif item == STRING:
        for _ in range(count):
            s.skip(s.u64())
    elif item == ARRAY:
        for _ in range(count):
            sub, n = s.u32(), s.u64()
            _skip_items(s, sub, n)
    else:
        raise _Bad(f"unknown array item type {item} at byte {s.tell()}")


def _tensor(s: _Stream, ggml) -> tuple[str, tuple[int, ...], object, int]:
    name = s.string()
    n_dims = s.u32()
    if n_dims > MAX_DIMS:
        raise _Bad(f"tensor {name} has {n_dims} dimensions")
    shape = s.unpack(struct.Struct(f"<{n_dims}Q")) if n_dims else ()
    type_id = s.u32()
    try:
        qtype = ggml.GGMLQuantizationType(type_id)
    except ValueError:
        raise _Bad(f"tensor {name} has unknown type {type_id}") from None
    return name, tuple(shape), qtype, s.u64()


def _parse(s: _Stream, version: int, max_array: int) -> GgufHeader:
    import gguf

    n_tensors, n_kv = s.u64(), s.u64()
    head = GgufHeader(version=version, kv={})
    for _ in range(n_kv):
        key, vtype = s.string(), s.u32()
        value = _value(s, vtype, max_array)
        if isinstance(value, _Skip):
            head.skipped[key] = value.count
        else:
            head.kv[key] = value
        if key == "general.alignment":
            if vtype != 4 or value == 0 or value & (value - 1):
                raise _Bad("general.alignment is not a power of two stored as u32")
            head.alignment = value
    infos, names = [], set()
    for _ in range(n_tensors):
        infos.append(info := _tensor(s, gguf))
        if info[0] in names:
            raise _Bad(f"tensor {info[0]} appears twice")
        names.add(info[0])
    head.data_start = -(-s.tell() // head.alignment) * head.alignment
    for name, shape, qtype, rel in infos:
        if qtype not in gguf.GGML_QUANT_SIZES:
            raise _Bad(f"tensor {name} has type {qtype.name}, whose size is unknown")
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        n_elems = 1
        for d in shape:
            n_elems *= d
        n_bytes = n_elems * type_size // block
        head.tensors.append(
            TensorInfo(name, shape, qtype.name, int(qtype), head.data_start + rel, n_bytes)
        )
    return head


def read_header(path: str | Path, max_array: int = 1024) -> GgufHeader:
    """The header of the GGUF file at ``path``; arrays longer than ``max_array`` are skipped.
    A file that is not GGUF v2/v3, or whose header is cut or damaged: ``ShrinkError``."""
    p = Path(path)
    try:
        f = open(p, "rb")
    except OSError as e:
        raise ShrinkError(f"cannot read GGUF file '{path}': {e.strerror}") from None
    with f:
        size = p.stat().st_size
        head = f.read(8)
        if size < 24:
            raise ShrinkError(f"'{path}' is not a GGUF file ({size} bytes: too short)")
        if head[:4] != b"GGUF":
            raise ShrinkError(f"'{path}' is not a GGUF file (no GGUF magic)")
        version = int.from_bytes(head[4:8], "little")
        if version not in (2, 3):
            raise ShrinkError(
                f"'{path}' is GGUF version {version}; llama.cpp reads versions 2 and 3"
            )
        s = _Stream(f, size)
        s.base = 8
        try:
            return _parse(s, version, max_array)
        except _Bad as e:
            raise ShrinkError(
                f"'{path}' is a damaged GGUF file ({e}); it may be truncated"
            ) from None


def tensor_type_counts(header: GgufHeader) -> dict[str, int]:
    """How many tensors of each type, e.g. ``{"Q5_0": 150, "F32": 61}``: most frequent first,
    then by name."""
    types: dict[str, int] = {}
    for t in header.tensors:
        types[t.type_name] = types.get(t.type_name, 0) + 1
    return dict(sorted(types.items(), key=lambda kv: (-kv[1], kv[0])))
