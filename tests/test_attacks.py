"""Attacks by a peer that does not hold the secret, and by token holders
against each other: each finding of the red team, as a regression test.

Without the secret a peer can only get a PONG; nothing it sends costs the
node unbounded time, memory, threads, descriptors, disk or log.
"""

import os
import pickle
import pwd
import shutil
import signal
import socket
import struct
import tempfile
import time
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

import dispy_common as dc
from driver import (JUNK_AUTH, Driver, accept_each, NodeProcess, ReplyServer, exchange, frame,
                    free_port, random_hex, raw_ping, wait_for)
from legacy import check_client, find_files, run_client
from nodes import NodeProc, python_for, run_to_exit

SECRET = 'attack-s3cret'
FINISHED, TERMINATED = dc.DispyJob.Finished, dc.DispyJob.Terminated


# ---------------------------------------------------------------- helpers

def start(tmp_path, *args, secret=SECRET, **kw):
    return NodeProcess.start(tmp_path, args=('-s', secret, '--zombie_interval', '0') + args,
                             **kw)


@pytest.fixture
def node(tmp_path):
    n = start(tmp_path)
    yield n
    n.stop()


def udp_send(port, data, source='127.0.0.1'):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.bind((source, 0))
        udp.sendto(data, ('127.0.0.1', port))


def proc_counts(pid):
    """(threads, open descriptors) of a process."""
    with open('/proc/%d/status' % pid) as fh:
        threads = int(next(line for line in fh if line.startswith('Threads:')).split()[1])
    return threads, len(os.listdir('/proc/%d/fd' % pid))


def rss_kb(pid):
    with open('/proc/%d/status' % pid) as fh:
        return int(next(line for line in fh if line.startswith('VmRSS:')).split()[1])


def store_one_result(drv, tmp_path):
    """A computation with job 1's result stored (its client did not ACK)."""
    answer, comp = drv.compute('def f(x):\n    return x + 1\n', 'f')
    assert answer == b'ACK'
    assert drv.job(comp.id, 1, (41,)) == b'ACK'
    assert wait_for(lambda: drv.server.unacked, 10)
    return comp


# ---------------------------------------------------------------- the token oracle

def test_no_pong_names_the_nodes_own_an_empty_or_a_malformed_sign(node):
    client_sign = random_hex(10)
    pong = raw_ping(node.port, client_sign)
    assert pong['auth'] == dc.auth_code(SECRET, client_sign)
    own = pong['sign']
    for sign in (own, '', 'a', 'zz' * 10, 'a' * 65, None, 5, ['x']):
        assert raw_ping(node.port, sign) is None, sign
    # Nor over UDP, where the PONG would go to an address the PING names.
    server = ReplyServer()
    try:
        info = {'version': '4.5', 'sign': own, 'port': server.port, 'ip_addrs': ['127.0.0.1']}
        udp_send(node.port, b'PING:' + pickle.dumps(info, 4))
        assert server.wait('PONG', 1.5) is None
        info['sign'] = client_sign        # control: a client's sign is answered
        udp_send(node.port, b'PING:' + pickle.dumps(info, 4))
        assert server.wait('PONG', 5).obj['auth'] == dc.auth_code(SECRET, client_sign)
    finally:
        server.close()


def test_no_pong_names_another_nodes_sign(tmp_path):
    a = start(tmp_path / 'a')
    b = start(tmp_path / 'b')
    c = start(tmp_path / 'c', secret='another-secret')
    try:
        sign_b = raw_ping(b.port, random_hex(10))['sign']
        sign_c = raw_ping(c.port, random_hex(10))['sign']
        assert dc.is_node_sign(SECRET, sign_b) and not dc.is_node_sign(SECRET, sign_c)
        assert raw_ping(a.port, sign_b) is None          # b's token stays b's
        # A node of another cluster is a stranger: its sign is a plain sign.
        assert raw_ping(a.port, sign_c)['auth'] == dc.auth_code(SECRET, sign_c)
    finally:
        for n in (a, b, c):
            n.stop()


