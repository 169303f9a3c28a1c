"""Decide whether a pickle may be loaded without loading it: its opcodes are read (``pickletools.genops``), nothing is
imported or resolved, and every global it names is compared with an exact allowlist of (module, name) pairs.

The walk follows the unpickler's stack and memo as far as it matters for safety: which strings a ``STACK_GLOBAL``
takes as module and name, what a ``REDUCE``, ``NEWOBJ``, ``NEWOBJ_EX`` or ``OBJ`` calls (an allowed global, and
nothing else), and what a ``BUILD``, ``APPEND(S)``, ``SETITEM(S)`` or ``ADDITEMS`` modifies (a container the pickle
built, or an object an allowed global made; never a class or function). Anything it cannot decide statically is
refused: an ``EXT1/2/4`` (the copyreg extension registry), a ``STACK_GLOBAL`` whose operands are not known strings,
a dotted or non-ASCII name that is not listed as it is, a memo slot never written, an unknown opcode, a stack that
runs out. A refused pickle is never handed to an unpickler.

Torch files are read the way ``torch.load`` tells them apart: a zip archive (``PK\\x03\\x04``: every ``*.pkl`` member
is checked, and the archive must name each member once), a tar archive (the oldest format: refused), or the legacy
stream of five pickles followed by raw storage bytes.
"""
from __future__ import annotations

import contextlib
import io
import os
import pickletools
import tarfile
import zipfile
from typing import AbstractSet, Any, BinaryIO, List, Set, Tuple, Union

import torch

Pair = Tuple[str, str]

ZIP_MAGIC = b"PK\x03\x04"
LEGACY_PICKLES = 5  # torch's legacy format: magic number, protocol, sys info, the object, the storage keys


#: torch's dtypes, which pickles name as globals of the ``torch`` module
DTYPE_GLOBALS: frozenset = frozenset(
    ("torch", dtype) for dtype in ("float32", "float64", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2",
                                   "int64", "int32", "int16", "int8", "uint8", "uint16", "uint32", "uint64", "bool",
                                   "complex64", "complex128"))
#: what ``torch.save`` of tensors, parameters and plain containers names (storages by their exact names)
TENSOR_GLOBALS: frozenset = DTYPE_GLOBALS | frozenset(
    [("collections", "OrderedDict"), ("torch", "Size"), ("torch", "Tensor"), ("torch", "device"),
     ("torch.nn.parameter", "Parameter"), ("torch._utils", "_rebuild_tensor_v2"),
     ("torch._utils", "_rebuild_tensor_v3"), ("torch._utils", "_rebuild_parameter"),
     ("torch._tensor", "_rebuild_from_type_v2")]
    + [("torch", f"{kind}Storage") for kind in ("Float", "Double", "Half", "BFloat16", "Long", "Int", "Short",
                                                 "Char", "Byte", "Bool", "ComplexFloat", "ComplexDouble", "Untyped")])


class UnsafePickle(Exception):
    """A pickle that the check refuses; ``str()`` is a short reason (e.g. the first global not allowed)."""


class MalformedPickle(UnsafePickle):
    """Refused because the walk cannot follow it: truncated, not a pickle, or a stack no pickler writes."""


class _Mark:
    pass


MARK = _Mark()


class _Sym:
    """What the walk knows about one stack entry: its kind, and a string's value or a global's (module, name)."""

    __slots__ = ("kind", "value")

    def __init__(self, kind: str, value=None):
        self.kind = kind  # "str", "list", "dict", "set", "global", "instance", "other"
        self.value = value


_OTHER = _Sym("other")
_CONTAINER = {"APPEND": ("list",), "APPENDS": ("list",), "SETITEM": ("dict",), "SETITEMS": ("dict",),
              "ADDITEMS": ("set",)}
_STRINGS = {"STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8"}
_NEW = {"EMPTY_LIST": "list", "LIST": "list", "EMPTY_DICT": "dict", "DICT": "dict", "EMPTY_SET": "set"}


def _pair(arg: str, opname: str) -> Pair:
    """GLOBAL's and INST's operand, which pickletools gives as "module name": a module or name with a space in it
    would make the split ambiguous, so it is refused."""
    parts = arg.split(" ")
    if len(parts) != 2:
        raise UnsafePickle(f"{opname} with an ambiguous name {arg!r}")
    return parts[0], parts[1]


