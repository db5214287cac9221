"""Bounded reading and parsing of one manifest file: the parsing boundary.

Everything the manifest source knows about a file's bytes comes through here, and
nothing here can take more than a bounded amount of time or memory, whatever the file
holds:

* the file is opened without blocking (``O_NONBLOCK``: a FIFO with no writer does not
  hang the scan) and must be a regular file by ``fstat`` on the open descriptor (a
  symlink to ``/dev/zero`` or a directory named ``x.yaml`` is refused, not read);
* at most ``MAX_FILE_BYTES`` are read (the API server refuses requests over 3 MiB and
  etcd objects over 1.5 MiB; a Pod manifest is a few KiB);
* YAML goes through PyYAML's safe loader (libyaml's parser, PyYAML's Python composer)
  with budgets enforced while the node graph is composed, before any Python object
  exists: nesting depth; the number of values (``MAX_NODES``: it bounds memory and CPU,
  which the byte size alone does not: 1 MiB of ``0,`` is half a million objects, some
  250 MB); the nodes that aliases expand to ("billion laughs"); documents per file. An
  alias to a node that contains it (a cycle) is refused;
* JSON is decoded by the standard library (its C decoder bounds recursion itself) and
  then held to the same value budget here and depth limit by ``nodeagent.api.shape``.

Every failure is a ``ManifestReadError`` whose message a user can act on; any other
exception from the parsers is converted at this boundary too.
"""

from __future__ import annotations

import errno
import json
import os
import stat

import yaml
from yaml.composer import Composer, ComposerError
from yaml.constructor import SafeConstructor
from yaml.resolver import Resolver
from yaml.events import AliasEvent

MAX_FILE_BYTES = 1024 * 1024
MAX_DOCUMENTS = 100
MAX_DEPTH = 32
# Nodes (scalars, lists, mappings) one file may describe, aliases counted as what they
# expand to. A Pod manifest has a few hundred; 1 MiB of "0," would be half a million,
# about 250 MB of Python objects and half a minute of CPU on a busy 2-core machine.
MAX_NODES = 50_000
# Of those, the nodes aliases may add. A real manifest uses a handful of anchors (a
# shared env list); a billion-laughs document asks for 10^9.
MAX_ALIAS_EXPANSION = 20_000

_FILE_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISSOCK, "a socket"),
)


class ManifestReadError(Exception):
    """The file cannot be read or parsed; the message says why."""


def display_name(path: str | os.PathLike) -> str:
    """The path as text that can always be logged and served (bytes that are not
    UTF-8 appear as ``\\xNN``)."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def file_kind(mode: int) -> str:
    for test, name in _FILE_KINDS:
        if test(mode):
            return name
    return "not a regular file"


def read_manifest_bytes(path: str | os.PathLike, limit: int = MAX_FILE_BYTES) -> bytes:
    """The file's bytes, or ManifestReadError for anything that is not a regular file
    of at most ``limit`` bytes (symlinks are followed, but only to regular files)."""
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        if os.path.islink(path):
            raise ManifestReadError(f"dangling symlink to {display_name(os.readlink(path))}") from None
        raise ManifestReadError("file vanished while being read") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ManifestReadError("too many levels of symbolic links") from None
        raise ManifestReadError(f"cannot open: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            target = " (through a symlink)" if os.path.islink(path) else ""
            raise ManifestReadError(f"not a regular file: it is {file_kind(st.st_mode)}{target}")
        if st.st_size > limit:
            raise ManifestReadError(f"file too large: {st.st_size} bytes, the limit is {limit}")
        chunks = []
        total = 0
        while True:
            chunk = os.read(fd, min(65536, limit + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            if total > limit:  # grew while being read
                raise ManifestReadError(f"file too large: more than {limit} bytes, the limit")
        return b"".join(chunks)
    except OSError as exc:
        raise ManifestReadError(f"cannot read: {exc.strerror}") from None
    finally:
        os.close(fd)


def decode_text(data: bytes) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ManifestReadError(f"not valid UTF-8 at byte {exc.start}") from None


class _BoundedComposer(Composer):
    """PyYAML's composer with depth, alias-expansion and cycle limits, enforced while
    the node graph is built (before any Python object exists). The C composer cannot
    be bounded this way; libyaml's C parser (events only) can be used underneath."""

    def _init_bounds(self) -> None:
        self._depth = 0
        self._count = 0  # nodes composed so far, counting each alias as what it expands to
        self._alias_nodes = 0  # of those, the ones added by aliases
        # id(node) -> nodes it expands to, for every finished node. A node that has an
        # anchor but no entry yet is still being composed: an alias to it is a cycle.
        self._sizes: dict[int, int] = {}
        self._nodes: list[yaml.Node] = []  # keeps the ids in _sizes unique while loading

    def compose_node(self, parent, index):  # type: ignore[override]
        if self.check_event(AliasEvent):
            event = self.peek_event()
            node = self.anchors.get(event.anchor)
            if node is not None:
                size = self._sizes.get(id(node))
                if size is None:
                    raise ComposerError(None, None, f"recursive alias *{event.anchor} refers to a node "
                                        "that contains it", event.start_mark)
                self._count += size
                self._alias_nodes += size
                if self._alias_nodes > MAX_ALIAS_EXPANSION or self._count > MAX_NODES:
                    raise ComposerError(None, None, f"aliases expand to more than {MAX_ALIAS_EXPANSION} "
                                        "nodes (an alias bomb?)", event.start_mark)
            return super().compose_node(parent, index)
        if self._count >= MAX_NODES:
            raise ComposerError(None, None, f"more than {MAX_NODES} values in one file",
                                self.peek_event().start_mark)
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise ComposerError(None, None, f"nesting deeper than {MAX_DEPTH} levels",
                                    self.peek_event().start_mark)
            before = self._count
            result = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        self._count += 1
        self._sizes[id(result)] = self._count - before
        self._nodes.append(result)
        return result


