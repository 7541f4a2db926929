"""Protocol layer shared by the dispynode daemon and its job workers.

This module speaks the dispy 4.5 wire protocol and imports only the standard
library.  It holds:

* framing: every TCP message is a 4-byte big-endian length and a payload,
  usually ``b'TAG:' + pickle``;
* authentication: ``sha1(secret + sign)`` as 40 ASCII hex bytes;
* the wire records, which legacy clients pickle as ``dispy._Compute``,
  ``dispy._XferFile``, ``dispy._DispyJob_``, ``dispy._JobReply`` and
  ``dispy._Function``.  :func:`dumps` writes our records under those legacy
  paths and never exceeds pickle protocol 4 (what Python 3.6 can read);
* two restricted loaders: :func:`loads_plain` for anything from a peer that
  has not authenticated (plain data only, no class at all), and
  :func:`loads_records` for authenticated requests (plain data, our records,
  ``os.stat_result``; any other class becomes an inert :class:`Opaque`, so
  nothing user-defined is imported or run in the node process);
* TLS contexts for the shared-certificate model of dispy 4.5.

Pickle data flow::

    legacy client --JOB: pickle--> node: loads_records (args stay bytes)
    node --plain tuple--> worker --fork--> job: full pickle.loads of args
    job: dumps(_JobReply) --bytes--> worker --> node --JOB_REPLY: bytes--> client

The node forwards the job's reply bytes untouched, so user classes never need
to exist in the node.
"""

import collections
import copyreg
import io
import os
import pickle
import re
import socket
import struct
import sys
import time

# hashlib and hmac load OpenSSL's libcrypto, and ssl loads libssl: several
# MB of resident memory in the node and in every worker it forks jobs from.
# The builtin SHA-1 and constant-time comparison need neither; ssl is
# imported only when TLS is configured.
try:
    from _sha1 import sha1 as _sha1
except ImportError:  # an interpreter without the builtin module
    from hashlib import sha1 as _sha1
try:
    from _sha256 import sha256 as _sha256
except ImportError:  # an interpreter without the builtin module
    from hashlib import sha256 as _sha256
try:
    from _operator import _compare_digest as compare_digest
except ImportError:
    from hmac import compare_digest

__all__ = [
    'PROTOCOL_VERSION', 'PICKLE_PROTOCOL', 'MAX_FRAME', 'ProtocolError',
    'DispyJob', 'Compute', 'XferFile', 'DispyJobRecord', 'JobReply', 'Function',
    'Opaque', 'dumps', 'dumps_plain', 'loads_plain', 'loads_records',
    'loads_full', 'loads_unauth', 'auth_code', 'new_sign', 'is_node_sign',
    'valid_peer_sign', 'auth_matches', 'send_msg',
    'recv_exact', 'recv_msg', 'split_tag', 'server_tls_context', 'compare_digest',
    'client_tls_context', 'parse_size', 'connect',
]

# ---------------------------------------------------------------- constants

#: Both sides refuse a peer whose 'version' is not exactly this string.
PROTOCOL_VERSION = '4.5'
#: Python 3.6 (the legacy clients) cannot read pickle protocol 5.
PICKLE_PROTOCOL = 4
#: Largest frame accepted from a peer; the length is checked before any
#: buffer is allocated.  Job arguments travel inside JOB frames, so this is
#: generous, yet far below the 4 GB the length field allows.
MAX_FRAME = int(os.environ.get('DISPYNODE_MAX_FRAME', 256 * 1024 * 1024))
AUTH_LEN = 40
_LEN = struct.Struct('>L')
_GROW = 1024 * 1024


class ProtocolError(Exception):
    """A peer broke the framing or sent data we refuse to decode."""


class DispyJob:
    """Job status codes, as in ``dispy.DispyJob``."""
    Created = 5
    Running = 6
    ProvisionalResult = 7
    Cancelled = 8
    Terminated = 9
    Abandoned = 10
    Finished = 11


