"""Hostile input: code-execution pickles and broken framing.

The original dispy 4.5.5 node unpickles PING data from anyone, so a crafted
pickle runs code on it.  Our node decodes unauthenticated data with a loader
that refuses every class, and authenticated requests with one that maps any
class it does not know to an inert placeholder.  Here every gadget goes to
every tag the node knows (and an unknown one), over UDP and TCP, with a wrong
auth prefix, with none, and with the correct one; then malformed framing.
Each test ends by checking that the node is alive, logged no traceback, and
still serves a real legacy client.
"""

import hashlib
import collections
import os
import pickle
import socket
import struct
import subprocess
import time

import pytest

from dispy_common import DispyJob

from driver import exchange, frame, parse_frame
from legacy import CLIENTS, free_port, run_client, wait_for

pytestmark = [pytest.mark.interop]

FINISHED = DispyJob.Finished
SECRET = 'hostile-s3cret'
TAGS = (b'PING', b'COMPUTE', b'FILEXFER', b'SETUP', b'JOB', b'TERMINATE_JOB', b'CLOSE',
        b'RESEND_JOB_RESULTS', b'PENDING_JOBS', b'RETRIEVE_JOB', b'JOBS', b'NO_SUCH_TAG')


# ---------------------------------------------------------------- gadgets