if getattr(yaml, "__with_libyaml__", False):
    from yaml._yaml import CParser

    class BoundedSafeLoader(_BoundedComposer, CParser, SafeConstructor, Resolver):  # type: ignore[misc]
        """libyaml's scanner and parser (about 4x faster), our composer, the safe constructor."""

        def __init__(self, stream: str) -> None:
            CParser.__init__(self, stream)
            SafeConstructor.__init__(self)
            Resolver.__init__(self)
            Composer.__init__(self)
            self._init_bounds()
else:  # pragma: no cover - PyYAML without libyaml
    class BoundedSafeLoader(_BoundedComposer, yaml.SafeLoader):  # type: ignore[no-redef]
        def __init__(self, stream: str) -> None:
            yaml.SafeLoader.__init__(self, stream)
            self._init_bounds()


def _too_many_values(doc: object) -> bool:
    """The YAML node budget, for JSON (decoded already: JSON has no aliases, so its
    memory is bounded by the file size; this keeps what follows bounded too)."""
    count = 0
    stack = [doc]
    while stack:
        value = stack.pop()
        count += 1
        if count > MAX_NODES:
            return True
        if isinstance(value, dict):
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
    return False


def load_documents(text: str, *, json_file: bool) -> list[object]:
    """The non-empty documents of a manifest, or ManifestReadError saying where and why."""
    if json_file:
        try:
            doc = json.loads(text)
            if _too_many_values(doc):
                raise ManifestReadError(f"more than {MAX_NODES} values in one file")
            return [doc]
        except RecursionError:
            raise ManifestReadError(f"not valid JSON: nesting deeper than the parser allows "
                                    f"(the limit is {MAX_DEPTH} levels)") from None
        except ValueError as exc:
            raise ManifestReadError(f"not valid JSON: {exc}") from None
    loader = BoundedSafeLoader(text)
    docs: list[object] = []
    count = 0
    try:
        while loader.check_data():
            count += 1
            if count > MAX_DOCUMENTS:
                raise ManifestReadError(f"more than {MAX_DOCUMENTS} documents in one file")
            doc = loader.get_data()
            if doc is not None:
                docs.append(doc)
    except ManifestReadError:
        raise
    except yaml.YAMLError as exc:
        where = ""
        mark = getattr(exc, "problem_mark", None)
        if mark is not None:
            where = f" at line {mark.line + 1}, column {mark.column + 1}"
        problem = getattr(exc, "problem", None) or str(exc)
        raise ManifestReadError(f"not valid YAML{where}: {problem}") from None
    except RecursionError:
        raise ManifestReadError(f"not valid YAML: nesting too deep (the limit is {MAX_DEPTH} levels)") from None
    except (ValueError, TypeError, OverflowError) as exc:
        # The constructor's own failures (an int of 5,000 digits, a bad timestamp).
        raise ManifestReadError(f"not valid YAML: {exc}") from None
    finally:
        loader.dispose()
    return docs