# ---------------------------------------------------------------- wire records
# Each record keeps its legacy class name in ``_legacy_name``; dumps() writes
# it as ``dispy.<name>`` and the loaders map ``dispy.<name>`` back here.

class _Record:
    _legacy_name = None
    _fields = ()

    def __init__(self, **fields):
        for name in self._fields:
            setattr(self, name, fields.get(name))

    def __setstate__(self, state):
        # Legacy records pickle a plain dict of attributes.
        if isinstance(state, tuple) and len(state) == 2:
            state = dict(state[0] or {}, **(state[1] or {}))
        if not isinstance(state, dict):
            raise ProtocolError('bad %s state' % self._legacy_name)
        for name in self._fields:
            setattr(self, name, None)
        self.__dict__.update(state)

    def __reduce_ex__(self, protocol):
        # NEWOBJ + dict state, exactly like the legacy client's own pickles.
        return (copyreg.__newobj__, (type(self),), dict(self.__dict__))

    def __repr__(self):
        return '<%s %s>' % (self._legacy_name,
                            ' '.join('%s=%r' % (f, getattr(self, f, None))
                                     for f in self._fields[:3]))


class Compute(_Record):
    """``dispy._Compute``: a computation sent with COMPUTE."""
    _legacy_name = '_Compute'
    _fields = ('type', 'name', 'id', 'code', 'dest_path', 'xfer_files',
               'reentrant', 'setup', 'cleanup', 'scheduler_ip_addr',
               'scheduler_port', 'auth', 'job_result_port', 'pulse_interval')
    func_type = 1
    prog_type = 2


class XferFile(_Record):
    """``dispy._XferFile``: a file announced before its bytes are streamed."""
    _legacy_name = '_XferFile'
    _fields = ('name', 'stat_buf', 'compute_id', 'sep')


class DispyJobRecord(_Record):
    """``dispy._DispyJob_``: one job; ``args``/``kwargs`` are pickle bytes."""
    _legacy_name = '_DispyJob_'
    _fields = ('uid', 'hash', 'compute_id', 'args', 'kwargs', 'xfer_files', 'code')


class JobReply(_Record):
    """``dispy._JobReply``: what a job sends back."""
    _legacy_name = '_JobReply'
    _fields = ('uid', 'hash', 'ip_addr', 'status', 'result', 'stdout',
               'stderr', 'exception', 'start_time', 'end_time')


Function = collections.namedtuple('_Function', ['name', 'args', 'kwargs'])
Function._legacy_name = '_Function'


