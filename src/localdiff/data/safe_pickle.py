"""A pickle reader for plain data only, for CIFAR-10 python batches and the MNIST pickle.

It is not ``pickle.Unpickler`` with a filter: it is a small stack machine of its own that knows the
opcodes plain data needs (numbers, strings, bytes, lists, tuples, dicts, memo) and rebuilds numpy
arrays and dtypes from a whitelist of pure constructors. Nothing from the file is ever called or
looked up: an allowed global is a token that only these constructors understand. So a pickle cannot
run code, cannot change the state of any existing object (there is no BUILD/SETATTR on anything but
an array or dtype the file itself is constructing, each exactly once), and cannot allocate more than
it holds: every array must carry exactly its declared bytes, no two arrays may share a buffer (no
zero-stride or overlapping views), dict keys are plain scalars, and containers nest at most
``MAX_DEPTH`` levels. Every failure is a :class:`~localdiff.errors.DataError` naming the file.
"""

from __future__ import annotations

import pickle
import re
import struct
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError
from .limits import ReadLimits, nbytes_of, read_all_bounded
from .pickle_opcodes import DISPATCH, STOP, _ArrayStub, _Corrupt, _DtypeStub, _Refused, _Token, _describe

MAX_DEPTH = 32  # nesting of lists/tuples/dicts (a CIFAR batch needs 2)
MAX_NDIM = 32
MAX_OPS = 1 << 19  # opcodes per file: a CIFAR-10 batch needs about 40,000; bounds memory to ~50 MB of objects
_PLAIN_DTYPE = re.compile(r"[<>|=]?(b1|[iu][1248]|f[248])")

REFUSED = ("which is not plain array/list/dict/bytes data; refusing to load it (a pickle can run code or "
           "change objects when loaded). Get the file from the original source, or convert the arrays to .npz")


def _plain_dtype(obj: Any) -> np.dtype:
    if isinstance(obj, _DtypeStub):
        return obj.dtype
    raise _Refused(f"an array whose dtype is {_describe(obj)}")


def _text(obj: Any) -> str | None:
    if isinstance(obj, bytes):
        return obj.decode("latin-1")
    return obj if isinstance(obj, str) else None


def _shape(obj: Any) -> tuple[int, ...]:
    if (type(obj) is not tuple or len(obj) > MAX_NDIM
            or not all(type(s) is int and 0 <= s < 2**63 for s in obj)):
        raise _Refused(f"an array shape that is not a tuple of at most {MAX_NDIM} non-negative 64-bit integers")
    return obj