def test_an_earlier_runs_sign_and_token(tmp_path):
    """After a restart: no PONG for the earlier sign; its token reaches the
    restored computation's recovery messages only, never a new computation."""
    prefix = tmp_path / 'prefix'
    first = start(tmp_path, prefix=prefix)
    old = Driver('127.0.0.1', first.port, secret=SECRET, server=ReplyServer(ack=False))
    old.ping_tcp()
    old_comp = store_one_result(old, tmp_path)
    first.stop()
    old_token = old.auth

    second = start(tmp_path, prefix=prefix, port=first.port)
    try:
        assert 'restored 1 stored result' in second.log()
        assert raw_ping(second.port, old.node_sign) is None
        new = Driver('127.0.0.1', second.port, secret=SECRET)
        new.ping_tcp()
        answer, comp = new.compute('def g(t):\n    import time\n    time.sleep(t)\n'
                                   '    return t\n', 'g')
        assert answer == b'ACK'
        assert new.job(comp.id, 7, (2,)) == b'ACK'
        # The old token: CLOSE of the new computation is refused ...
        new.request(b'CLOSE', {'compute_id': comp.id, 'auth': comp.auth,
                               'terminate_pending': True}, auth=old_token)
        # ... and a JOB is no recovery message at all.
        assert new.request(b'JOBS', {'compute_id': comp.id, 'auth': comp.auth},
                           auth=old_token) is None
        assert [j['uid'] for j in new.jobs(comp.id)] == [7]
        assert new.server.wait_reply(7, 10).status == FINISHED
        # The old token still recovers the restored computation's result.
        assert old.resend(old_comp.id) == 1
        assert old.retrieve(old_comp.id, 1).result == 42
    finally:
        second.stop()


# ---------------------------------------------------------------- decoding bombs

def hash_bomb(depth=64):
    """A PING whose dict key is A_depth, A_k = (A_k-1, A_k-1) through the memo:
    hashing it costs 2**depth steps (461 bytes at depth 64)."""
    out = bytearray(b'\x80\x04}\x94(\x8c\x07version\x94\x8c\x034.5\x94)\x94')
    for k in range(1, depth + 1):
        out += b'h' + bytes([k + 1]) + b'h' + bytes([k + 1]) + b'\x86\x94'
    out += b'K\x01u.'
    return bytes(out)


BOMBS = {
    'hash': hash_bomb(),
    'nesting': b'\x80\x04' + b']' * 20000 + b'a' * 19999 + b'.',
    'huge int': b'\x80\x04\x8b' + struct.pack('<i', 40000) + b'\x01' * 40000 + b'.',
    'wide list': b'\x80\x04](' + b'N' * 60000 + b'e.',
    'long str': b'\x80\x04X' + struct.pack('<I', 60000) + b'x' * 60000 + b'.',
    'shared list': (b'\x80\x04]\x94' + b'h\x00' * 30000 + b'\x85.'),
}


@pytest.mark.parametrize('name', sorted(BOMBS))
def test_unauthenticated_decoder_bounded(name):
    data = BOMBS[name]
    t0 = time.process_time()
    try:
        obj = dc.loads_unauth(data)
    except dc.ProtocolError:
        obj = None
    assert time.process_time() - t0 < 1.0, name     # a bomb would take years
    assert obj is None or name in ('wide list', 'long str')


def test_hash_bomb_over_udp_and_tcp_leaves_the_node_answering(node):
    bomb = b'PING:' + hash_bomb()
    assert len(bomb) < 500
    for _ in range(3):
        udp_send(node.port, bomb)
        exchange(node.port, JUNK_AUTH + frame(bomb), timeout=1)
    t0 = time.monotonic()
    pong = raw_ping(node.port, random_hex(10))
    assert pong is not None and time.monotonic() - t0 < 1.0