class Opaque:
    """Stands in for any class an authenticated record refers to but the
    node must not import (for example a user object among setup arguments).
    It accepts construction and state and does nothing with them."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass

    def __reduce__(self):
        raise pickle.PicklingError('an opaque placeholder cannot be re-pickled')


_RECORDS = {cls._legacy_name: cls
            for cls in (Compute, XferFile, DispyJobRecord, JobReply, Function)}
_RECORD_TYPES = frozenset(_RECORDS.values())


# ---------------------------------------------------------------- pickling

class _LegacyPickler(pickle._Pickler):
    """Writes our record classes as ``dispy.<name>`` globals.

    The C pickler insists that a global can be imported under the name it
    is written as; this node has no ``dispy`` package, so the pure-Python
    pickler is subclassed to write those few references itself.
    """

    def save_global(self, obj, name=None):
        legacy = obj in _RECORD_TYPES and obj._legacy_name
        if not legacy:
            return super().save_global(obj, name)
        self.save('dispy')
        self.save(legacy)
        self.write(pickle.STACK_GLOBAL)
        self.memoize(obj)


def _record_header(cls):
    # PROTO 4; 'dispy' '<name>' STACK_GLOBAL; () NEWOBJ  -> an empty record
    name = cls._legacy_name.encode()
    return (b'\x80\x04\x8c\x05dispy\x8c' + bytes([len(name)]) + name
            + pickle.STACK_GLOBAL + pickle.EMPTY_TUPLE + pickle.NEWOBJ)


# Only records whose state never holds another record: the C pickler would
# write a nested record's class under this module's name.
_RECORD_HEADERS = {cls: _record_header(cls) for cls in (JobReply, XferFile)}


def dumps(obj, pickler=None):
    """Pickle ``obj`` for a legacy peer: protocol 4, records as ``dispy.*``.
    ``pickler``: a pickle.Pickler subclass for a reply or file record's
    state (a job's reply with names rewritten for the client).

    A reply or file record (the hot path: they hold no other records)
    takes a fast path:
    our own few opcodes for the record, then its state dict pickled by the
    C pickler, with that pickle's STOP turned into BUILD.  The byte count is
    unchanged, so any frame the C pickler opened stays exact.  Anything
    else goes through the pure-Python pickler subclass."""
    header = _RECORD_HEADERS.get(type(obj))
    if header is not None:
        if pickler is None:
            state = pickle.dumps(dict(obj.__dict__), PICKLE_PROTOCOL)
        else:
            buf = io.BytesIO()
            pickler(buf, PICKLE_PROTOCOL).dump(dict(obj.__dict__))
            state = buf.getvalue()
        return header + state[2:-1] + pickle.BUILD + pickle.STOP
    buf = io.BytesIO()
    _LegacyPickler(buf, PICKLE_PROTOCOL).dump(obj)
    return buf.getvalue()


def dumps_plain(obj):
    """Pickle plain data (no records) with the fast C pickler."""
    return pickle.dumps(obj, PICKLE_PROTOCOL)


class _PlainUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        raise ProtocolError('refused class %s.%s in unauthenticated data'
                            % (module, name))


_SAFE_GLOBALS = {
    ('os', 'stat_result'), ('posix', 'stat_result'), ('nt', 'stat_result'),
    ('builtins', 'set'), ('builtins', 'frozenset'), ('builtins', 'complex'),
    ('builtins', 'slice'), ('builtins', 'range'), ('collections', 'OrderedDict'),
}


def _bytearray_from_data(data=b'', *encoding):
    """bytearray for the record loader: only from data that arrived, never
    ``bytearray(10**10)`` (a size the node would have to allocate)."""
    if not isinstance(data, (bytes, str)):
        raise ProtocolError('refused bytearray(%s)' % type(data).__name__)
    return bytearray(data, *encoding)


class _RecordUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if module == 'dispy' and name in _RECORDS:
            return _RECORDS[name]
        if (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        if (module, name) == ('builtins', 'bytearray'):
            return _bytearray_from_data
        return Opaque


class _FullUnpickler(pickle.Unpickler):
    """Used only in job processes: everything loads, records map to ours,
    and classes the client defined in its ``__main__`` resolve in the
    namespace the computation's code was run in."""

    def __init__(self, data, namespace=None):
        super().__init__(io.BytesIO(data))
        self._namespace = namespace

    def find_class(self, module, name):
        if module == 'dispy' and name in _RECORDS:
            return _RECORDS[name]
        if module in ('__main__', '__mp_main__') and self._namespace is not None \
                and name in self._namespace:
            return self._namespace[name]
        return super().find_class(module, name)


def _checked_load(unpickler_cls, data):
    try:
        return unpickler_cls(io.BytesIO(data)).load()
    except ProtocolError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError,
            IndexError, AttributeError, ImportError, struct.error,
            UnicodeDecodeError, OverflowError, MemoryError, RecursionError) as exc:
        raise ProtocolError('undecodable pickle: %s: %s'
                            % (type(exc).__name__, exc)) from None


def loads_plain(data):
    """Decode data from an unauthenticated peer: dict, list, tuple, str,
    bytes, int, float, bool and None only.  Raises ProtocolError."""
    return _checked_load(_PlainUnpickler, data)


