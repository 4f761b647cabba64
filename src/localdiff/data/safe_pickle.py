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

import codecs
import pickle
import re
import struct
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError
from .limits import ReadLimits, nbytes_of, read_all_bounded

MAX_DEPTH = 32  # nesting of lists/tuples/dicts (a CIFAR batch needs 2)
MAX_NDIM = 32
MAX_OPS = 1 << 19  # opcodes per file: a CIFAR-10 batch needs about 40,000; bounds memory to ~50 MB of objects
_PLAIN_DTYPE = re.compile(r"[<>|=]?(b1|[iu][1248]|f[248])")
_SCALAR_KEYS = (str, bytes, int, float, bool, type(None))

REFUSED = ("which is not plain array/list/dict/bytes data; refusing to load it (a pickle can run code or "
           "change objects when loaded). Get the file from the original source, or convert the arrays to .npz")


class _Token:
    """An allowed global as the file sees it: a name only the constructors below understand."""

    __slots__ = ("kind", "qualname")

    def __init__(self, kind: str, qualname: str):
        self.kind, self.qualname = kind, qualname


class _ArrayStub:
    """``_reconstruct(ndarray, ...)`` before its BUILD: becomes an array exactly once."""

    __slots__ = ("array",)

    def __init__(self):
        self.array = None


class _DtypeStub:
    """``numpy.dtype(code, ...)`` before its BUILD (which may set the byte order), exactly once."""

    __slots__ = ("dtype", "built")

    def __init__(self, dtype: np.dtype):
        self.dtype, self.built = dtype, False


_GLOBALS = {}
for _mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
    _GLOBALS[(_mod, "_reconstruct")] = "reconstruct"
    _GLOBALS[(_mod, "scalar")] = "scalar"
for _mod in ("numpy.core.numeric", "numpy._core.numeric"):
    _GLOBALS[(_mod, "_frombuffer")] = "frombuffer"
_GLOBALS.update({("numpy", "ndarray"): "ndarray", ("numpy", "dtype"): "dtype", ("_codecs", "encode"): "encode",
                 ("builtins", "bytes"): "bytes", ("__builtin__", "bytes"): "bytes"})


class _Refused(Exception):
    """The file is well-formed but holds something that is not plain data."""


class _Corrupt(Exception):
    """The file is truncated or malformed."""


def _describe(obj: Any) -> str:
    """What an object is, for messages (never its value: it may be huge)."""
    if isinstance(obj, _Token):
        return obj.qualname
    if isinstance(obj, _ArrayStub):
        return "a numpy array"
    if isinstance(obj, _DtypeStub):
        return "a numpy dtype"
    return type(obj).__name__


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


class _Machine:
    """The stack machine: ``run()`` returns the unpickled object."""

    def __init__(self, data: bytes, encoding: str):
        self.raw, self.data, self.pos, self.encoding = data, memoryview(data), 0, encoding
        self.stack: list = []
        self.marks: list[list] = []
        self.memo: dict[int, Any] = {}
        self.array_bytes = 0
        self.buffers: dict[int, Any] = {}  # raw data already behind an array (kept alive: ids stay unique)
        self.ops = {op[0]: fn for op, fn in _DISPATCH.items()}

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
            if fn(self) is _STOP:
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


_STOP = object()


def _proto(m: _Machine):
    if m.take(1)[0] > pickle.HIGHEST_PROTOCOL:
        raise _Corrupt("an unknown pickle protocol")


def _dup(m: _Machine):
    top = m.pop()
    m.stack += [top, top]


def _py2str(nbytes_fmt: str | None):
    def op(m: _Machine):
        n = m.take(1)[0] if nbytes_fmt is None else m.unpack(nbytes_fmt)
        m.stack.append(m.py2str(bytes(m.take(n))))
    return op


def _bytes(fmt: str, kind=bytes):
    def op(m: _Machine):
        m.stack.append(kind(m.take(m.unpack(fmt))))
    return op


def _unicode(fmt: str):
    def op(m: _Machine):
        m.stack.append(bytes(m.take(m.unpack(fmt))).decode("utf-8", "surrogatepass"))
    return op


def _string_nl(m: _Machine):
    raw = m.line().rstrip()
    if len(raw) < 2 or raw[:1] not in (b"'", b'"') or raw[-1:] != raw[:1]:
        raise _Corrupt("a protocol-0 STRING argument that is not quoted")
    m.stack.append(m.py2str(codecs.escape_decode(raw[1:-1])[0]))


def _int_nl(m: _Machine):
    raw = m.line()
    m.stack.append({b"00": False, b"01": True}.get(raw) if raw in (b"00", b"01") else int(raw))


def _long_nl(m: _Machine):
    raw = m.line()
    m.stack.append(int(raw[:-1] if raw.endswith(b"L") else raw))


def _long(fmt: str):
    def op(m: _Machine):
        n = m.unpack(fmt)
        m.stack.append(int.from_bytes(m.take(n), "little", signed=True))
    return op


def _global_nl(m: _Machine):
    module, name = m.line().decode("utf-8"), m.line().decode("utf-8")
    m.stack.append(_lookup(module, name))


def _stack_global(m: _Machine):
    name, module = m.pop(), m.pop()
    if type(module) is not str or type(name) is not str:
        raise _Corrupt("STACK_GLOBAL on something other than two strings")
    m.stack.append(_lookup(module, name))


def _lookup(module: str, name: str) -> _Token:
    kind = _GLOBALS.get((module, name))
    if kind is None:
        raise _Refused(f"{module[:80]}.{name[:80]}")
    return _Token(kind, f"{module}.{name}")