_plain = st.recursive(
    st.none() | st.booleans() | st.integers(-2 ** 100, 2 ** 100) | st.floats(allow_nan=False)
    | st.text(max_size=20) | st.binary(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.tuples(inner, inner)
    | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=20)


@settings(max_examples=150, deadline=None)
@given(_plain, st.sampled_from([3, 4]))
def test_unauthenticated_decoder_reads_plain_pickles(obj, protocol):
    data = pickle.dumps(obj, protocol)
    try:
        assert dc.loads_unauth(data) == obj
    except dc.ProtocolError as exc:
        assert 'nesting' in str(exc) or 'integer' in str(exc)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_unauthenticated_decoder_never_crashes(data):
    for candidate in (data, b'\x80\x04' + data):
        try:
            dc.loads_unauth(candidate)
        except dc.ProtocolError:
            pass


# ---------------------------------------------------------------- floods

def _blackhole():
    """A listener whose backlog is full: further SYNs are dropped, so a
    connect to it hangs, like a target that never answers."""
    hole = socket.socket()
    hole.bind(('0.0.0.0', 0))
    hole.listen(0)
    fillers = []
    for _ in range(4):
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(('127.0.0.1', hole.getsockname()[1]))
        fillers.append(filler)
    return hole, fillers


def test_ping_flood_with_unanswered_targets_is_bounded(node, legacy_python, client_port):
    hole, fillers = _blackhole()
    port = hole.getsockname()[1]
    pid = node.proc.pid
    peak = [0, 0]
    try:
        deadline = time.monotonic() + 4.0
        sent = 0
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            while time.monotonic() < deadline and sent < 3000:
                info = {'version': '4.5', 'sign': random_hex(10), 'port': port,
                        'ip_addrs': ['127.0.0.%d' % (2 + i) for i in range(8)]}
                udp.sendto(b'PING:' + pickle.dumps(info, 4), ('127.0.0.1', node.port))
                sent += 1
                if sent % 25 == 0:
                    counts = proc_counts(pid)
                    peak = [max(a, b) for a, b in zip(peak, counts)]
                    time.sleep(0.02)
    finally:
        hole.close()
        for filler in fillers:
            filler.close()
    assert sent >= 1000
    # main, tcp-server, reception, udp, timer, task pool, 2 pong threads
    assert peak[0] <= 16, 'threads peaked at %d' % peak[0]
    assert peak[1] <= 48, 'descriptors peaked at %d' % peak[1]
    res = run_client('basic_jobs.py', node.port, client_port, 'jobs=3',
                     'secret=%s' % SECRET, timeout=60)
    data = check_client(res)
    assert [j['status'] for j in data['jobs']] == [FINISHED] * 3


def test_pong_amplification_is_bounded(node):
    """PINGs listing 8 addresses: the node connects to at most 2 of them,
    at most once per answered PING, and sends about what it received."""
    target = socket.socket()
    target.bind(('0.0.0.0', 0))
    target.listen(256)
    target.settimeout(0.2)
    port = target.getsockname()[1]
    sent_bytes, pings = 0, 100
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        for _ in range(pings):
            info = {'version': '4.5', 'sign': random_hex(10), 'port': port,
                    'ip_addrs': ['127.0.0.%d' % (2 + i) for i in range(8)]}
            data = b'PING:' + pickle.dumps(info, 4)
            sent_bytes += len(data)
            udp.sendto(data, ('127.0.0.1', node.port))
    received, addresses, connections = [0], set(), [0]

    def count(conn):
        addresses.add(conn.getsockname()[0])
        connections[0] += 1
        conn.settimeout(2)
        for chunk in iter(lambda: conn.recv(65536), b''):
            received[0] += len(chunk)
    accept_each(target, 2.0, count, quiet=True)
    target.close()
    received, connections = received[0], connections[0]
    assert addresses <= {'127.0.0.2', '127.0.0.3'}, addresses
    assert 0 < connections <= 2 * pings
    assert received <= 2 * sent_bytes, (received, sent_bytes)


def test_pulses_resend_stored_results_once_per_retry_interval(node, tmp_path):
    drv = Driver('127.0.0.1', node.port, secret=SECRET, server=ReplyServer(ack=False))
    drv.ping_tcp()
    store_one_result(drv, tmp_path)
    wait_for(lambda: find_files(node.prefix, '_dispy_job_reply_1'), 5)
    before = len(drv.server.unacked)
    pulse = b'PULSE:' + pickle.dumps({'ip_addr': '127.0.0.1', 'port': drv.server.port}, 4)
    for _ in range(300):
        udp_send(node.port, pulse)
        time.sleep(0.005)
    time.sleep(1.0)
    # Unbounded, each pulse re-read and re-sent the result: 300 deliveries.
    assert len(drv.server.unacked) - before <= 1


def test_log_lines_for_refusals_are_rate_limited(node):
    lines_before = node.log().count('\n')
    junk = JUNK_AUTH + frame(b'COMPUTE:' + pickle.dumps({'x': 1}, 4))
    for _ in range(1500):
        with socket.create_connection(('127.0.0.1', node.port), timeout=3) as s:
            s.sendall(junk)
    for _ in range(1500):
        udp_send(node.port, b'PING:junk')
        udp_send(node.port, b'NOT-A-TAG')
    assert wait_for(lambda: raw_ping(node.port, random_hex(10)), 10)
    new_lines = node.log().count('\n') - lines_before
    assert new_lines < 40, node.log()[-3000:]


# ---------------------------------------------------------------- token holders

def test_requests_without_the_computations_auth_are_refused(node):
    drv = Driver('127.0.0.1', node.port, secret=SECRET, server=ReplyServer(ack=False))
    drv.ping_tcp()
    answer, comp = drv.compute('def f(x):\n    import time\n    time.sleep(x)\n'
                               '    return x\n', 'f')
    assert drv.job(comp.id, 1, (0,)) == b'ACK'
    assert wait_for(lambda: drv.server.unacked, 10)
    assert drv.job(comp.id, 2, (30,)) == b'ACK'
    bare = {'compute_id': comp.id}
    assert dc.loads_full(drv.request(b'JOBS', bare)) == []
    assert dc.loads_full(drv.request(b'PENDING_JOBS', bare)) == {'done': [], 'pending': 0}
    assert dc.loads_full(drv.request(b'RETRIEVE_JOB', dict(bare, uid=1,
                                                           hash=drv.job_hashes[1]))) is None
    assert dc.loads_full(drv.request(b'RESEND_JOB_RESULTS', bare)) == 0
    drv.request(b'CLOSE', dict(bare, terminate_pending=True))
    drv.request(b'CLOSE', dict(bare, auth=None, terminate_pending=True))
    time.sleep(0.5)
    assert [j['uid'] for j in drv.jobs(comp.id)] == [2]          # still running
    assert drv.pending_jobs(comp.id) == {'done': [1], 'pending': 1}
    assert drv.retrieve(comp.id, 1).result == 0                  # still stored
    drv.close(comp.id, terminate_pending=True)


ABSURD = [
    ('id', 10 ** 5000), ('id', -1), ('id', True), ('name', 'x' * 5000), ('name', ''),
    ('pulse_interval', float('inf')), ('pulse_interval', float('nan')),
    ('pulse_interval', -1), ('auth', 'g' * 10), ('scheduler_port', 70000),
    ('job_result_port', 0), ('setup', 'not a function'), ('dest_path', 'x' * 5000),
]


@pytest.mark.parametrize('field,value', ABSURD,
                         ids=['%s-%d' % (f, i) for i, (f, _) in enumerate(ABSURD)])
def test_absurd_compute_fields_are_refused_and_leave_the_node_free(node, field, value):
    drv = Driver('127.0.0.1', node.port, secret=SECRET)
    drv.ping_tcp()
    bad = drv.make_compute('def f(x):\n    return x\n', 'f')
    setattr(bad, field, value)
    answer = drv.request(b'COMPUTE', bad)
    assert answer is not None and answer.startswith(b'NAK'), answer
    other = Driver('127.0.0.1', node.port, secret=SECRET)       # another client
    other.ping_tcp()
    answer, comp = other.compute('def f(x):\n    return x\n', 'f')
    assert answer == b'ACK'
    assert other.job(comp.id, 1, (5,)) == b'ACK'
    assert other.server.wait_reply(1).result == 5
    other.close(comp.id)


def test_frame_memory_budget(tmp_path):
    node = start(tmp_path, '--max_request_size', '8m', '--max_request_memory', '12m')
    drv = Driver('127.0.0.1', node.port, secret=SECRET)
    drv.ping_tcp()
    try:
        base = rss_kb(node.proc.pid)
        held = socket.create_connection(('127.0.0.1', node.port))
        held.sendall(drv.auth + struct.pack('>L', 8 << 20) + b'x' * (1 << 20))
        time.sleep(0.3)
        body = b'JOB:' + b'\0' * ((8 << 20) - 4)
        refused = exchange(node.port, drv.auth + frame(body), timeout=10)
        assert b'NAK (node is receiving too much data' in refused, refused[:100]
        too_big = exchange(node.port, drv.auth + frame(b'JOB:' + b'\0' * (9 << 20)), timeout=10)
        assert b'over the limit of 8388608 bytes: --max_request_size' in too_big
        assert rss_kb(node.proc.pid) - base < 30 * 1024
        held.close()
        time.sleep(0.3)
        # The budget is back: the same 8 MiB request is read and judged.
        judged = exchange(node.port, drv.auth + frame(body), timeout=10)
        assert judged[4:].startswith(b'NAK (invalid'), judged[:100]
        assert 'refused a request of' in node.log()
    finally:
        node.stop()


# ---------------------------------------------------------------- the prefix

def _run_node(args, tmp_path):
    """Our node on 127.0.0.1 run to its exit: (exit code, stdout + stderr)."""
    res = run_to_exit(['-i', '127.0.0.1', '-p', str(free_port())] + args, tmp_path)
    return res.returncode, res.stdout + res.stderr


def test_symlinked_or_foreign_prefix_is_refused(tmp_path):
    real = tmp_path / 'real'
    real.mkdir()
    link = tmp_path / 'link'
    link.symlink_to(real)
    code, out = _run_node(['--dest_path_prefix', str(link)], tmp_path)
    assert code == 2 and 'is a symlink' in out, out
    shared = Path(tempfile.mkdtemp(prefix='ww-', dir='/tmp'))
    try:
        shared.chmod(0o1777)
        planted = shared / 'dispy'
        planted.mkdir()
        os.chown(str(planted), pwd.getpwnam('nobody').pw_uid, -1)
        code, out = _run_node(['--dest_path_prefix', str(planted / 'node')], tmp_path)
        assert code == 2 and 'owned by another user' in out, out
        assert not (planted / 'node').exists()
        (shared / 'evil').symlink_to(real)
        code, out = _run_node(['--dest_path_prefix', str(shared / 'evil' / 'node')], tmp_path)
        assert code == 2 and 'is a symlink' in out, out
    finally:
        shutil.rmtree(str(shared))


def test_clean_does_not_follow_symlinks(tmp_path):
    outside = tmp_path / 'outside'
    (outside / 'sub').mkdir(parents=True)
    (outside / 'keep.txt').write_text('precious')
    (outside / 'sub' / 'keep2.txt').write_text('precious')
    prefix = tmp_path / 'prefix'
    prefix.mkdir()
    (prefix / 'link').symlink_to(outside)
    (prefix / '127.0.0.1').mkdir()
    (prefix / '127.0.0.1' / 'inner').symlink_to(outside / 'sub')
    node = start(tmp_path, '--clean', prefix=prefix)
    try:
        # Only what the node made since: its control socket and prefix lock.
        assert sorted(os.listdir(str(prefix))) == ['.dispynode-control', '.dispynode-lock']
        assert (outside / 'keep.txt').read_text() == 'precious'
        assert (outside / 'sub' / 'keep2.txt').read_text() == 'precious'
        assert oct(prefix.stat().st_mode & 0o777) == '0o700'
    finally:
        node.stop()


def test_dest_path_through_a_planted_symlink_creates_nothing_outside(node, tmp_path):
    outside = tmp_path / 'outside'
    outside.mkdir()
    client_dir = node.prefix / '127.0.0.1'
    client_dir.mkdir(exist_ok=True)
    (client_dir / 'planted').symlink_to(outside)
    drv = Driver('127.0.0.1', node.port, secret=SECRET)
    drv.ping_tcp()
    answer, _ = drv.compute('def f(x):\n    return x\n', 'f', dest_path='planted/deeper/x')
    assert answer == b'NAK (Invalid dest_path)'
    assert os.listdir(str(outside)) == []


def test_store_is_private(node):
    drv = Driver('127.0.0.1', node.port, secret=SECRET, server=ReplyServer(ack=False))
    drv.ping_tcp()
    store_one_result(drv, None)
    reply = wait_for(lambda: find_files(node.prefix, '_dispy_job_reply_1'), 5)
    records = [p for p in node.prefix.iterdir() if p.is_file()]
    assert reply and records
    for path in reply + records:
        assert path.stat().st_mode & 0o077 == 0, path
    for path in [node.prefix] + [Path(top) / d for top, dirs, _ in os.walk(str(node.prefix))
                                 for d in dirs]:
        assert path.stat().st_mode & 0o077 == 0, path


# ---------------------------------------------------------------- --job_user

def test_job_user_cannot_read_the_store_or_the_nodes_environment(tmp_path):
    python = python_for('nobody')
    # the job user reads the node file: a folder it may enter, not tmp_path
    workdir = Path(tempfile.mkdtemp(prefix='dispynode-deploy-', dir='/tmp'))
    try:
        workdir.chmod(0o755)
        prefix = workdir / 'deploy' / 'prefix'
        node = NodeProc.start(workdir, ['--job_user', 'nobody'], copy_as='dispynode.py',
                              python=python, prefix=prefix, timeout=20,
                              env={'DISPYNODE_SECRET': SECRET})
        proc, port = node.proc, node.port
        try:
            drv = Driver('127.0.0.1', port, secret=SECRET, server=ReplyServer(ack=False))
            drv.ping_tcp()
            code = ('def probe(node_pid, stored="_dispy_job_reply_1"):\n'
                    '    import os\n'
                    '    found = {"uid": os.getuid(), "secret": "DISPYNODE_SECRET" in os.environ}\n'
                    '    for path in ("/proc/%%d/environ" %% node_pid, stored, %r):\n'
                    '        try:\n'
                    '            open(path, "rb").read() if not os.path.isdir(path) '
                    'else os.listdir(path)\n'
                    '            found[path if path != stored else "stored"] = "read"\n'
                    '        except OSError as exc:\n'
                    '            found[path if path != stored else "stored"] = '
                    'type(exc).__name__\n'
                    '    return found\n') % str(prefix)
            answer, comp = drv.compute(code, 'probe', dest_path='work')
            assert answer == b'ACK'
            assert drv.job(comp.id, 1, (proc.pid,)) == b'ACK'      # its reply gets stored
            stored = wait_for(lambda: find_files(prefix, '_dispy_job_reply_1'), 10)
            assert stored
            # Still no ACK, so job 1's reply stays in the store meanwhile
            # (job 2 tries to read it where it lies); job 2's is stored too,
            # and fetched as recover_jobs would.
            assert drv.job(comp.id, 2, (proc.pid, str(stored[0]))) == b'ACK'
            assert wait_for(lambda: find_files(prefix, '_dispy_job_reply_2'), 15)
            reply = drv.retrieve(comp.id, 2)
            assert reply is not None and reply.status == FINISHED, reply and reply.exception
            found = reply.result
            assert found['uid'] == pwd.getpwnam('nobody').pw_uid
            assert found['secret'] is False
            assert found['/proc/%d/environ' % proc.pid] == 'PermissionError'
            assert found['stored'] == 'PermissionError'
            assert found[str(prefix)] == 'PermissionError'
        finally:
            node.stop(signal.SIGTERM, 15)
    finally:
        shutil.rmtree(str(workdir), ignore_errors=True)