# A decoder for data from peers that have not authenticated (UDP PING and
# PULSE, TCP PING).  It interprets the binary pickle opcodes that plain data
# needs, in one pass, so its cost is linear in the input whatever the bytes:
# - dict keys must be str (a tuple key built through the memo, A_k =
#   (A_k-1, A_k-1), hashes in 2**k steps: the "hash bomb");
# - the memo may hand back only scalars, so containers cannot be shared
#   and the result is a tree no larger than the input;
# - ints are at most 16 bytes long, nesting at most UNAUTH_DEPTH deep.

UNAUTH_MAX_BYTES = 65536
UNAUTH_DEPTH = 8
_SCALARS = (str, bytes, int, float, bool, type(None))
_MARK = object()


class _Unauth:
    __slots__ = ('data', 'pos', 'stack', 'memo')

    def __init__(self, data):
        self.data, self.pos, self.stack, self.memo = data, 0, [], {}

    def take(self, count):
        end = self.pos + count
        if count < 0 or end > len(self.data):
            raise ProtocolError('truncated pickle')
        chunk, self.pos = self.data[self.pos:end], end
        return chunk

    def number(self, fmt):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def pop_mark(self):
        for index in range(len(self.stack) - 1, -1, -1):
            if self.stack[index] is _MARK:
                items = self.stack[index + 1:]
                del self.stack[index:]
                return items
        raise ProtocolError('no mark in pickle')

    def top(self, kind):
        if not self.stack or not isinstance(self.stack[-1], kind):
            raise ProtocolError('bad pickle structure')
        return self.stack[-1]

    def set_items(self, items):
        if len(items) % 2:
            raise ProtocolError('odd number of dict items')
        target = self.top(dict)
        for key, value in zip(items[::2], items[1::2]):
            if not isinstance(key, str):
                raise ProtocolError('dict key of type %s refused' % type(key).__name__)
            target[key] = value

    def memo_get(self, index):
        if index not in self.memo:
            raise ProtocolError('memo key %d missing' % index)
        value = self.memo[index]
        if not isinstance(value, _SCALARS):
            raise ProtocolError('shared container refused')
        self.stack.append(value)

    def memo_put(self, index):
        if not self.stack or self.stack[-1] is _MARK:
            raise ProtocolError('nothing to memoize')
        self.memo[index] = self.stack[-1]

    def text(self, length_fmt):
        try:
            return str(self.take(self.number(length_fmt)), 'utf-8', 'surrogatepass')
        except UnicodeDecodeError:
            raise ProtocolError('bad utf-8 in pickle') from None

    def tuple_of(self, count):
        if len(self.stack) < count or _MARK in self.stack[len(self.stack) - count:]:
            raise ProtocolError('bad tuple')
        items = tuple(self.stack[len(self.stack) - count:])
        del self.stack[len(self.stack) - count:]
        self.stack.append(items)

    def long1(self):
        size = self.take(1)[0]
        if size > 16:
            raise ProtocolError('integer of %d bytes refused' % size)
        self.stack.append(int.from_bytes(self.take(size), 'little', signed=True))

    def run(self):
        ops = _UNAUTH_OPS
        while True:
            code = self.take(1)[0]
            if code == 0x2e:                                  # STOP
                if len(self.stack) != 1 or self.stack[0] is _MARK:
                    raise ProtocolError('bad pickle stack at STOP')
                return self.stack[0]
            handler = ops.get(code)
            if handler is None:
                raise ProtocolError('pickle opcode 0x%02x refused' % code)
            handler(self)


def _op_append(u):
    if len(u.stack) < 2 or u.stack[-1] is _MARK:
        raise ProtocolError('bad append')
    value = u.stack.pop()
    u.top(list).append(value)


def _op_appends(u):
    items = u.pop_mark()
    u.top(list).extend(items)