def pickle_globals(stream: Union[bytes, BinaryIO], allowed: AbstractSet[Pair]) -> Set[Pair]:
    """Walk one pickle (up to its STOP) and return the globals it names; raise :class:`UnsafePickle` at the first
    global outside ``allowed`` or the first construct the walk cannot decide. ``stream`` is left after the STOP."""
    if isinstance(stream, (bytes, bytearray, memoryview)):
        stream = io.BytesIO(bytes(stream))
    stack: List[object] = []
    memo: dict = {}
    seen: Set[Pair] = set()

    def check(pair: Pair, how: str) -> _Sym:
        module, name = pair
        if pair not in allowed:
            raise UnsafePickle(f"{module}.{name}" + ("" if how == "GLOBAL" else f" ({how})"))
        seen.add(pair)
        return _Sym("global", pair)

    def pop(n: int = 1) -> List[_Sym]:
        if n > len(stack) or any(x is MARK for x in stack[len(stack) - n:]):
            raise MalformedPickle("a malformed pickle (stack underflow)")
        out = stack[len(stack) - n:]
        del stack[len(stack) - n:]
        return out  # type: ignore[return-value]

    def pop_mark() -> List[_Sym]:
        for i in range(len(stack) - 1, -1, -1):
            if stack[i] is MARK:
                out = stack[i + 1:]
                del stack[i:]
                return out  # type: ignore[return-value]
        raise MalformedPickle("a malformed pickle (no MARK)")

    def called(target: _Sym, opname: str) -> _Sym:
        if target.kind != "global":
            raise UnsafePickle(f"{opname} on something other than an allowed global")
        return _Sym("instance", target.value)

    try:
        for op, arg, _pos in pickletools.genops(stream):
            name = op.name
            if name in _STRINGS:
                stack.append(_Sym("str", arg) if isinstance(arg, str) else _OTHER)
            elif name in _NEW:
                if op.stack_before:
                    pop_mark()
                stack.append(_Sym(_NEW[name]))
            elif name == "GLOBAL":
                stack.append(check(_pair(arg, name), name))
            elif name == "STACK_GLOBAL":
                module, qualname = pop(2)
                if module.kind != "str" or qualname.kind != "str":
                    raise UnsafePickle("STACK_GLOBAL whose module and name are not plain strings in the pickle")
                stack.append(check((module.value, qualname.value), name))
            elif name == "INST":
                cls = check(_pair(arg, name), name)
                pop_mark()
                stack.append(_Sym("instance", cls.value))
            elif name == "OBJ":
                items = pop_mark()
                if not items:
                    raise MalformedPickle("a malformed pickle (OBJ without a class)")
                stack.append(called(items[0], name))
            elif name in ("REDUCE", "NEWOBJ"):
                target, _args = pop(2)
                stack.append(called(target, name))
            elif name == "NEWOBJ_EX":
                target, _args, _kwargs = pop(3)
                stack.append(called(target, name))
            elif name in ("EXT1", "EXT2", "EXT4"):
                raise UnsafePickle(f"{name} (a global from the copyreg extension registry)")
            elif name == "BUILD":
                pop(1)
                if not stack or stack[-1] is MARK or stack[-1].kind != "instance":  # type: ignore[union-attr]
                    raise UnsafePickle("BUILD on something other than an object an allowed global made")
            elif name in _CONTAINER:
                if name.endswith("S"):
                    pop_mark()
                else:
                    pop(2 if name == "SETITEM" else 1)
                if not stack or stack[-1] is MARK or \
                        stack[-1].kind not in (*_CONTAINER[name], "instance"):  # type: ignore[union-attr]
                    raise UnsafePickle(f"{name} on something other than a container")
            elif name == "MARK":
                stack.append(MARK)
            elif name == "POP":
                if stack and stack[-1] is MARK:
                    stack.pop()
                else:
                    pop(1)
            elif name == "POP_MARK":
                pop_mark()
            elif name == "DUP":
                stack.append(pop(1)[0])
                stack.append(stack[-1])
            elif name == "MEMOIZE":
                if not stack or stack[-1] is MARK:
                    raise MalformedPickle("a malformed pickle (MEMOIZE on an empty stack)")
                memo[len(memo)] = stack[-1]
            elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
                if not stack or stack[-1] is MARK:
                    raise MalformedPickle("a malformed pickle (PUT on an empty stack)")
                memo[arg] = stack[-1]
            elif name in ("GET", "BINGET", "LONG_BINGET"):
                if arg not in memo:
                    raise MalformedPickle("a malformed pickle (GET of an empty memo slot)")
                stack.append(memo[arg])
            elif name == "STOP":
                pop(1)
            else:  # every other opcode: pops and pushes plain values as pickletools documents it
                before = op.stack_before
                if pickletools.markobject in before:
                    pop_mark()
                    before = before[:before.index(pickletools.markobject)]
                if before:
                    pop(len(before))
                stack.extend(_OTHER for _ in op.stack_after)
    except UnsafePickle:
        raise
    except Exception as exc:  # pickletools' own complaints: a truncated or malformed stream, an unknown opcode
        raise MalformedPickle(f"not a readable pickle ({type(exc).__name__}: {str(exc)[:80]})") from None
    return seen