class _Reduce:
    """Pickles as ``func(*args)``."""

    def __init__(self, func, args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _raw_global_call(module, name, arg):
    """A protocol-0 pickle calling module.name(arg), hand written."""
    return b'c%s\n%s\n(V%s\ntR.' % (module.encode(), name.encode(), arg.encode())


def gadgets(markers):
    """(name, pickle bytes) pairs; each would create its own marker file if
    ever unpickled by a full loader.  ``markers`` collects the paths."""
    def marker(name):
        path = os.path.join(markers['dir'], 'MARKER-' + name)
        markers['paths'].append(path)
        return path

    out = []
    for proto in (0, 2, 4, 5):
        if proto > pickle.HIGHEST_PROTOCOL:
            continue
        m = marker('system-p%d' % proto)
        out.append(('os.system/p%d' % proto,
                    pickle.dumps(_Reduce(os.system, ('touch %s' % m,)), proto)))
        m = marker('open-p%d' % proto)
        out.append(('open/p%d' % proto, pickle.dumps(_Reduce(open, (m, 'w')), proto)))
    m = marker('popen')
    out.append(('subprocess.Popen', pickle.dumps(_Reduce(subprocess.Popen, (['touch', m],)), 2)))
    m = marker('exec')
    out.append(('builtins.exec', pickle.dumps(
        _Reduce(exec, ("open(%r, 'w').close()" % m,)), 4)))
    m = marker('eval-raw')
    out.append(('__builtin__.eval raw p0', _raw_global_call(
        '__builtin__', 'eval', "open(%r, 'w')" % m)))
    m = marker('posix-raw')
    out.append(('posix.system raw p0', _raw_global_call('posix', 'system', 'touch %s' % m)))
    # nested where a legitimate request carries data
    m = marker('nested-ping')
    out.append(('PING dict with gadget', pickle.dumps(
        {'version': '4.5', 'port': 1, 'sign': _Reduce(os.system, ('touch %s' % m,)),
         'ip_addrs': []}, 4)))
    m = marker('nested-req')
    out.append(('request dict with gadget', pickle.dumps(
        {'compute_id': _Reduce(os.system, ('touch %s' % m,)), 'auth': 'ab', 'uid': 1,
         'hash': 'x', 'terminate_pending': True}, 4)))
    m = marker('in-list')
    out.append(('gadget in a list', pickle.dumps([1, _Reduce(open, (m, 'w')), 'x'], 2)))
    return out


_LegacyFunction = collections.namedtuple('_Function', ['name', 'args', 'kwargs'])
_LegacyFunction.__module__ = 'dispy'


def _fake_record(name, state):
    """A pickle of ``dispy.<name>`` with ``state``, as the legacy client
    writes records (NEWOBJ + BUILD)."""
    cls = type(name, (object,), {'__module__': 'dispy'})
    obj = cls.__new__(cls)
    obj.__dict__.update(state)

    class _P(pickle._Pickler):
        def save_global(self, o, n=None):
            if o is cls or getattr(o, '__module__', None) == 'dispy':
                self.save('dispy')
                self.save(o.__name__)
                self.write(pickle.STACK_GLOBAL)
                self.memoize(o)
                return
            return super().save_global(o, n)
    import io
    buf = io.BytesIO()
    _P(buf, 4).dump(obj)
    return buf.getvalue()


def record_gadgets(markers):
    """dispy records (which the authenticated loader accepts) with gadgets
    in their fields."""
    def marker(name):
        path = os.path.join(markers['dir'], 'MARKER-' + name)
        markers['paths'].append(path)
        return path
    evil = lambda n: _Reduce(os.system, ('touch %s' % marker(n),))  # noqa: E731
    return [
        ('_Compute with gadget fields', _fake_record('_Compute', {
            'type': evil('c-type'), 'name': 'x', 'id': evil('c-id'), 'code': evil('c-code'),
            'dest_path': None, 'xfer_files': [evil('c-xf')], 'reentrant': False,
            'setup': evil('c-setup'), 'cleanup': True, 'scheduler_ip_addr': '127.0.0.1',
            'scheduler_port': 1, 'auth': 'ab', 'job_result_port': 1, 'pulse_interval': None})),
        ('_DispyJob_ with gadget fields', _fake_record('_DispyJob_', {
            'uid': evil('j-uid'), 'hash': 'h', 'compute_id': evil('j-cid'), 'args': b'',
            'kwargs': b'', 'xfer_files': [evil('j-xf')], 'code': ''})),
        ('_XferFile with gadget stat', _fake_record('_XferFile', {
            'name': 'f', 'stat_buf': evil('x-stat'), 'compute_id': 1, 'sep': '/'})),
    ]


def _deep_list_ops(depth):
    """Pickle opcodes (no PROTO, no STOP) building a list nested ``depth``
    deep: cheap to load (the unpickler is iterative), but str()/repr() of it
    recurse."""
    return b']' * depth + b'a' * (depth - 1)


def _short_str(s):
    data = s.encode()
    return b'\x8c' + bytes([len(data)]) + data


def deep_payloads(depth=100000):
    """(name, pickle) pairs putting a deeply nested list where the node
    reads an id: top level, in a request dict, and as a job's compute_id."""
    deep = _deep_list_ops(depth)
    req = b'\x80\x04}(' + _short_str('compute_id') + deep + _short_str('auth') + \
        _short_str('ab') + _short_str('uid') + deep + b'u.'
    job = (b'\x80\x04' + _short_str('dispy') + _short_str('_DispyJob_') + b'\x93)\x81}('
           + _short_str('uid') + b'K\x07' + _short_str('hash') + _short_str('h')
           + _short_str('compute_id') + deep + _short_str('args') + b'C\x00'
           + _short_str('kwargs') + b'C\x00' + _short_str('xfer_files') + b']'
           + _short_str('code') + _short_str('') + b'ub.')
    huge = 10 ** 5000     # str() of it raises ValueError on Python 3.11+
    return [('deep list', b'\x80\x04' + deep + b'.'), ('dict with deep ids', req),
            ('_DispyJob_ with deep compute_id', job),
            ('5000-digit int', pickle.dumps(huge, 4)),
            ('dict with 5000-digit ids', pickle.dumps(
                {'compute_id': huge, 'auth': 'ab', 'uid': huge, 'hash': 'h'}, 4)),
            ('_DispyJob_ with 5000-digit compute_id', job.replace(deep, pickle.dumps(huge, 4)[2:-1]))]


# ---------------------------------------------------------------- wire helpers

def ping_payload(reply_port):
    return pickle.dumps({'version': '4.5', 'port': reply_port, 'sign': 'a' * 20,
                         'ip_addrs': []}, 4)


def node_sign(port, reply_port):
    """The node's sign, from a TCP PING (which needs no auth)."""
    reply = parse_frame(exchange(port, b'x' * 40 + frame(b'PING:' + ping_payload(reply_port))))
    assert reply is not None, 'no PONG to a TCP PING'
    pong = pickle.loads(reply)
    assert pong['version'] == '4.5'
    return pong['sign']


def auth_for(secret, sign):
    return hashlib.sha1((secret + sign).encode()).hexdigest().encode()


def udp_send(port, data):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.sendto(data, ('127.0.0.1', port))


def _fmt_log(node):
    return '\n--- node log ---\n' + node.log()[-10000:]


def assert_node_healthy(node, reply_port):
    assert node.alive(), 'node died' + _fmt_log(node)
    assert node_sign(node.port, reply_port)


def assert_no_traceback(node):
    log = node.log()
    bad = [i for i, line in enumerate(log.splitlines())
           if 'Traceback' in line or 'Logging error' in line]
    assert not bad, 'node logged %d traceback(s)%s' % (len(bad), _fmt_log(node))


def legit_client(node, tmp_path, njobs=3, name='legit'):
    d = tmp_path / name
    d.mkdir()
    res = run_client(CLIENTS / 'basic_jobs.py', node.port, free_port(), 'jobs=%d' % njobs,
                     'secret=%s' % SECRET, 'give_up=20', timeout=60, cwd=d)
    msg = res.describe() + _fmt_log(node)
    assert res.data is not None and 'error' not in res.data, msg
    assert not res.data.get('gave_up') and not res.data.get('watchdog'), msg
    assert [j['status'] for j in res.data['jobs']] == [FINISHED] * njobs, msg
    assert [j['result'] for j in res.data['jobs']] == [n * n + 1 for n in range(njobs)], msg


@pytest.fixture
def hostile_node(node_factory):
    return node_factory(args=('--msg_timeout', '2'),
                        env={'DISPYNODE_SECRET': SECRET})


# ---------------------------------------------------------------- tests

def test_code_execution_pickles(hostile_node, tmp_path):
    """Every gadget over UDP PING:/PULSE: and over TCP for every tag, with a
    wrong auth, no auth and the correct auth: no marker file ever appears,
    unauthenticated requests get no answer (PING: a refusal; unknown tag: a
    NAK), and the node then serves a legacy client."""
    node = hostile_node
    markers = {'dir': str(tmp_path / 'markers'), 'paths': []}
    os.makedirs(markers['dir'])
    plain = gadgets(markers)
    records = record_gadgets(markers)
    reply_port = free_port()          # nothing listens there
    sign = node_sign(node.port, reply_port)
    good = auth_for(SECRET, sign)
    assert len(good) == 40
    wrong = auth_for('not-the-secret', sign)
    results = {}

    # UDP: PING and PULSE, top level and nested
    for name, data in plain + records:
        for tag in (b'PING:', b'PULSE:'):
            udp_send(node.port, tag + data)
    # TCP: every tag x every gadget x every auth mode
    for name, data in plain + records:
        for tag in TAGS:
            msg = frame(tag + b':' + data)
            for mode, prefix in (('wrong', wrong), ('none', b''), ('good', good)):
                got = exchange(node.port, prefix + msg)
                results[(name, tag, mode)] = got
    # a _Compute the node accepts (valid fields) but whose setup is a
    # gadget: the node stores it undecoded; CLOSE it without SETUP.
    m = os.path.join(markers['dir'], 'MARKER-accepted-setup')
    markers['paths'].append(m)
    cid = 4242
    comp = _fake_record('_Compute', {
        'type': 1, 'name': 'compute', 'id': cid, 'code': 'def compute(n):\n    return n\n',
        'dest_path': None, 'xfer_files': [], 'reentrant': False,
        # setup must be a _Function: the gadget rides in its arguments,
        # which only the job side would ever load (here never: no SETUP).
        'setup': _LegacyFunction('compute', (_Reduce(os.system, ('touch %s' % m,)),), {}),
        'cleanup': True,
        'scheduler_ip_addr': '127.0.0.1', 'scheduler_port': reply_port, 'auth': 'abcdef',
        'job_result_port': reply_port, 'pulse_interval': None})
    accepted = parse_frame(exchange(node.port, good + frame(b'COMPUTE:' + comp)))
    exchange(node.port, good + frame(b'CLOSE:' + pickle.dumps(
        {'compute_id': cid, 'auth': 'abcdef', 'terminate_pending': True}, 4)))

    time.sleep(1.0)
    found = [p for p in markers['paths'] if os.path.exists(p)]
    assert found == [], 'a gadget ran: %s%s' % (found, _fmt_log(node))
    assert len(markers['paths']) > 20

    for (name, tag, mode), got in results.items():
        reply = parse_frame(got)
        if mode == 'wrong':
            if tag == b'PING':
                assert reply is not None and reply.startswith(b'NAK'), (name, got)
            else:
                # Without the token only a PING is answered; unknown tags too
                # get silence (no echo of what the peer sent).
                assert got == b'', ('answered an unauthenticated %s' % tag, name, got)
        elif mode == 'none':
            # the frame's first 40 bytes are taken as the auth: nothing valid follows
            assert got == b'' or (reply or b'').startswith(b'NAK'), (name, tag, got)
        else:
            # authenticated: a refusal or an empty answer; never a crash
            assert b'Traceback' not in got, (name, tag, got)
    summary = {}
    for (name, tag, mode), got in results.items():
        reply = parse_frame(got)
        key = (tag.decode(), mode)
        summary.setdefault(key, set()).add(
            'nothing' if got == b'' else repr((reply or got)[:40]))
    print('\nTCP answers to gadgets (tag, auth mode): answers')
    for key in sorted(summary):
        print('  %-20s %-5s %s' % (key + (' | '.join(sorted(summary[key])),)))
    assert accepted == b'ACK', ('valid computation was refused: %r' % accepted) + _fmt_log(node)
    wait_for(lambda: 'computation %d closed' % cid in node.log(), 10)
    assert 'computation %d closed' % cid in node.log(), _fmt_log(node)
    found = [p for p in markers['paths'] if os.path.exists(p)]
    assert found == [], 'a gadget ran: %s%s' % (found, _fmt_log(node))
    assert_node_healthy(node, reply_port)
    legit_client(node, tmp_path)
    assert_no_traceback(node)
    assert [p for p in markers['paths'] if os.path.exists(p)] == []


def test_malformed_frames(hostile_node, tmp_path):
    """Truncated frames, a 0xFFFFFFF0 length, random bytes, auth prefixes of
    the wrong length, empty/odd tags, authenticated requests with payloads
    of the wrong type or with deeply nested ids (whose str() recurses), and
    UDP junk: the node refuses or drops each one, allocates nothing huge,
    logs no traceback, stays up and serves a legacy client."""
    node = hostile_node
    reply_port = free_port()
    sign = node_sign(node.port, reply_port)
    good = auth_for(SECRET, sign)
    ping = frame(b'PING:' + ping_payload(reply_port))
    rnd = __import__('random').Random(1234)

    def rbytes(n):
        return bytes(rnd.getrandbits(8) for _ in range(n))

    t0 = time.monotonic()
    cases = [
        ('empty connection', b''),
        ('auth only', good),
        ('auth + half a length', good + b'\x00\x00'),
        ('truncated frame', good + struct.pack('>L', 100) + b'JOB:' + b'x' * 10),
        ('length 0xFFFFFFF0', good + struct.pack('>L', 0xFFFFFFF0) + b'JOB:'),
        ('length 0xFFFFFFFF', b'y' * 40 + struct.pack('>L', 0xFFFFFFFF)),
        ('length just over MAX_FRAME', good + struct.pack('>L', 256 * 1024 * 1024 + 1)),
        ('zero-length frame', good + struct.pack('>L', 0)),
        ('tag only', good + frame(b'JOB:')),
        ('no colon', good + frame(b'JOB' + pickle.dumps({}, 2))),
        ('long tag', good + frame(b'A' * 200 + b':' + pickle.dumps(1))),
        ('binary tag', good + frame(b'\xff\xfe\x00:' + pickle.dumps(1))),
        ('truncated pickle', good + frame(b'JOB:' + pickle.dumps({'a': list(range(50))})[:-7])),
        ('auth 39 bytes', good[:39] + ping),
        ('auth 41 bytes', good + b'0' + ping),
        ('auth 0 bytes', ping),
        ('auth 1 byte', b'a' + ping),
        ('non-ascii auth', bytes(range(200, 240)) + ping),
        ('PING wrong version', b'z' * 40 + frame(b'PING:' + pickle.dumps(
            {'version': '9.9', 'port': reply_port, 'sign': 'a', 'ip_addrs': []}))),
        ('PING huge sign', b'z' * 40 + frame(b'PING:' + pickle.dumps(
            {'version': '4.5', 'port': reply_port, 'sign': 'a' * 100000, 'ip_addrs': []}))),
        ('PING bad port', b'z' * 40 + frame(b'PING:' + pickle.dumps(
            {'version': '4.5', 'port': 'x', 'sign': 'a', 'ip_addrs': []}))),
        ('PING many ip_addrs', b'z' * 40 + frame(b'PING:' + pickle.dumps(
            {'version': '4.5', 'port': reply_port, 'sign': 'a',
             'ip_addrs': ['127.0.0.%d' % i for i in range(1, 200)] + [None, 5, 'x']}))),
        ('many MARKs', good + frame(b'CLOSE:' + b'(' * 100000 + b'.')),
    ]
    for name, payload in deep_payloads():
        for tag in TAGS:
            cases.append(('%s: %s' % (tag.decode(), name), good + frame(tag + b':' + payload)))
    for tag in TAGS:
        for payload in (None, 0, -1, 2 ** 70, 'x', b'\x00' * 10, [], [None], {},
                        {'compute_id': 'x', 'auth': None, 'uid': [], 'hash': {}},
                        {'compute_id': 2 ** 80, 'auth': 'a' * 1000, 'uid': -1},
                        {'version': '4.5', 'port': 0, 'sign': None, 'ip_addrs': None},
                        (1, 2), 3.5, float('nan'), True, {1: 2}, set([1])):
            cases.append(('%s with %r' % (tag.decode(), payload)[:60],
                          good + frame(tag + b':' + pickle.dumps(payload, 4))))
    for i in range(40):
        cases.append(('random %d' % i, rbytes(rnd.randint(0, 300))))
        cases.append(('auth + random %d' % i, good + rbytes(rnd.randint(0, 300))))
        tag = rnd.choice(TAGS)
        cases.append(('auth + %s + random frame' % tag.decode(),
                      good + frame(tag + b':' + rbytes(rnd.randint(0, 200)))))
    for name, raw in cases:
        exchange(node.port, raw, timeout=8)
    # ones that keep the connection open: dropped at --msg_timeout (2 s)
    t1 = time.monotonic()
    socks = []
    for raw in (good + struct.pack('>L', 100) + b'JOB:', good[:20], b''):
        s = socket.create_connection(('127.0.0.1', node.port), timeout=10)
        if raw:
            s.sendall(raw)
        socks.append(s)
    for s in socks:
        try:
            assert s.recv(100) == b''     # closed by the node, no answer
        except ConnectionResetError:
            pass
        s.close()
    open_wait = time.monotonic() - t1
    assert open_wait < 6, 'stalled peers were held %.1fs with --msg_timeout 2' % open_wait
    # UDP junk
    for i in range(60):
        udp_send(node.port, rbytes(rnd.randint(0, 1500)))
    for data in (b'PING:', b'PULSE:', b'PING:' + b'\x80\x04' + b'x' * 100,
                 b'PING:' + pickle.dumps({'version': '4.5', 'port': 0}),
                 b'PULSE:' + pickle.dumps({'ip_addr': 5}), b'PULSE:' + pickle.dumps([]),
                 b'PULSE:' + pickle.dumps({'ip_addr': '127.0.0.1'}),
                 b'PING:' + pickle.dumps('x' * 60000), b'PING:' + b'(' * 5000 + b'.'):
        udp_send(node.port, data)
    time.sleep(0.5)
    assert time.monotonic() - t0 < 120
    assert_node_healthy(node, reply_port)
    legit_client(node, tmp_path)
    assert_no_traceback(node)
