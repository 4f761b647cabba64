"""The opcodes of the plain-data pickle reader (:mod:`.safe_pickle`): one small handler per pickle opcode
that plain data needs, the tokens and stubs that stand for the few allowed numpy constructors, and the
two ways a file fails (refused: not plain data; corrupt: truncated or malformed)."""

from __future__ import annotations

import codecs
import pickle
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from .safe_pickle import PickleMachine as Machine

_SCALAR_KEYS = (str, bytes, int, float, bool, type(None))


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


STOP = object()


def _proto(m: "Machine"):
    if m.take(1)[0] > pickle.HIGHEST_PROTOCOL:
        raise _Corrupt("an unknown pickle protocol")


def _dup(m: "Machine"):
    top = m.pop()
    m.stack += [top, top]


def _py2str(nbytes_fmt: str | None):
    def op(m: "Machine"):
        n = m.take(1)[0] if nbytes_fmt is None else m.unpack(nbytes_fmt)
        m.stack.append(m.py2str(bytes(m.take(n))))
    return op


def _bytes(fmt: str, kind=bytes):
    def op(m: "Machine"):
        m.stack.append(kind(m.take(m.unpack(fmt))))
    return op


def _unicode(fmt: str):
    def op(m: "Machine"):
        m.stack.append(bytes(m.take(m.unpack(fmt))).decode("utf-8", "surrogatepass"))
    return op


def _string_nl(m: "Machine"):
    raw = m.line().rstrip()
    if len(raw) < 2 or raw[:1] not in (b"'", b'"') or raw[-1:] != raw[:1]:
        raise _Corrupt("a protocol-0 STRING argument that is not quoted")
    m.stack.append(m.py2str(codecs.escape_decode(raw[1:-1])[0]))


def _int_nl(m: "Machine"):
    raw = m.line()
    m.stack.append({b"00": False, b"01": True}.get(raw) if raw in (b"00", b"01") else int(raw))


def _long_nl(m: "Machine"):
    raw = m.line()
    m.stack.append(int(raw[:-1] if raw.endswith(b"L") else raw))


def _long(fmt: str):
    def op(m: "Machine"):
        n = m.unpack(fmt)
        m.stack.append(int.from_bytes(m.take(n), "little", signed=True))
    return op


def _global_nl(m: "Machine"):
    module, name = m.line().decode("utf-8"), m.line().decode("utf-8")
    m.stack.append(_lookup(module, name))


def _stack_global(m: "Machine"):
    name, module = m.pop(), m.pop()
    if type(module) is not str or type(name) is not str:
        raise _Corrupt("STACK_GLOBAL on something other than two strings")
    m.stack.append(_lookup(module, name))


def _lookup(module: str, name: str) -> _Token:
    kind = _GLOBALS.get((module, name))
    if kind is None:
        raise _Refused(f"{module[:80]}.{name[:80]}")
    return _Token(kind, f"{module}.{name}")


def _reduce(m: "Machine"):
    args, fn = m.pop(), m.pop()
    if not isinstance(fn, _Token) or type(args) is not tuple:
        raise _Refused(f"a call (REDUCE) of {_describe(fn)}")
    m.stack.append(m.construct(fn, args))


def _build(m: "Machine"):
    state = m.pop()
    if not m.stack:
        raise _Corrupt("BUILD with nothing to build")
    m.build(m.stack[-1], state)


def _setitems(m: "Machine", items: list):
    if len(items) % 2:
        raise _Corrupt("SETITEMS with an odd number of items")
    d = m.top(dict, "SETITEM")
    for k, v in zip(items[::2], items[1::2]):
        if type(k) not in _SCALAR_KEYS:
            raise _Refused(f"a dict key of type {_describe(k)}")
        d[k] = v


def _memo_get(key: int, m: "Machine"):
    if key not in m.memo:
        raise _Corrupt(f"memo entry {key} is read before it is written")
    m.stack.append(m.memo[key])


def _memo_put(key: int, m: "Machine"):
    if not m.stack:
        raise _Corrupt("memo PUT on an empty stack")
    m.memo[key] = m.stack[-1]


def _frame(m: "Machine"):
    if m.unpack("<Q") > len(m.data) - m.pos:
        raise _Corrupt("a FRAME longer than the rest of the file")


def _mark(m: "Machine"):
    m.marks.append(m.stack)
    m.stack = []


def _tuple_n(n: int):
    def op(m: "Machine"):
        if len(m.stack) < n:
            raise _Corrupt("a TUPLE opcode pops an empty stack")
        items = m.stack[len(m.stack) - n:]
        del m.stack[len(m.stack) - n:]
        m.stack.append(tuple(items))
    return op


def _push(m: "Machine", obj) -> None:
    """Push ``obj`` (already computed: pop_mark may have replaced ``m.stack``)."""
    m.stack.append(obj)


def _dict(m: "Machine"):
    items = m.pop_mark()
    m.stack.append({})
    _setitems(m, items)


def _appends(m: "Machine"):
    items = m.pop_mark()
    m.top(list, "APPENDS").extend(items)


P = pickle
DISPATCH = {
    P.PROTO: _proto,
    P.FRAME: _frame,
    P.STOP: lambda m: STOP,
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