def check_torch_file(source: Any, allowed: frozenset = TENSOR_GLOBALS) -> None:
    """Refuse (:class:`UnsafePickle`) a ``torch.save`` file (path, bytes or binary file) that names any global outside
    ``allowed``: swinlab's own opcode walk (:func:`torch_file_globals`), and for zip archives also torch's
    own reader of the archive, so both views of the file are checked."""
    data = source if isinstance(source, (bytes, bytearray)) else None
    torch_file_globals(source, allowed)
    if data is not None:
        source = io.BytesIO(data)
    elif hasattr(source, "seek"):
        source.seek(0)
    with (open(source, "rb") if isinstance(source, (str, os.PathLike)) else contextlib.nullcontext(source)) as f:
        if f.read(4) != b"PK\x03\x04":
            return
        f.seek(0)
        try:
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(f)
        except Exception as exc:
            raise UnsafePickle(f"torch's reader of the archive disagrees ({type(exc).__name__})") from None
    outside = sorted(g for g in unsafe if tuple(g.rsplit(".", 1)) not in allowed)
    if outside:
        raise UnsafePickle(outside[0])


def torch_file_globals(source: Union[str, os.PathLike, bytes, BinaryIO], allowed: AbstractSet[Pair]) -> Set[Pair]:
    """The globals of a ``torch.save`` file (path, bytes or binary file), each checked against ``allowed``; raises
    :class:`UnsafePickle` as :func:`pickle_globals` does, and for a tar archive or an ambiguous zip archive."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _stream_globals(io.BytesIO(bytes(source)), allowed)
    if isinstance(source, (str, os.PathLike)):
        with open(source, "rb") as f:
            return _stream_globals(f, allowed)
    return _stream_globals(source, allowed)


def _stream_globals(f: BinaryIO, allowed: AbstractSet[Pair]) -> Set[Pair]:
    start = f.tell()
    head = f.read(4)
    f.seek(start)
    if head == ZIP_MAGIC:  # torch.load's own test (torch.serialization._is_zipfile)
        return _zip_globals(f, allowed)
    if _is_tar(f):
        raise UnsafePickle("a tar archive (PyTorch's pre-1.0 format, which unpickles without any check)")
    f.seek(start)
    found: Set[Pair] = set()
    for _ in range(LEGACY_PICKLES):
        found |= pickle_globals(f, allowed)
    return found


def _is_tar(f: BinaryIO) -> bool:
    start = f.tell()
    try:
        with tarfile.open(fileobj=f, mode="r:"):
            return True
    except Exception:
        return False
    finally:
        f.seek(start)


def _zip_globals(f: BinaryIO, allowed: AbstractSet[Pair]) -> Set[Pair]:
    try:
        archive = zipfile.ZipFile(f)
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise MalformedPickle(f"not a readable zip archive ({exc})") from None
    with archive:
        names = archive.namelist()
        if len(set(names)) != len(names):
            raise UnsafePickle("a zip archive that names a member twice")
        pickles = [n for n in names if n.endswith(".pkl")]
        if not pickles:
            raise MalformedPickle("a zip archive without data.pkl")
        found: Set[Pair] = set()
        for member in pickles:
            with archive.open(member) as stream:
                found |= pickle_globals(io.BytesIO(stream.read()), allowed)
    return found
