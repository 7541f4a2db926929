"""Unit tests of dispy_common: framing, auth, records, restricted loaders,
sizes and TLS contexts.  Current Python only; no legacy stack, no node."""

import contextlib
import hashlib
import os
import pickle
import pickletools
import socket
import ssl
import struct
import sys
import threading
import time
import types

import pytest

import driver  # noqa: F401  (puts the repository on sys.path)
import dispy_common as dc


# ---------------------------------------------------------------- framing

@pytest.fixture
def pair():
    a, b = socket.socketpair()
    a.settimeout(10)
    b.settimeout(10)
    yield a, b
    a.close()
    b.close()


@pytest.mark.parametrize('size', [0, 1, 100, 65535, 65536, 3 * 1024 * 1024 + 7])
def test_frame_round_trip(pair, size):
    a, b = pair
    data = os.urandom(size)
    sender = threading.Thread(target=dc.send_msg, args=(a, data))
    sender.start()
    got = dc.recv_msg(b)
    sender.join()
    assert got == data


def test_frame_header_is_big_endian_length(pair):
    a, b = pair
    dc.send_msg(a, b'PING:xyz')
    assert dc.recv_exact(b, 4) == struct.pack('>L', 8)
    assert dc.recv_exact(b, 8) == b'PING:xyz'


def test_several_frames_on_one_stream(pair):
    a, b = pair
    for i in range(5):
        dc.send_msg(a, b'm%d' % i)
    assert [dc.recv_msg(b) for _ in range(5)] == [b'm%d' % i for i in range(5)]


def test_huge_length_refused_before_allocation(pair):
    a, b = pair
    a.sendall(struct.pack('>L', 0xFFFFFFF0))
    start = time.monotonic()
    with pytest.raises(dc.ProtocolError, match='exceeds the limit'):
        dc.recv_msg(b)
    assert time.monotonic() - start < 1.0


def test_max_len_argument(pair):
    a, b = pair
    dc.send_msg(a, b'x' * 11)
    with pytest.raises(dc.ProtocolError):
        dc.recv_msg(b, max_len=10)
    dc.send_msg(a, b'y' * 10)
    # the refused frame's body is still in the stream; a caller drops the
    # connection after a ProtocolError, so only the header was consumed
    assert dc.recv_exact(b, 11) == b'x' * 11
    assert dc.recv_msg(b, max_len=10) == b'y' * 10


def test_default_limit_is_max_frame(pair):
    a, b = pair
    a.sendall(struct.pack('>L', dc.MAX_FRAME + 1))
    with pytest.raises(dc.ProtocolError):
        dc.recv_msg(b)
    assert dc.MAX_FRAME < 0xFFFFFFFF


def test_deadline_drops_a_trickling_peer(pair):
    a, b = pair
    stop = threading.Event()

    def trickle():
        a.sendall(struct.pack('>L', 100))
        while not stop.is_set():
            try:
                a.sendall(b'x')
            except OSError:
                return
            time.sleep(0.02)

    t = threading.Thread(target=trickle, daemon=True)
    t.start()
    start = time.monotonic()
    try:
        with pytest.raises(dc.ProtocolError, match='timed out'):
            dc.recv_msg(b, deadline=time.monotonic() + 0.2)
    finally:
        stop.set()
    elapsed = time.monotonic() - start
    assert 0.16 < elapsed < 2.0


def test_deadline_already_passed(pair):
    a, b = pair
    with pytest.raises(dc.ProtocolError, match='timed out'):
        dc.recv_exact(b, 4, deadline=time.monotonic() - 1)


def test_eof_mid_frame(pair):
    a, b = pair
    a.sendall(struct.pack('>L', 10) + b'abc')
    a.shutdown(socket.SHUT_WR)
    with pytest.raises(dc.ProtocolError, match='closed after 3 of 10'):
        dc.recv_msg(b)


def test_eof_mid_header(pair):
    a, b = pair
    a.sendall(b'\x00\x00')
    a.shutdown(socket.SHUT_WR)
    with pytest.raises(dc.ProtocolError, match='closed after 2 of 4'):
        dc.recv_msg(b)


def test_empty_frame(pair):
    a, b = pair
    dc.send_msg(a, b'')
    assert dc.recv_msg(b) == b''