def _reduce(m: _Machine):
    args, fn = m.pop(), m.pop()
    if not isinstance(fn, _Token) or type(args) is not tuple:
        raise _Refused(f"a call (REDUCE) of {_describe(fn)}")
    m.stack.append(m.construct(fn, args))


def _build(m: _Machine):
    state = m.pop()
    if not m.stack:
        raise _Corrupt("BUILD with nothing to build")
    m.build(m.stack[-1], state)


def _setitems(m: _Machine, items: list):
    if len(items) % 2:
        raise _Corrupt("SETITEMS with an odd number of items")
    d = m.top(dict, "SETITEM")
    for k, v in zip(items[::2], items[1::2]):
        if type(k) not in _SCALAR_KEYS:
            raise _Refused(f"a dict key of type {_describe(k)}")
        d[k] = v


def _memo_get(key: int, m: _Machine):
    if key not in m.memo:
        raise _Corrupt(f"memo entry {key} is read before it is written")
    m.stack.append(m.memo[key])


def _memo_put(key: int, m: _Machine):
    if not m.stack:
        raise _Corrupt("memo PUT on an empty stack")
    m.memo[key] = m.stack[-1]


def _frame(m: _Machine):
    if m.unpack("<Q") > len(m.data) - m.pos:
        raise _Corrupt("a FRAME longer than the rest of the file")


def _mark(m: _Machine):
    m.marks.append(m.stack)
    m.stack = []


def _tuple_n(n: int):
    def op(m: _Machine):
        if len(m.stack) < n:
            raise _Corrupt("a TUPLE opcode pops an empty stack")
        items = m.stack[len(m.stack) - n:]
        del m.stack[len(m.stack) - n:]
        m.stack.append(tuple(items))
    return op


def _push(m: _Machine, obj) -> None:
    """Push ``obj`` (already computed: pop_mark may have replaced ``m.stack``)."""
    m.stack.append(obj)


def _dict(m: _Machine):
    items = m.pop_mark()
    m.stack.append({})
    _setitems(m, items)


def _appends(m: _Machine):
    items = m.pop_mark()
    m.top(list, "APPENDS").extend(items)


P = pickle
_DISPATCH = {
    P.PROTO: _proto,
    P.FRAME: _frame,
    P.STOP: lambda m: _STOP,
    P.MARK: _mark,
    P.POP: lambda m: m.pop(),
    P.POP_MARK: lambda m: m.pop_mark(),
    P.DUP: _dup,
    P.PUT: lambda m: _memo_put(int(m.line()), m),
    P.BINPUT: lambda m: _memo_put(m.take(1)[0], m),
    P.LONG_BINPUT: lambda m: _memo_put(m.unpack("<I"), m),
    P.MEMOIZE: lambda m: _memo_put(len(m.memo), m),
    P.GET: lambda m: _memo_get(int(m.line()), m),
    P.BINGET: lambda m: _memo_get(m.take(1)[0], m),
    P.LONG_BINGET: lambda m: _memo_get(m.unpack("<I"), m),
    P.NONE: lambda m: m.stack.append(None),
    P.NEWTRUE: lambda m: m.stack.append(True),
    P.NEWFALSE: lambda m: m.stack.append(False),
    P.INT: _int_nl,
    P.BININT: lambda m: m.stack.append(m.unpack("<i")),
    P.BININT1: lambda m: m.stack.append(m.take(1)[0]),
    P.BININT2: lambda m: m.stack.append(m.unpack("<H")),
    P.LONG: _long_nl,
    P.LONG1: _long("<B"),
    P.LONG4: _long("<i"),
    P.FLOAT: lambda m: m.stack.append(float(m.line())),
    P.BINFLOAT: lambda m: m.stack.append(m.unpack(">d")),
    P.STRING: _string_nl,
    P.BINSTRING: _py2str("<i"),
    P.SHORT_BINSTRING: _py2str(None),
    P.BINBYTES: _bytes("<I"),
    P.SHORT_BINBYTES: _bytes("<B"),
    P.BINBYTES8: _bytes("<Q"),
    P.BYTEARRAY8: _bytes("<Q", bytearray),
    P.UNICODE: lambda m: m.stack.append(m.line().decode("raw-unicode-escape")),
    P.BINUNICODE: _unicode("<I"),
    P.SHORT_BINUNICODE: _unicode("<B"),
    P.BINUNICODE8: _unicode("<Q"),
    P.EMPTY_LIST: lambda m: m.stack.append([]),
    P.APPEND: lambda m: (lambda v: m.top(list, "APPEND").append(v))(m.pop()),
    P.APPENDS: _appends,
    P.LIST: lambda m: _push(m, m.pop_mark()),
    P.EMPTY_TUPLE: lambda m: m.stack.append(()),
    P.TUPLE: lambda m: _push(m, tuple(m.pop_mark())),
    P.TUPLE1: _tuple_n(1),
    P.TUPLE2: _tuple_n(2),
    P.TUPLE3: _tuple_n(3),
    P.EMPTY_DICT: lambda m: m.stack.append({}),
    P.DICT: _dict,
    P.SETITEM: lambda m: (lambda v, k: _setitems(m, [k, v]))(m.pop(), m.pop()),
    P.SETITEMS: lambda m: _setitems(m, m.pop_mark()),
    P.GLOBAL: _global_nl,
    P.STACK_GLOBAL: _stack_global,
    P.REDUCE: _reduce,
    P.BUILD: _build,
}


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
    machine = _Machine(data, encoding)
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