class PickleMachine:
    """The stack machine: ``run()`` returns the unpickled object."""

    def __init__(self, data: bytes, encoding: str):
        self.raw, self.data, self.pos, self.encoding = data, memoryview(data), 0, encoding
        self.stack: list = []
        self.marks: list[list] = []
        self.memo: dict[int, Any] = {}
        self.array_bytes = 0
        self.buffers: dict[int, Any] = {}  # raw data already behind an array (kept alive: ids stay unique)
        self.ops = {op[0]: fn for op, fn in DISPATCH.items()}

    # -- reading arguments ---------------------------------------------------------------------
    def take(self, n: int) -> memoryview:
        if n < 0 or self.pos + n > len(self.data):
            raise _Corrupt(f"an argument of {n} bytes at offset {self.pos} runs past the end of the file")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def line(self) -> bytes:
        end = self.raw.find(b"\n", self.pos, self.pos + 65536)
        if end < 0:
            raise _Corrupt(f"a text argument at offset {self.pos} has no end of line")
        out = self.raw[self.pos:end]
        self.pos = end + 1
        return out

    def py2str(self, raw: bytes):
        return raw if self.encoding == "bytes" else raw.decode(self.encoding)

    # -- stack -----------------------------------------------------------------------------------
    def pop(self):
        if not self.stack:
            raise _Corrupt("an opcode pops an empty stack")
        return self.stack.pop()

    def pop_mark(self) -> list:
        if not self.marks:
            raise _Corrupt("an opcode needs a MARK that is not there")
        items, self.stack = self.stack, self.marks.pop()
        return items

    def top(self, kind: type, what: str):
        if not self.stack or type(self.stack[-1]) is not kind:
            raise _Refused(f"{what} on {_describe(self.stack[-1]) if self.stack else 'nothing'}")
        return self.stack[-1]

    def run(self):
        for _ in range(MAX_OPS):
            if self.pos >= len(self.data):
                raise _Corrupt("the file ends before the pickle's STOP opcode")
            code = self.data[self.pos]
            self.pos += 1
            fn = self.ops.get(code)
            if fn is None:
                name = next((n for n, v in vars(pickle).items() if isinstance(v, bytes) and len(v) == 1
                             and v[0] == code and n.isupper()), None)
                if name is None:
                    raise _Corrupt(f"byte 0x{code:02x} at offset {self.pos - 1} is not a pickle opcode")
                raise _Refused(f"the pickle opcode {name}")
            if fn(self) is STOP:
                if len(self.stack) != 1 or self.marks:
                    raise _Corrupt("the pickle's stack is not a single object at STOP")
                return self.stack[0]
        raise _Refused(f"more than {MAX_OPS} opcodes (a batch of images needs far fewer)")

    # -- constructors (the only things a REDUCE can reach) ---------------------------------------
    def construct(self, token: _Token, args: tuple):
        kind = token.kind
        if kind == "reconstruct":
            if len(args) != 3 or not (isinstance(args[0], _Token) and args[0].kind == "ndarray"):
                raise _Refused("numpy's _reconstruct called on something other than numpy.ndarray")
            _shape(args[1])
            return _ArrayStub()
        if kind == "dtype":
            code = _text(args[0]) if args else None
            if code is None or not _PLAIN_DTYPE.fullmatch(code) or any(type(a) not in (bool, int) for a in args[1:]):
                raise _Refused(f"numpy.dtype{tuple(type(a).__name__ for a in args)} that is not a plain numeric type")
            return _DtypeStub(np.dtype(code))
        if kind == "frombuffer":
            if len(args) != 4 or not isinstance(args[0], (bytes, bytearray)):
                raise _Refused("numpy's _frombuffer without an in-band buffer")
            order = _text(args[3])
            if order not in ("C", "F"):
                raise _Refused(f"numpy's _frombuffer with order {type(args[3]).__name__}")
            return self.array(args[0], _plain_dtype(args[1]), _shape(args[2]), order == "F")
        if kind == "scalar":
            if len(args) != 2 or not isinstance(args[1], (bytes, str)):
                raise _Refused("numpy's scalar without its raw bytes")
            dtype = _plain_dtype(args[0])
            raw = args[1] if isinstance(args[1], bytes) else args[1].encode("latin-1")
            if len(raw) != dtype.itemsize:
                raise _Corrupt(f"a numpy scalar of {len(raw)} bytes for dtype {dtype}")
            return np.frombuffer(raw, dtype)[0].item()
        if kind == "encode":
            if not (1 <= len(args) <= 2 and isinstance(args[0], str)
                    and (len(args) == 1 or _text(args[1]) in ("latin1", "latin-1"))):
                raise _Refused("_codecs.encode other than the latin-1 encoding of bytes")
            return args[0].encode("latin-1")
        if kind == "bytes" and args == ():
            return b""
        raise _Refused(f"{token.qualname} called with {len(args)} arguments")

    def array(self, raw, dtype: np.dtype, shape: tuple[int, ...], fortran: bool) -> np.ndarray:
        """A new array over ``raw``, which must hold exactly its bytes and back no other array."""
        if isinstance(raw, str):
            raw = raw.encode("latin-1")
        if not isinstance(raw, (bytes, bytearray)):
            raise _Refused(f"array data held as {type(raw).__name__}")
        need = nbytes_of(shape, dtype.itemsize)
        if need != len(raw):
            raise _Corrupt(f"an array of shape {shape[:8]}{'...' if len(shape) > 8 else ''} and dtype {dtype} needs "
                           f"{need} bytes but carries {len(raw)}")
        if id(raw) in self.buffers:
            raise _Refused("two arrays over the same buffer (a view that repeats data)")
        self.array_bytes += need
        if self.array_bytes > len(self.data):
            raise _Refused("arrays that declare more data than the file holds")
        self.buffers[id(raw)] = raw
        if need == 0:
            return np.empty(shape, dtype)
        return np.frombuffer(raw, dtype).reshape(shape, order="F" if fortran else "C")

    def build(self, obj, state) -> None:
        """BUILD: only the state numpy writes for an array or a dtype the file is constructing."""
        if isinstance(obj, _ArrayStub) and obj.array is None and type(state) is tuple and len(state) == 5:
            version, shape, dtype, fortran, raw = state
            if version != 1 or type(fortran) not in (bool, int):
                raise _Refused("an array state that numpy does not write")
            obj.array = self.array(raw, _plain_dtype(dtype), _shape(shape), bool(fortran))
            return
        if isinstance(obj, _DtypeStub) and not obj.built and type(state) is tuple and len(state) in (8, 9):
            endian = _text(state[1])
            if state[0] not in (3, 4) or endian not in ("<", ">", "|", "=") or state[2:5] != (None, None, None):
                raise _Refused("a dtype state that is not a plain numeric type")
            obj.dtype = obj.dtype.newbyteorder(endian) if endian in "<>" else obj.dtype
            obj.built = True
            return
        raise _Refused(f"a state change (BUILD) of {_describe(obj)}")