# ---------------------------------------------------------------- split_tag

@pytest.mark.parametrize('msg, expected', [
    (b'JOB:abc', (b'JOB', b'abc')),
    (b'JOB_REPLY:\x80\x04', (b'JOB_REPLY', b'\x80\x04')),
    (b'RESEND_JOB_RESULTS:', (b'RESEND_JOB_RESULTS', b'')),
    (b'PING:a:b', (b'PING', b'a:b')),
    (b'ACK', (None, b'ACK')),
    (b'', (None, b'')),
    (b':x', (None, b':x')),
    (b'J0B:x', (None, b'J0B:x')),
    (b'\x80\x04:x', (None, b'\x80\x04:x')),
    (b'A' * 40 + b':x', (None, b'A' * 40 + b':x')),   # tag must be in the first 32 bytes
])
def test_split_tag(msg, expected):
    assert dc.split_tag(msg) == expected


# ---------------------------------------------------------------- auth

@pytest.mark.parametrize('secret', ['', 'secret', 'a b c'])
def test_auth_code_is_sha1_hex_ascii(secret):
    sign = dc.new_sign()
    code = dc.auth_code(secret, sign)
    assert isinstance(code, bytes)
    assert len(code) == dc.AUTH_LEN == 40
    assert code == hashlib.sha1((secret + sign).encode('ascii')).hexdigest().encode('ascii')


def test_new_sign_is_20_hex_and_fresh():
    signs = {dc.new_sign() for _ in range(50)}
    assert len(signs) == 50
    for sign in signs:
        assert len(sign) == 20
        int(sign, 16)


def test_auth_matches():
    code = dc.auth_code('s', 'abc')
    assert dc.auth_matches(code, code)
    assert dc.auth_matches(bytes(code), dc.auth_code('s', 'abc'))
    assert not dc.auth_matches(dc.auth_code('t', 'abc'), code)
    assert not dc.auth_matches(code[:-1], code)
    assert not dc.auth_matches(b'', code)
    assert not dc.auth_matches(code + b'0', code)


# ---------------------------------------------------------------- records: writing

def _stat():
    return os.stat(__file__)


def _records():
    return [
        dc.Compute(type=1, name='f', id=7, code='def f(): pass\n', dest_path=None,
                   xfer_files=[dc.XferFile(name='a.txt', stat_buf=_stat(), compute_id=7,
                                           sep='/')],
                   reentrant=False, setup=dc.Function('s', (1,), {'k': 2}), cleanup=None,
                   scheduler_ip_addr='127.0.0.1', scheduler_port=51347, auth='ab12',
                   job_result_port=51347, pulse_interval=None),
        dc.XferFile(name='/x/y.txt', stat_buf=_stat(), compute_id=3, sep='/'),
        dc.DispyJobRecord(uid=5, hash='cafe', compute_id=3, args=b'\x80\x04)', kwargs=b'',
                          xfer_files=[], code=''),
        dc.JobReply(uid=5, hash='cafe', ip_addr='127.0.0.1', status=dc.DispyJob.Finished,
                    result=[1, 'two', {3: 4.0}], stdout='out', stderr='', exception=None,
                    start_time=1.5, end_time=2.5),
        dc.Function('setup', (1, 2), {'a': 'b'}),
    ]


def _globals_of(data):
    """Module/name pairs a pickle refers to (GLOBAL and STACK_GLOBAL)."""
    found = []
    strings = []
    for op, arg, _ in pickletools.genops(data):
        if op.name in ('SHORT_BINUNICODE', 'BINUNICODE', 'UNICODE'):
            strings.append(arg)
        elif op.name == 'STACK_GLOBAL':
            found.append((strings[-2], strings[-1]))
        elif op.name == 'GLOBAL':
            found.append(tuple(arg.split(' ', 1)))
        elif op.name in ('BINGET', 'LONG_BINGET', 'MEMOIZE', 'BINPUT', 'LONG_BINPUT'):
            pass
    return found


def _protocol_of(data):
    for op, arg, _ in pickletools.genops(data):
        if op.name == 'PROTO':
            return arg
    return 0


@pytest.mark.parametrize('record', _records(), ids=lambda r: type(r).__name__)
def test_dumps_uses_protocol_4_at_most(record):
    assert _protocol_of(dc.dumps(record)) <= 4
    assert dc.PICKLE_PROTOCOL <= 4