def _op_setitem(u):
    if len(u.stack) < 3 or _MARK in u.stack[-2:]:
        raise ProtocolError('bad setitem')
    value, key = u.stack.pop(), u.stack.pop()
    u.set_items([key, value])


_UNAUTH_OPS = {
    0x80: lambda u: u.take(1),                                # PROTO
    0x95: lambda u: u.take(8),                                # FRAME
    0x28: lambda u: u.stack.append(_MARK),                    # MARK
    0x7d: lambda u: u.stack.append({}),                       # EMPTY_DICT
    0x5d: lambda u: u.stack.append([]),                       # EMPTY_LIST
    0x29: lambda u: u.stack.append(()),                       # EMPTY_TUPLE
    0x73: _op_setitem,                                        # SETITEM
    0x75: lambda u: u.set_items(u.pop_mark()),                # SETITEMS
    0x61: _op_append,                                         # APPEND
    0x65: _op_appends,                                        # APPENDS
    0x74: lambda u: u.stack.append(tuple(u.pop_mark())),      # TUPLE
    0x85: lambda u: u.tuple_of(1),                            # TUPLE1
    0x86: lambda u: u.tuple_of(2),                            # TUPLE2
    0x87: lambda u: u.tuple_of(3),                            # TUPLE3
    0x4e: lambda u: u.stack.append(None),                     # NONE
    0x88: lambda u: u.stack.append(True),                     # NEWTRUE
    0x89: lambda u: u.stack.append(False),                    # NEWFALSE
    0x4a: lambda u: u.stack.append(u.number('<i')),           # BININT
    0x4b: lambda u: u.stack.append(u.take(1)[0]),             # BININT1
    0x4d: lambda u: u.stack.append(u.number('<H')),           # BININT2
    0x8a: _Unauth.long1,                                      # LONG1
    0x47: lambda u: u.stack.append(u.number('>d')),           # BINFLOAT
    0x8c: lambda u: u.stack.append(u.text('<B')),             # SHORT_BINUNICODE
    0x58: lambda u: u.stack.append(u.text('<I')),             # BINUNICODE
    0x8d: lambda u: u.stack.append(u.text('<Q')),             # BINUNICODE8
    0x43: lambda u: u.stack.append(bytes(u.take(u.number('<B')))),  # SHORT_BINBYTES
    0x42: lambda u: u.stack.append(bytes(u.take(u.number('<I')))),  # BINBYTES
    0x94: lambda u: u.memo_put(len(u.memo)),                  # MEMOIZE
    0x71: lambda u: u.memo_put(u.number('<B')),               # BINPUT
    0x72: lambda u: u.memo_put(u.number('<I')),               # LONG_BINPUT
    0x68: lambda u: u.memo_get(u.number('<B')),               # BINGET
    0x6a: lambda u: u.memo_get(u.number('<I')),               # LONG_BINGET
}


def _check_depth(obj):
    todo = [(obj, 0)]
    while todo:
        item, depth = todo.pop()
        if isinstance(item, (list, tuple, dict)):
            if depth >= UNAUTH_DEPTH:
                raise ProtocolError('nesting deeper than %d refused' % UNAUTH_DEPTH)
            values = item.values() if isinstance(item, dict) else item
            todo.extend((value, depth + 1) for value in values)


def loads_unauth(data):
    """Decode plain data from a peer that has not authenticated, in time
    and memory linear in ``len(data)`` (at most UNAUTH_MAX_BYTES): dicts
    with str keys, lists, tuples, str, bytes, small ints, floats, bools and
    None.  Anything else raises ProtocolError."""
    if len(data) > UNAUTH_MAX_BYTES:
        raise ProtocolError('%d bytes of unauthenticated data refused' % len(data))
    obj = _Unauth(memoryview(data)).run()
    _check_depth(obj)
    return obj


def loads_records(data):
    """Decode an authenticated request: plain data and our records."""
    return _checked_load(_RecordUnpickler, data)