def _plain(obj, seen: dict, depth: int = 0):
    """``obj`` with every finished array stub replaced by its array; DataError-worthy leftovers refused."""
    if isinstance(obj, _ArrayStub):
        if obj.array is None:
            raise _Refused("an array that is never given its data")
        return obj.array
    if isinstance(obj, (_Token, _DtypeStub)):
        raise _Refused(f"a bare {'numpy dtype' if isinstance(obj, _DtypeStub) else obj.qualname} object")
    if type(obj) not in (list, tuple, dict):
        return obj
    key = id(obj)
    if key in seen:
        if seen[key] is None:
            raise _Refused("a container that contains itself")
        return seen[key]
    if depth >= MAX_DEPTH:
        raise _Refused(f"containers nested more than {MAX_DEPTH} levels deep")
    seen[key] = None  # in progress: meeting it again below is a cycle
    if type(obj) is list:
        obj[:] = [_plain(v, seen, depth + 1) for v in obj]
        out = obj
    elif type(obj) is dict:
        for k in list(obj):
            obj[k] = _plain(obj[k], seen, depth + 1)
        out = obj
    else:
        out = tuple(_plain(v, seen, depth + 1) for v in obj)
    seen[key] = out
    return out


def loads_plain(data: bytes, *, encoding: str = "bytes") -> Any:
    """Unpickle plain data from ``data`` (see the module docstring); raises ``_Refused``/``_Corrupt``."""
    machine = PickleMachine(data, encoding)
    result = machine.run()
    return _plain(result, {})


def load_pickle(path: str | Path, *, encoding: str = "bytes", hint: str = "", limits: ReadLimits | None = None) -> Any:
    """Unpickle ``path`` (gunzipped first when it starts with the gzip magic) as plain data; anything
    else is a DataError.

    ``encoding`` decodes Python 2 str: "bytes" keeps them as bytes, "latin1" etc. decodes them.
    The file (decompressed) must fit the memory cap, and a gzipped one the expansion rule.
    """
    path = Path(path)
    limits = limits or ReadLimits.resolve()
    data = read_all_bounded(path, limits, "the pickle", fix=hint or "re-download the file")
    try:
        return loads_plain(data, encoding=encoding)
    except _Refused as e:
        raise DataError(f"{path}: pickle holds {e}, {REFUSED}") from None
    except (_Corrupt, ValueError, UnicodeError, struct.error, OverflowError) as e:
        what = str(e) if isinstance(e, _Corrupt) else f"{type(e).__name__}: {str(e)[:200]}"
        raise DataError(f"{path}: cannot unpickle the file ({what}); it is truncated or corrupt"
                        f"{': ' + hint if hint else ''}") from None


__all__ = ["load_pickle", "loads_plain", "MAX_DEPTH"]