def test_dumps_plain_protocol_4_at_most():
    assert _protocol_of(dc.dumps_plain({'a': [1, b'x']})) <= 4


@pytest.mark.parametrize('record, legacy', [
    (_records()[0], '_Compute'), (_records()[1], '_XferFile'),
    (_records()[2], '_DispyJob_'), (_records()[3], '_JobReply'),
    (_records()[4], '_Function'),
])
def test_dumps_names_legacy_classes(record, legacy):
    names = _globals_of(dc.dumps(record))
    assert ('dispy', legacy) in names
    # nothing refers to our own module: a legacy client has no dispy_common
    assert not any(mod == 'dispy_common' for mod, _ in names)


def test_dumps_stat_result_is_os_path():
    names = _globals_of(dc.dumps(_records()[1]))
    assert any(name == 'stat_result' and mod in ('os', 'posix') for mod, name in names)


def test_dumps_job_reply_has_no_helper_function():
    """Records go out as NEWOBJ + BUILD of a dict: only dispy._JobReply."""
    data = dc.dumps(_records()[3])
    ops = [op.name for op, _, _ in pickletools.genops(data)]
    assert 'NEWOBJ' in ops and 'BUILD' in ops
    assert 'REDUCE' not in ops
    assert _globals_of(data) == [('dispy', '_JobReply')]


# ---------------------------------------------------------------- records: legacy classes
# A stand-in 'dispy' module holding copies of the legacy classes lets the
# current Python check both directions without the Python 3.6 stack.

def _legacy_module():
    mod = types.ModuleType('dispy')
    src = '''
import collections, os
class _Compute(object):
    func_type = 1
    prog_type = 2
    def __init__(self, compute_type, name):
        self.type = compute_type
        self.name = name
        self.id = None
        self.code = ''
        self.dest_path = None
        self.xfer_files = []
        self.reentrant = False
        self.setup = None
        self.cleanup = None
        self.scheduler_ip_addr = None
        self.scheduler_port = None
        self.auth = None
        self.job_result_port = None
        self.pulse_interval = None
    def __getstate__(self):
        return dict(self.__dict__)

class _XferFile(object):
    def __init__(self, name, stat_buf, compute_id=None):
        self.name = name
        self.stat_buf = stat_buf
        self.compute_id = compute_id
        self.sep = os.sep

class _DispyJob_(object):
    __slots__ = ('job', 'uid', 'compute_id', 'hash', 'node', 'xfer_files', 'args',
                 'kwargs', 'code')
    def __getstate__(self):
        state = {}
        for k in self.__slots__:
            if k not in ('job', 'node'):
                state[k] = getattr(self, k)
        return state
    def __setstate__(self, state):
        for k, v in state.items():
            setattr(self, k, v)

class _JobReply(object):
    def __init__(self, uid, hash, ip_addr, status):
        self.uid = uid
        self.hash = hash
        self.ip_addr = ip_addr
        self.status = status
        self.result = None
        self.stdout = None
        self.stderr = None
        self.exception = None
        self.start_time = 0
        self.end_time = 0

_Function = collections.namedtuple('_Function', ['name', 'args', 'kwargs'])
'''
    exec(compile(src, 'dispy', 'exec'), mod.__dict__)
    for name in ('_Compute', '_XferFile', '_DispyJob_', '_JobReply', '_Function'):
        getattr(mod, name).__module__ = 'dispy'
    return mod


@pytest.fixture
def legacy_dispy(monkeypatch):
    mod = _legacy_module()
    monkeypatch.setitem(sys.modules, 'dispy', mod)
    return mod


