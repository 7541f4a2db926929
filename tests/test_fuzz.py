"""Property-based fuzzing (hypothesis) of the protocol layer and the node.

* dispy_common decoders (loads_plain, loads_records, split_tag, recv_msg,
  parse_size) only ever return or raise ProtocolError / ValueError, and the
  loaders only ever produce the types they promise.
* An in-process ``dispynode.Node`` on 127.0.0.1 gets random and mutated
  frames (random tags, auth prefixes and payloads; pickles of plain data and
  of dispy records with random fields): no exception escapes to the
  'dispynode' logger as an ERROR with a traceback, no log message fails to
  format, and the node answers a PING afterwards.

Examples are bounded (DISPYTEST_FUZZ_EXAMPLES, default 150 per property) and
derandomized, so CI runs are reproducible; bench/fuzz_long.py runs a long
campaign with the same strategies.
"""

import collections
import hashlib
import logging
import os
import pickle
import socket
import struct
import sys
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from driver import exchange, frame, raw_ping
from legacy import REPO, free_port

sys.path.insert(0, str(REPO))
import dispy_common as dc  # noqa: E402

EXAMPLES = int(os.environ.get('DISPYTEST_FUZZ_EXAMPLES', '150'))
RANDOM = os.environ.get('DISPYTEST_FUZZ_RANDOM') == '1'     # bench/fuzz_long.py
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=not RANDOM, database=None,
                suppress_health_check=list(HealthCheck))
SECRET = 'fuzz-s3cret'
TAGS = [b'PING', b'COMPUTE', b'FILEXFER', b'SETUP', b'JOB', b'TERMINATE_JOB', b'CLOSE',
        b'RESEND_JOB_RESULTS', b'PENDING_JOBS', b'RETRIEVE_JOB', b'JOBS', b'PONG',
        b'JOB_REPLY', b'PULSE', b'X']
KEYS = ['compute_id', 'auth', 'uid', 'hash', 'terminate_pending', 'version', 'port',
        'sign', 'ip_addrs', 'ip_addr', 'scheduler_ip_addr']

# ---------------------------------------------------------------- strategies

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(-2 ** 70, 2 ** 70),
    st.floats(allow_nan=True), st.text(max_size=30), st.binary(max_size=40),
    st.sampled_from(['4.5', '127.0.0.1', '0.0.0.0', '255.255.255.255', '', '..', '/',
                     'a' * 64, 'abcdef']))
plain_data = st.recursive(
    scalars,
    lambda kids: st.one_of(st.lists(kids, max_size=5), st.tuples(kids, kids),
                           st.dictionaries(st.one_of(st.sampled_from(KEYS), scalars.filter(
                               lambda x: x is None or not isinstance(x, float)
                               or x == x)), kids, max_size=6)),
    max_leaves=20)
request_dicts = st.fixed_dictionaries({}, optional={k: plain_data for k in KEYS})


@st.composite
def records(draw):
    cls = draw(st.sampled_from([dc.Compute, dc.XferFile, dc.DispyJobRecord, dc.JobReply]))
    fields = {}
    for name in cls._fields:
        if draw(st.booleans()):
            fields[name] = draw(plain_data)
    if cls is dc.DispyJobRecord and draw(st.booleans()):
        fields.update(uid=draw(st.integers()), hash=draw(st.text(max_size=20)),
                      args=draw(st.binary(max_size=20)), kwargs=draw(st.binary(max_size=20)),
                      compute_id=draw(st.integers()), xfer_files=[], code='')
    if cls is dc.XferFile and draw(st.booleans()):
        fields['stat_buf'] = os.stat_result(tuple(draw(st.lists(
            st.integers(0, 2 ** 40), min_size=10, max_size=10))))
    return cls(**fields)


@st.composite
def pickles(draw):
    obj = draw(st.one_of(plain_data, request_dicts, records(),
                         st.lists(records(), max_size=3)))
    proto = draw(st.integers(0, 4))
    try:
        return dc.dumps(obj) if proto == 4 else pickle.dumps(obj, proto)
    except Exception:
        return dc.dumps(obj)