def loads_full(data, namespace=None):
    """Unrestricted load, for job processes only."""
    return _FullUnpickler(data, namespace).load()


# ---------------------------------------------------------------- auth

def auth_code(secret, sign):
    """The 40-byte token a client sends first: sha1 of secret + sign."""
    return _sha1((secret + sign).encode('utf-8')).hexdigest().encode('ascii')


def _hmac_sha256(key, message):
    """RFC 2104 HMAC-SHA256 on the builtin hash (hmac would load OpenSSL)."""
    block = 64
    key = key.encode('utf-8') if isinstance(key, str) else key
    if len(key) > block:
        key = _sha256(key).digest()
    key = key.ljust(block, b'\0')
    inner = _sha256(bytes(b ^ 0x36 for b in key) + message).digest()
    return _sha256(bytes(b ^ 0x5c for b in key) + inner).hexdigest()


_NONCE_HEX = 8          # a node sign: 8 hex of nonce + 12 hex of tag = 20 hex,
_TAG_HEX = 12           # the length and alphabet of a legacy client's sign


def _sign_tag(secret, nonce):
    return _hmac_sha256(secret, b'dispynode-sign:' + nonce.encode('ascii'))[:_TAG_HEX]


def new_sign(secret=''):
    """A node's signature, new at every start: 20 hex characters like a
    legacy sign, but self-authenticating: a random nonce and a tag keyed by
    the secret.  Any node holding the secret recognises a node's sign
    (:func:`is_node_sign`) and never answers a PING naming one, because
    ``auth_code(secret, node_sign)`` is that node's request token."""
    nonce = os.urandom(_NONCE_HEX // 2).hex()
    return nonce + _sign_tag(secret, nonce)


def is_node_sign(secret, sign):
    """True if ``sign`` was made by :func:`new_sign` with ``secret``."""
    if not isinstance(sign, str) or len(sign) != _NONCE_HEX + _TAG_HEX:
        return False
    nonce, tag = sign[:_NONCE_HEX], sign[_NONCE_HEX:]
    try:
        expected = _sign_tag(secret, nonce)
    except UnicodeEncodeError:
        return False
    return compare_digest(tag.encode('ascii', 'replace'), expected.encode('ascii'))


_SIGN_CHARS = frozenset('0123456789abcdefABCDEF')


def valid_peer_sign(sign):
    """A client's or scheduler's sign as dispy 4.5 makes it: 10 to 20 hex
    characters (``hex(byte)[2:]`` of 10 random bytes).  Empty, long or
    other signs are refused: an empty one would make the PONG carry
    ``sha1(secret)`` itself."""
    return (isinstance(sign, str) and 8 <= len(sign) <= 64
            and all(c in _SIGN_CHARS for c in sign))


def auth_matches(received, expected):
    return len(received) == len(expected) and compare_digest(received, expected)


# ---------------------------------------------------------------- framing

def recv_exact(sock, size, deadline=None):
    """Read exactly ``size`` bytes or raise ProtocolError.  With a
    ``deadline`` (time.monotonic() value) the whole read must finish by
    then, so a peer trickling one byte at a time is still dropped."""
    # Memory grows with what actually arrives, never with what a peer claims.
    parts, got = [], 0
    while got < size:
        block = bytearray(min(size - got, _GROW))
        _fill(sock, block, deadline, got, size)
        parts.append(block)
        got += len(block)
    return bytes(parts[0]) if len(parts) == 1 else b''.join(parts)


def _fill(sock, block, deadline, before, size):
    view = memoryview(block)
    got = 0
    while got < len(block):
        if deadline is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ProtocolError('timed out after %d of %d bytes' % (before + got, size))
            sock.settimeout(remaining)
        try:
            n = sock.recv_into(view[got:])
        except socket.timeout:
            raise ProtocolError('timed out after %d of %d bytes'
                                % (before + got, size)) from None
        if not n:
            raise ProtocolError('connection closed after %d of %d bytes'
                                % (before + got, size))
        got += n


def send_msg(sock, data):
    """Write one length-prefixed frame (one syscall for small plain frames).

    Over TLS the length goes in a record of its own: asyncoro (the legacy
    client) reads the 4 length bytes, then waits for the socket to become
    readable, which never happens if the body already sits in OpenSSL's
    buffer from the same record."""
    header = _LEN.pack(len(data))
    ssl = sys.modules.get('ssl')   # no ssl module loaded: no TLS socket either
    if len(data) < 65536 and not (ssl and isinstance(sock, ssl.SSLSocket)):
        sock.sendall(header + data)
    else:
        sock.sendall(header)
        sock.sendall(data)


def recv_msg(sock, max_len=None, deadline=None):
    """Read one length-prefixed frame; refuse lengths above ``max_len``
    (default MAX_FRAME) before allocating anything for them."""
    limit = MAX_FRAME if max_len is None else max_len
    (size,) = _LEN.unpack(recv_exact(sock, 4, deadline))
    if size > limit:
        raise ProtocolError('frame of %d bytes exceeds the limit of %d' % (size, limit))
    return recv_exact(sock, size, deadline) if size else b''


def split_tag(msg):
    """``b'JOB:payload'`` -> ``(b'JOB', b'payload')``; untagged -> (None, msg)."""
    head, sep, rest = msg[:32].partition(b':')
    if not sep or not head.replace(b'_', b'').isalpha():
        return None, msg
    return head, msg[len(head) + 1:]


# ---------------------------------------------------------------- TLS
# Legacy clients (asyncoro 4.3.4) break on TLS 1.3 post-handshake tickets,
# so the node caps at TLS 1.2, and is otherwise as strict as it can be:
# forward-secret AEAD ciphers only, no compression, no renegotiation.

_TLS12_CIPHERS = 'ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:!aNULL:!MD5:!DSS'


def _harden(ctx):
    import ssl
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(_TLS12_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION
    ctx.options |= getattr(ssl, 'OP_NO_RENEGOTIATION', 0)
    return ctx


def server_tls_context(certfile, keyfile=None):
    """Context for the node's TCP server (clients present no certificate)."""
    import ssl
    ctx = _harden(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    ctx.load_cert_chain(certfile, keyfile)
    return ctx


def client_tls_context(certfile):
    """Context for connections the node makes to clients: the peer must
    present the shared certificate; there is no host name check."""
    import ssl
    ctx = _harden(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(certfile)
    return ctx


# ---------------------------------------------------------------- small helpers

_SIZE_UNITS = {'': 1, 'k': 1024, 'm': 1024 ** 2, 'g': 1024 ** 3, 't': 1024 ** 4}


# A whole number, an optional unit and an optional B (or iB after a unit), in
# any case: every spelling the 4.5.5 node read correctly ('10m', '10MB',
# '1KB', '512b').  What it silently misread ('10x' or '10 MB' as 10 bytes,
# '1.5m' as 1) is refused.
_SIZE_RE = re.compile(r'^([0-9]+)(?:([kmgt])(?:i?b)?|b)?$')


def parse_size(text):
    """'10m' -> 10485760; '0' means no limit.  Raises ValueError."""
    text = str(text).strip().lower()
    match = _SIZE_RE.match(text)
    if not match:
        raise ValueError('invalid size %r: use a whole number with an optional '
                         'k, m, g or t suffix (and an optional B, e.g. 10MB)' % text)
    return int(match.group(1)) * _SIZE_UNITS[match.group(2) or '']


def connect(addr, timeout, tls_context=None):
    """Open a TCP connection (TLS-wrapped if a context is given)."""
    sock = socket.create_connection(addr, timeout=timeout)
    if tls_context is None:
        return sock
    try:
        return tls_context.wrap_socket(sock)
    except OSError:  # ssl.SSLError included
        sock.close()
        raise