def test_legacy_client_pickles_load_as_records(legacy_dispy):
    L = legacy_dispy
    compute = L._Compute(1, 'f')
    compute.id, compute.auth, compute.code = 11, 'ab', 'def f(): pass'
    compute.xfer_files = [L._XferFile('/tmp/a.txt', _stat(), 11)]
    compute.setup = L._Function('s', (1,), {})
    job = L._DispyJob_.__new__(L._DispyJob_)
    job.job = job.node = None
    job.uid, job.compute_id, job.hash = 3, 11, 'beef'
    job.xfer_files, job.args, job.kwargs, job.code = [], pickle.dumps((1,)), pickle.dumps({}), ''

    got = dc.loads_records(pickle.dumps(compute, 4))
    assert isinstance(got, dc.Compute)
    assert (got.id, got.auth, got.name, got.type) == (11, 'ab', 'f', 1)
    assert isinstance(got.xfer_files[0], dc.XferFile)
    assert isinstance(got.xfer_files[0].stat_buf, os.stat_result)
    assert got.xfer_files[0].stat_buf.st_size == os.path.getsize(__file__)
    assert isinstance(got.setup, dc.Function) and got.setup == ('s', (1,), {})

    got = dc.loads_records(pickle.dumps(job, 4))
    assert isinstance(got, dc.DispyJobRecord)
    assert (got.uid, got.compute_id, got.hash) == (3, 11, 'beef')
    assert pickle.loads(got.args) == (1,)


def test_legacy_slots_state_tuple_is_accepted(legacy_dispy):
    """A __slots__ object without __getstate__ pickles (None, slots-dict)."""
    cls = type('_DispyJob_', (object,), {'__slots__': ('uid', 'hash', 'compute_id'),
                                          '__module__': 'dispy'})
    legacy_dispy._DispyJob_ = cls
    obj = cls()
    obj.uid, obj.hash, obj.compute_id = 1, 'h', 2
    got = dc.loads_records(pickle.dumps(obj, 4))
    assert isinstance(got, dc.DispyJobRecord)
    assert (got.uid, got.hash, got.compute_id) == (1, 'h', 2)
    assert got.args is None     # missing fields default to None


def test_our_records_load_in_the_legacy_classes(legacy_dispy):
    """What the node sends (dumps) unpickles into dispy.* on the client."""
    reply = _records()[3]
    got = pickle.loads(dc.dumps(reply))
    assert type(got) is legacy_dispy._JobReply
    assert got.__dict__ == reply.__dict__
    xf = pickle.loads(dc.dumps(_records()[1]))
    assert type(xf) is legacy_dispy._XferFile
    assert xf.stat_buf == _stat()
    fn = pickle.loads(dc.dumps(dc.Function('a', (), {})))
    assert type(fn) is legacy_dispy._Function and fn == ('a', (), {})


@pytest.mark.parametrize('record', _records(), ids=lambda r: type(r).__name__)
def test_loads_records_round_trip(record):
    got = dc.loads_records(dc.dumps(record))
    assert type(got) is type(record)
    if isinstance(record, dc.Function):
        assert got == record
    else:
        assert got.__dict__.keys() == record.__dict__.keys()
        for key, value in record.__dict__.items():
            if key == 'xfer_files':
                assert [x.__dict__ for x in getattr(got, key)] == [x.__dict__ for x in value]
            else:
                assert getattr(got, key) == value


def test_loads_full_round_trip_job_reply():
    got = dc.loads_full(dc.dumps(_records()[3]))
    assert isinstance(got, dc.JobReply) and got.result == [1, 'two', {3: 4.0}]


def test_record_missing_fields_default_to_none():
    got = dc.loads_records(dc.dumps(dc.JobReply(uid=1)))
    assert got.uid == 1 and got.result is None and got.exception is None


# ---------------------------------------------------------------- restricted loaders