@st.composite
def mutated(draw, base):
    data = bytearray(draw(base))
    for _ in range(draw(st.integers(0, 4))):
        op = draw(st.sampled_from(['flip', 'cut', 'insert', 'dup', 'delete']))
        pos = draw(st.integers(0, max(0, len(data))))
        if op == 'flip' and data:
            pos = min(pos, len(data) - 1)
            data[pos] = draw(st.integers(0, 255))
        elif op == 'cut':
            del data[pos:]
        elif op == 'insert':
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif op == 'dup':
            data[pos:pos] = data[pos:pos + draw(st.integers(1, 16))]
        elif op == 'delete':
            del data[pos:pos + draw(st.integers(1, 8))]
    return bytes(data)


payloads = st.one_of(st.binary(max_size=200), pickles(), mutated(pickles()))

# ---------------------------------------------------------------- type checks

_PLAIN = (type(None), bool, int, float, str, bytes)


def _walk(obj, allowed, seen=None):
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return
    seen.add(id(obj))
    assert isinstance(obj, allowed), type(obj)
    if isinstance(obj, (list, tuple, set, frozenset)):
        for x in obj:
            _walk(x, allowed, seen)
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _walk(k, allowed, seen)
            _walk(v, allowed, seen)


# ---------------------------------------------------------------- decoders

@FUZZ
@given(st.one_of(st.binary(max_size=300), pickles(), mutated(pickles())))
def test_loads_plain_only_plain(data):
    """loads_plain returns plain data (no class of any kind) or raises
    ProtocolError."""
    try:
        obj = dc.loads_plain(data)
    except dc.ProtocolError:
        return
    _walk(obj, _PLAIN + (list, tuple, dict))


RECORD_OK = _PLAIN + (list, tuple, dict, set, frozenset, complex, bytearray, slice, range,
                      collections.OrderedDict, os.stat_result, dc.Opaque, dc.Compute,
                      dc.XferFile, dc.DispyJobRecord, dc.JobReply, dc.Function)


@FUZZ
@given(st.one_of(st.binary(max_size=300), pickles(), mutated(pickles())))
def test_loads_records_only_known(data):
    """loads_records returns plain data, our records, stat_result and
    Opaque placeholders only (no other class is imported), or raises
    ProtocolError."""
    try:
        obj = dc.loads_records(data)
    except dc.ProtocolError:
        return
    _walk(obj, RECORD_OK)
    if isinstance(obj, dc._Record):
        _walk(obj.__dict__, RECORD_OK)


@FUZZ
@given(st.binary(max_size=80))
def test_split_tag(msg):
    tag, rest = dc.split_tag(msg)
    if tag is None:
        assert rest == msg
    else:
        assert isinstance(tag, bytes) and tag and tag.replace(b'_', b'').isalpha()
        assert tag + b':' + rest == msg


@FUZZ
@given(st.one_of(st.text(max_size=12), st.integers(-5, 2 ** 40).map(str),
                 st.tuples(st.integers(0, 10 ** 6), st.sampled_from('kKmMgGtT ')).map(
                     lambda t: '%d%s' % t)))
def test_parse_size(text):
    try:
        n = dc.parse_size(text)
    except ValueError:
        return
    assert isinstance(n, int) and n >= 0


@FUZZ
@given(st.one_of(
    st.binary(max_size=64),
    st.tuples(st.binary(max_size=64), st.integers(0, 3)).map(
        lambda t: struct.pack('>L', len(t[0]) + t[1]) + t[0]),       # short by 0..3
    st.integers(0, 2 ** 32 - 1).map(lambda n: struct.pack('>L', n) + b'abc')),
    st.integers(0, 100))
def test_recv_msg_socketpair(stream, limit):
    """recv_msg over a socketpair: returns exactly a well-formed frame's
    payload, else raises ProtocolError (truncated, over the limit, closed);
    never anything else, and never waits past its deadline."""
    a, b = socket.socketpair()
    try:
        a.sendall(stream)
        a.shutdown(socket.SHUT_WR)
        t0 = time.monotonic()
        try:
            got = dc.recv_msg(b, limit, time.monotonic() + 2)
        except dc.ProtocolError:
            got = None
        assert time.monotonic() - t0 < 3
        if len(stream) >= 4:
            size = struct.unpack('>L', stream[:4])[0]
            ok = size <= limit and len(stream) >= 4 + size
            assert (got == stream[4:4 + size]) if ok else got is None, (stream, limit, got)
        else:
            assert got is None
    finally:
        a.close()
        b.close()