class _Boom:
    """Unpickling this creates a marker file (if anything lets it run)."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, ('touch %s' % self.path,))


class _OpenBoom:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, 'w'))


@pytest.mark.parametrize('cls', [_Boom, _OpenBoom])
def test_loads_plain_refuses_globals_and_runs_nothing(tmp_path, cls):
    marker = tmp_path / 'pwned'
    data = pickle.dumps({'version': '4.5', 'x': cls(str(marker))}, 4)
    with pytest.raises(dc.ProtocolError, match='refused class'):
        dc.loads_plain(data)
    assert not marker.exists()


def test_loads_plain_refuses_records_too():
    with pytest.raises(dc.ProtocolError):
        dc.loads_plain(dc.dumps(dc.JobReply(uid=1)))
    with pytest.raises(dc.ProtocolError):
        dc.loads_plain(pickle.dumps(os.stat_result((0,) * 10), 4))


def test_loads_plain_accepts_plain_data():
    data = {'version': '4.5', 'sign': 'ab', 'port': 1, 'ip_addrs': ['1.2.3.4'],
            'f': 1.5, 'b': b'x', 't': (1, None, True), 'n': -10 ** 30}
    for proto in (3, 4):     # legacy clients use HIGHEST_PROTOCOL (4 on Python 3.6)
        assert dc.loads_plain(pickle.dumps(data, proto)) == data


@pytest.mark.parametrize('junk', [b'', b'\x80', b'\x80\x04\x95', b'not a pickle',
                                  b'\x80\x04K\x01', pickle.dumps([1, 2])[:-3]])
def test_loaders_turn_junk_into_protocol_error(junk):
    for loader in (dc.loads_plain, dc.loads_records):
        with pytest.raises(dc.ProtocolError):
            loader(junk)


@pytest.mark.parametrize('cls', [_Boom, _OpenBoom])
def test_loads_records_makes_unknown_callables_opaque(tmp_path, cls):
    marker = tmp_path / 'pwned'
    data = dc.dumps(dc.Compute(id=1, setup=dc.Function('s', (cls(str(marker)),), {})))
    got = dc.loads_records(data)
    assert isinstance(got, dc.Compute)
    assert isinstance(got.setup, dc.Function)
    assert isinstance(got.setup.args[0], dc.Opaque)
    assert not marker.exists()


class UserThing:
    imported = []

    def __init__(self, v):
        self.v = v

    def __setstate__(self, state):
        UserThing.imported.append(state)


def test_loads_records_maps_unknown_classes_to_opaque_without_running_them():
    got = dc.loads_records(pickle.dumps([UserThing(1)], 4))
    assert isinstance(got[0], dc.Opaque)
    assert UserThing.imported == []       # its __setstate__ never ran


@pytest.mark.parametrize('module', ['this', 'dispy_unit_no_such_module'])
def test_loads_records_never_imports(module):
    """'this' prints the Zen of Python when imported; a missing module
    would raise ImportError.  Neither is looked up."""
    assert module not in sys.modules
    data = b'\x80\x04c' + module.encode() + b'\nThing\n)\x81.'   # GLOBAL, NEWOBJ
    got = dc.loads_records(data)
    assert isinstance(got, dc.Opaque)
    assert module not in sys.modules


def test_opaque_cannot_be_repickled():
    got = dc.loads_records(pickle.dumps(UserThing(1), 4))
    with pytest.raises(pickle.PicklingError):
        pickle.dumps(got)


def test_loads_records_allows_safe_builtins():
    value = {'s': {1, 2}, 'f': frozenset([3]), 'c': 1 + 2j, 'b': bytearray(b'ab')}
    assert dc.loads_records(pickle.dumps(value, 4)) == value


class _HugeBytearray:
    def __reduce__(self):
        return (bytearray, (10 ** 12,))


def test_loads_records_refuses_bytearray_of_a_size():
    # an authenticated peer must not make the node allocate a terabyte
    with pytest.raises(dc.ProtocolError):
        dc.loads_records(pickle.dumps(_HugeBytearray(), 4))


def test_loads_full_resolves_main_classes_in_namespace():
    ns = {}
    exec('class Point:\n    def __init__(self, x):\n        self.x = x\n', ns)
    ns['Point'].__module__ = '__main__'
    ns['Point'].__qualname__ = 'Point'
    real_main = sys.modules['__main__']
    fake_main = types.ModuleType('__main__')
    fake_main.Point = ns['Point']
    sys.modules['__main__'] = fake_main
    try:
        data = pickle.dumps(ns['Point'](5), 4)
    finally:
        sys.modules['__main__'] = real_main
    got = dc.loads_full(data, ns)
    assert type(got) is ns['Point'] and got.x == 5


# ---------------------------------------------------------------- parse_size

@pytest.mark.parametrize('text, value', [
    ('0', 0), ('10', 10), ('1k', 1024), ('1K', 1024), ('10m', 10 * 1024 ** 2),
    ('2g', 2 * 1024 ** 3), ('1t', 1024 ** 4), (' 5k ', 5 * 1024), (7, 7),
])
def test_parse_size(text, value):
    assert dc.parse_size(text) == value


@pytest.mark.parametrize('text', ['', ' ', 'k', '10x', '-1', '1.5m', 'm10', '1 k',
                                  '0x10', 'ten', None])
def test_parse_size_rejects(text):
    with pytest.raises(ValueError):
        dc.parse_size(text)


# ---------------------------------------------------------------- TLS

CERT_CONF = b'''[req]
distinguished_name = dn
prompt = no
[dn]
CN = dispynode-test
'''


def self_signed(directory):
    """A self-signed EC P-256 certificate (quick to make; the interop tests
    use RSA, as dispy users do); returns (certfile, keyfile)."""
    import subprocess
    (directory / 'req.conf').write_bytes(CERT_CONF)
    certfile, keyfile = directory / 'cert.pem', directory / 'key.pem'
    r = subprocess.run(['openssl', 'req', '-x509', '-newkey', 'ec',
                        '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes', '-days', '2',
                        '-keyout', str(keyfile), '-out', str(certfile),
                        '-config', str(directory / 'req.conf')],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert r.returncode == 0, r.stdout
    return str(certfile), str(keyfile)


@pytest.fixture(scope='module')
def cert(tmp_path_factory):
    import shutil
    if shutil.which('openssl') is None:
        if os.environ.get('CI') == 'true':
            pytest.fail('openssl command not available (.ci/run installs it)')
        pytest.skip('openssl command not available')
    d = tmp_path_factory.mktemp('tls')
    certfile, keyfile = self_signed(d)
    combined = d / 'combined.pem'
    combined.write_bytes((d / 'key.pem').read_bytes() + (d / 'cert.pem').read_bytes())
    return {'cert': certfile, 'key': keyfile, 'combined': str(combined)}


def test_tls_contexts_cap_at_tls12(cert):
    server = dc.server_tls_context(cert['cert'], cert['key'])
    client = dc.client_tls_context(cert['cert'])
    for ctx in (server, client):
        assert ctx.maximum_version == ssl.TLSVersion.TLSv1_2
        assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
        assert ctx.options & ssl.OP_NO_COMPRESSION
    assert client.verify_mode == ssl.CERT_REQUIRED
    assert client.check_hostname is False
    # the combined (key + cert in one file) form used by dispy works too
    dc.server_tls_context(cert['combined'])


@contextlib.contextmanager
def tls_server(server_ctx, session=None):
    """A one-connection loopback TLS server in a thread; yields its address.
    ``session(tls)`` runs on the accepted connection; a failed handshake
    just closes it (the client side asserts what it saw)."""
    lsock = socket.socket()
    lsock.bind(('127.0.0.1', 0))
    lsock.listen(1)

    def serve():
        conn, _ = lsock.accept()
        try:
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                if session:
                    session(tls)
        except (ssl.SSLError, OSError):
            conn.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        yield lsock.getsockname()
        t.join(5)
    finally:
        lsock.close()


def test_tls_handshake_negotiates_tls12(cert):
    server_ctx = dc.server_tls_context(cert['cert'], cert['key'])
    client_ctx = dc.client_tls_context(cert['cert'])
    result = {}

    def echo(tls):
        result['server'] = tls.version()
        dc.send_msg(tls, dc.recv_msg(tls))

    with tls_server(server_ctx, echo) as addr:
        with dc.connect(addr, 5, client_ctx) as sock:
            assert sock.version() == 'TLSv1.2'
            dc.send_msg(sock, b'PING:x')
            assert dc.recv_msg(sock) == b'PING:x'
    assert result['server'] == 'TLSv1.2'


def test_tls13_only_client_is_refused(cert):
    server_ctx = dc.server_tls_context(cert['cert'], cert['key'])
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_ctx.check_hostname = False
    client_ctx.verify_mode = ssl.CERT_NONE
    client_ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    with tls_server(server_ctx) as addr:
        with pytest.raises((ssl.SSLError, OSError)):
            with socket.create_connection(addr, timeout=5) as raw:
                client_ctx.wrap_socket(raw).close()


def test_client_context_rejects_other_certificate(cert, tmp_path):
    """The node only talks to a peer holding the shared certificate."""
    server_ctx = dc.server_tls_context(*self_signed(tmp_path))
    client_ctx = dc.client_tls_context(cert['cert'])
    with tls_server(server_ctx) as addr:
        with pytest.raises(ssl.SSLError):
            dc.connect(addr, 5, client_ctx)