def test_recv_msg_deadline_slow_peer():
    """A peer trickling a byte every 0.2 s is cut off at the deadline."""
    a, b = socket.socketpair()
    stop = threading.Event()

    def trickle():
        data = struct.pack('>L', 50) + b'x' * 50
        for i in range(len(data)):
            if stop.wait(0.2):
                return
            try:
                a.send(data[i:i + 1])
            except OSError:
                return
    t = threading.Thread(target=trickle, daemon=True)
    t.start()
    t0 = time.monotonic()
    with pytest.raises(dc.ProtocolError):
        dc.recv_msg(b, None, time.monotonic() + 1.0)
    took = time.monotonic() - t0
    stop.set()
    a.close()
    b.close()
    assert 0.9 < took < 1.6, took


# ---------------------------------------------------------------- the node

class _Capture(logging.Handler):
    """Keeps ERROR records and any record whose message fails to format."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.bad = []

    def emit(self, record):
        try:
            record.getMessage()
        except Exception as exc:  # what a real handler would print as 'Logging error'
            self.bad.append('unformattable %r: %r' % (record.msg, exc))
            return
        if record.levelno >= logging.ERROR or record.exc_info:
            text = record.getMessage()
            if record.exc_info:
                import traceback
                text += '\n' + ''.join(traceback.format_exception(*record.exc_info))
            self.bad.append(text)


@pytest.fixture(scope='module')
def live_node(tmp_path_factory):
    import dispynode
    port = free_port()
    prefix = tmp_path_factory.mktemp('fuzznode') / 'prefix'
    args = dispynode.build_parser().parse_args(
        ['-i', '127.0.0.1', '-p', str(port), '--dest_path_prefix', str(prefix),
         '--msg_timeout', '1', '--zombie_interval', '0', '-s', SECRET])
    cfg = dispynode.resolve_config(args)
    dispynode.prepare_prefix(cfg)
    log = logging.getLogger('dispynode')
    cap = _Capture()
    old_level = log.level
    log.setLevel(logging.DEBUG)
    log.addHandler(cap)
    node = dispynode.Node(cfg)
    node.start()
    try:
        yield node, cap
    finally:
        node.close()
        log.removeHandler(cap)
        log.setLevel(old_level)


def _assert_clean(node, cap):
    assert cap.bad == [], 'node logged errors:\n' + '\n----\n'.join(cap.bad[:5])
    assert raw_ping(node.port)['sign'] == node.sign


@FUZZ
@given(tag=st.sampled_from(TAGS), auth_kind=st.sampled_from(['good', 'wrong', 'random']),
       rnd_auth=st.binary(max_size=45), payload=payloads,
       tail=st.one_of(st.just(b''), st.binary(max_size=20)))
def test_node_tcp_frames(live_node, tag, auth_kind, rnd_auth, payload, tail):
    """Random and mutated frames to every tag, with the right auth, a wrong
    one, or random prefixes: no error escapes, the node keeps answering."""
    node, cap = live_node
    good = hashlib.sha1((SECRET + node.sign).encode()).hexdigest().encode()
    auth = {'good': good, 'wrong': b'f' * 40, 'random': rnd_auth}[auth_kind]
    exchange(node.port, auth + frame(tag + b':' + payload) + tail)
    assert cap.bad == [], 'node logged errors:\n' + '\n----\n'.join(cap.bad[:5])


@FUZZ
@given(st.one_of(st.binary(max_size=300),
                 st.tuples(st.sampled_from([b'PING:', b'PULSE:', b'X:', b'']), payloads).map(
                     lambda t: t[0] + t[1])))
def test_node_udp_datagrams(live_node, data):
    """Random UDP PING:/PULSE: datagrams are ignored or answered safely."""
    node, cap = live_node
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.sendto(data, ('127.0.0.1', node.port))
    assert cap.bad == [], 'node logged errors:\n' + '\n----\n'.join(cap.bad[:5])


def test_node_still_serves_after_fuzz(live_node):
    """After the fuzz campaigns (module-scoped node): no error records and a
    PING is answered with the node's sign."""
    node, cap = live_node
    time.sleep(0.5)      # let UDP and spawned PONG senders finish
    _assert_clean(node, cap)
    assert threading.active_count() < 60, sorted(t.name for t in threading.enumerate())
