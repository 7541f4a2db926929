"""Request handlers of our node, driven by tests/driver.py (a dispy 4.5
client written with dispy_common) against dispynode.py as a subprocess on
127.0.0.1.  Current Python only; no legacy stack."""

import glob
import os
import pickle
import time

import pytest

import driver  # noqa: F401  (puts the repository on sys.path)
from driver import Driver, InProcessNode, wait_for
import dispy_common as dc

DOUBLE = 'def double(x):\n    print("doubling", x)\n    return 2 * x\n'
SLEEPER = 'import time\ndef sleeper(t):\n    time.sleep(t)\n    return t\n'


@pytest.fixture
def unit_nodes(tmp_path):
    nodes, drivers = [], []

    def start(args=(), **kw):
        node = InProcessNode.start(tmp_path / ('n%d' % len(nodes)), args=args, **kw)
        nodes.append(node)
        return node

    start.drivers = drivers
    yield start
    for drv in drivers:
        drv.close_server()
    for node in nodes:
        node.stop_async()


@pytest.fixture
def node(unit_nodes):
    return unit_nodes()


@pytest.fixture
def drv(node, unit_nodes):
    d = Driver('127.0.0.1', node.port)
    unit_nodes.drivers.append(d)
    assert d.ping_tcp() is not None
    return d


def new_driver(node, unit_nodes, **kw):
    d = Driver('127.0.0.1', node.port, **kw)
    unit_nodes.drivers.append(d)
    d.ping_tcp()
    return d


def reply_file(comp_dir, uid):
    """Where the node stores job ``uid``'s reply for the computation in
    ``comp_dir``: <prefix>/.replies/<id>_<auth>/ (one computation only)."""
    prefix = os.path.dirname(os.path.dirname(comp_dir))
    found = glob.glob(os.path.join(prefix, '.replies', '*', '_dispy_job_reply_%d' % uid))
    return found[0] if found else os.path.join(prefix, '.replies', '_dispy_job_reply_%d' % uid)


def comp_dir(node, drv_or_name):
    """The computation's directory under the node's prefix (one only)."""
    base = node.prefix / '127.0.0.1'
    dirs = [d for d in base.iterdir() if d.is_dir()] if base.is_dir() else []
    assert len(dirs) == 1, dirs
    return str(dirs[0])


# ---------------------------------------------------------------- PING

def test_ping_answers_pong_with_auth_for_our_sign(node, unit_nodes):
    d = Driver('127.0.0.1', node.port, secret='')
    unit_nodes.drivers.append(d)
    pong = d.ping_tcp()
    assert pong['version'] == '4.5'
    assert pong['auth'] == dc.auth_code('', d.sign)
    assert pong['port'] == node.port
    assert pong['ip_addr'] == '127.0.0.1'
    assert isinstance(pong['sign'], str) and len(pong['sign']) == 20
    assert pong['cpus'] >= 1
    assert d.auth == dc.auth_code('', pong['sign'])
    # a free node also sends PONG: to the client's own TCP server
    message = d.server.wait('PONG', 5)
    assert message is not None and message.obj['auth'] == pong['auth']


def test_ping_auth_uses_secret(unit_nodes):
    node = unit_nodes(args=['-s', 'sesame'])
    d = new_driver(node, unit_nodes, secret='sesame')
    pong = d.ping_tcp()
    assert pong['auth'] == dc.auth_code('sesame', d.sign)
    answer, _ = d.compute(DOUBLE, 'double')
    assert answer == b'ACK'


def test_ping_sign_is_stable_per_node_run(node, drv):
    first = drv.node_sign
    assert drv.ping_tcp()['sign'] == first


@pytest.mark.parametrize('info', [
    {'version': '4.4', 'sign': 'ab', 'port': 1234, 'ip_addrs': []},
    {'version': '4.5', 'sign': 'ab', 'port': 0, 'ip_addrs': []},
    {'version': '4.5', 'sign': 7, 'port': 1234, 'ip_addrs': []},
    {'version': '4.5', 'sign': 'x' * 100, 'port': 1234, 'ip_addrs': []},
    ['not', 'a', 'dict'],
])
def test_malformed_ping_gets_no_pong(drv, info):
    assert drv.request(b'PING', dc.dumps_plain(info), raw=True) is None


def test_ping_with_malicious_pickle_runs_nothing(drv, tmp_path):
    marker = tmp_path / 'pwned'

    class Evil:
        def __reduce__(self):
            return (os.system, ('touch %s' % marker,))

    answer = drv.request(b'PING', pickle.dumps({'version': '4.5', 'x': Evil()}, 4), raw=True)
    assert answer == b'NAK (invalid request)'
    time.sleep(0.2)
    assert not marker.exists()


# ---------------------------------------------------------------- auth

def test_wrong_auth_gets_no_reply_and_changes_nothing(node, drv, unit_nodes):
    compute = drv.make_compute(DOUBLE, 'double')
    assert drv.request(b'COMPUTE', compute, auth=b'0' * 40) is None
    assert drv.request(b'COMPUTE', compute, auth=dc.auth_code('wrong', drv.node_sign)) is None
    assert drv.request(b'COMPUTE', compute, auth=drv.auth[:-1] + b'?') is None
    assert not (node.prefix / '127.0.0.1').exists() or \
        not any((node.prefix / '127.0.0.1').iterdir())
    # the node was not claimed: a correct request from another client works
    other = new_driver(node, unit_nodes)
    assert other.compute(DOUBLE, 'double')[0] == b'ACK'


def test_wrong_secret_gets_no_reply(unit_nodes):
    node = unit_nodes(args=['--secret', 'right'])
    d = new_driver(node, unit_nodes, secret='wrong')
    assert d.compute(DOUBLE, 'double')[0] is None


def test_short_auth_then_eof_is_dropped(node, drv):
    with drv.connect() as sock:
        sock.sendall(b'abc')
        sock.shutdown(1)
        assert drv._recv(sock) is None
    assert drv.ping_tcp() is not None      # the node still serves


def test_oversized_frame_is_refused_at_once(node, drv):
    with drv.connect() as sock:
        sock.sendall(drv.auth + b'\xff\xff\xff\xf0' + b'JOB:')
        answer = drv._recv(sock)
    assert answer == (b'NAK (request of 4294967280 bytes is over the limit of 1073741824 '
                      b'bytes: --max_request_size)'), answer
    assert drv.ping_tcp() is not None


def test_unknown_tag_is_refused(drv):
    answer = drv.request(b'FROBNICATE', {'a': 1})
    assert answer is not None and answer.startswith(b'NAK (invalid command')
    answer = drv.request(b'', b'junk without a tag', raw=True)
    assert answer.startswith(b'NAK (invalid command')


def test_undecodable_payload_is_refused(drv):
    assert drv.request(b'JOB', b'\x80\x04garbage', raw=True) == b'NAK (invalid request)'


# ---------------------------------------------------------------- COMPUTE

def test_compute_ack_creates_directory(node, drv):
    answer, compute = drv.compute(DOUBLE, 'double')
    assert answer == b'ACK'
    path = comp_dir(node, drv)
    assert os.path.basename(path).startswith('double_')
    # the computation record is stored under the prefix (for recovery)
    assert (node.prefix / ('%d_%s' % (compute.id, compute.auth))).is_file()


def test_compute_with_dest_path(node, drv):
    answer, _ = drv.compute(DOUBLE, 'double', dest_path='sub/dir')
    assert answer == b'ACK'
    assert (node.prefix / '127.0.0.1' / 'sub' / 'dir').is_dir()


def test_second_scheduler_is_busy(node, drv, unit_nodes):
    assert drv.compute(DOUBLE, 'double')[0] == b'ACK'
    other = new_driver(node, unit_nodes)
    assert other.compute(DOUBLE, 'double')[0] == b'Busy'
    # the first scheduler may add another computation
    assert drv.compute(SLEEPER, 'sleeper')[0] == b'ACK'


def test_busy_node_does_not_pong(node, drv, unit_nodes):
    assert drv.compute(DOUBLE, 'double')[0] == b'ACK'
    other = new_driver(node, unit_nodes)
    # the pong pool has decided (it logs why) before we look
    assert wait_for(lambda: 'not answering PING from 127.0.0.1' in node.log(), 5)
    assert other.server.wait('PONG', 0.1) is None


@pytest.mark.parametrize('dest', ['/abs', '../x', 'a/../../x', '..', 'C:\\x', '\\\\srv\\x'])
def test_bad_dest_path_is_refused(node, drv, dest):
    answer, _ = drv.compute(DOUBLE, 'double', dest_path=dest)
    assert answer is not None and answer.startswith(b'NAK')
    assert not os.path.exists('/abs') or dest != '/abs'
    assert not (node.prefix / 'x').exists()
    # refused computations do not claim the node
    assert drv.compute(DOUBLE, 'double')[0] == b'ACK'


def test_symlinked_dest_path_escaping_is_refused(node, drv, tmp_path):
    base = node.prefix / '127.0.0.1'
    base.mkdir(parents=True, exist_ok=True)
    outside = tmp_path / 'outside'
    outside.mkdir()
    os.symlink(str(outside), str(base / 'link'))
    answer, _ = drv.compute(DOUBLE, 'double', dest_path='link/sub')
    assert answer is not None and answer.startswith(b'NAK')
    assert not (outside / 'sub').exists() or not any((outside / 'sub').iterdir())


@pytest.mark.parametrize('field, value', [
    ('id', 'one'), ('type', 3), ('name', ''), ('auth', '../../etc'),
    ('scheduler_ip_addr', 'not-an-ip'), ('job_result_port', 0), ('code', b'bytes'),
    ('pulse_interval', 'soon'),
])
def test_invalid_compute_is_refused(drv, field, value):
    compute = drv.make_compute(DOUBLE, 'double')
    setattr(compute, field, value)
    answer = drv.request(b'COMPUTE', compute)
    assert answer is not None and answer.startswith(b'NAK')


def test_compute_with_syntax_error_is_refused(drv):
    answer, _ = drv.compute('def broken(:\n', 'broken')
    assert answer.startswith(b'NAK (Compilation failed')


def test_compute_that_is_not_a_record_is_refused(drv):
    assert drv.request(b'COMPUTE', {'id': 1}) == b'NAK (invalid computation request)'


# ---------------------------------------------------------------- FILEXFER

def test_filexfer_stream_then_same_file_ack(node, drv, tmp_path):
    data = os.urandom(300000)
    src = tmp_path / 'data.bin'
    src.write_bytes(data)
    os.chmod(str(src), 0o640)
    answer, compute = drv.compute(DOUBLE, 'double',
                                  xfer_files=[drv.xfer_file(src, None)])
    assert answer == b'ACK'
    first, final = drv.xfer(src, compute.id)
    assert (first, final) == (b'NAK', b'ACK')
    target = os.path.join(comp_dir(node, drv), 'data.bin')
    assert open(target, 'rb').read() == data
    st = os.stat(target)
    assert abs(st.st_mtime - src.stat().st_mtime) < 1
    assert st.st_mode & 0o777 == 0o640
    # the same file again: the node already has it
    assert drv.xfer(src, compute.id) == (b'ACK', None)
    # a changed file is streamed again
    src.write_bytes(data[:1000])
    assert drv.xfer(src, compute.id) == (b'NAK', b'ACK')
    assert open(target, 'rb').read() == data[:1000]


def test_filexfer_short_stream_leaves_no_file(node, drv, tmp_path):
    src = tmp_path / 'cut.bin'
    src.write_bytes(b'x' * 5000)
    answer, compute = drv.compute(DOUBLE, 'double')
    first, final = drv.xfer(src, compute.id, data=b'x' * 100)
    assert first == b'NAK'
    assert final is not None and final.startswith(b'NAK (read only 100')
    assert os.listdir(comp_dir(node, drv)) == []


def test_filexfer_strips_directories_and_setuid(node, drv, tmp_path):
    src = tmp_path / 'tool.sh'
    src.write_bytes(b'#!/bin/sh\n')
    os.chmod(str(src), 0o4755)
    _, compute = drv.compute(DOUBLE, 'double')
    assert drv.xfer(src, compute.id, name='/etc/../../tool.sh') == (b'NAK', b'ACK')
    target = os.path.join(comp_dir(node, drv), 'tool.sh')
    assert os.stat(target).st_mode & 0o7777 == 0o755


def test_filexfer_for_unknown_computation_is_refused(drv, tmp_path):
    src = tmp_path / 'f'
    src.write_bytes(b'x')
    first, final = drv.xfer(src, 12345)
    assert first.startswith(b'NAK (invalid computation') and final is None


@pytest.mark.parametrize('name', ['..', 'dir/', '_dispy_job_reply_1'])
def test_filexfer_bad_name_is_refused(drv, tmp_path, name):
    src = tmp_path / 'f'
    src.write_bytes(b'x')
    _, compute = drv.compute(DOUBLE, 'double')
    first, _ = drv.xfer(src, compute.id, name=name)
    assert first == b'NAK (invalid file name)'


def test_oversized_file_is_refused(unit_nodes, tmp_path):
    node = unit_nodes(args=['--max_file_size', '1k'])
    d = new_driver(node, unit_nodes)
    big = tmp_path / 'big.bin'
    big.write_bytes(b'b' * 2048)
    small = tmp_path / 'small.bin'
    small.write_bytes(b's' * 1024)
    # at COMPUTE time
    answer, _ = d.compute(DOUBLE, 'double', xfer_files=[d.xfer_file(big, None)])
    assert answer == b'NAK (file too big)'
    # at FILEXFER time
    answer, compute = d.compute(DOUBLE, 'double')
    assert answer == b'ACK'
    assert d.xfer(big, compute.id) == (b'NAK (file too big)', None)
    assert d.xfer(small, compute.id) == (b'NAK', b'ACK')
    # a job announcing a big dependency
    answer = d.job(compute.id, 1, (1,), xfer_files=[d.xfer_file(big, compute.id)])
    assert answer == b'NAK (file too big)'


# ---------------------------------------------------------------- SETUP

SETUP_CODE = '''
def setup(n):
    global BASE
    BASE = n
    return 0

def use_base(x):
    return BASE + x
'''


def test_setup_globals_reach_jobs(drv):
    answer, compute = drv.compute(SETUP_CODE, 'use_base', setup=dc.Function('setup', (100,), {}))
    assert answer == b'ACK'
    assert drv.setup(compute.id) == b'ACK'
    assert drv.job(compute.id, 1, (5,)) == b'ACK'
    reply = drv.server.wait_reply(1)
    assert reply.status == dc.DispyJob.Finished and reply.result == 105


def test_setup_failure_returns_traceback_and_frees_node(node, drv, unit_nodes):
    code = 'def setup():\n    return 1\n\ndef f():\n    return 0\n'
    answer, compute = drv.compute(code, 'f', setup=dc.Function('setup', (), {}))
    assert answer == b'ACK'
    text = drv.setup(compute.id)
    assert text != b'ACK' and b'returned 1' in text
    # the computation is dropped and the node becomes free again
    other = new_driver(node, unit_nodes)
    assert wait_for(lambda: other.compute(DOUBLE, 'double')[0] == b'ACK', 10)


def test_setup_exception_text(drv):
    code = 'def setup():\n    raise ValueError("no setup today")\n\ndef f():\n    return 0\n'
    _, compute = drv.compute(code, 'f', setup=dc.Function('setup', (), {}))
    text = drv.setup(compute.id)
    assert b'ValueError' in text and b'no setup today' in text


def test_setup_for_unknown_computation(drv):
    assert drv.setup(424242).startswith(b'NAK (invalid computation')


# ---------------------------------------------------------------- JOB

def test_job_ack_then_reply(node, drv):
    _, compute = drv.compute(DOUBLE, 'double')
    assert drv.job(compute.id, 11, (21,)) == b'ACK'
    reply = drv.server.wait_reply(11)
    assert reply is not None
    assert isinstance(reply, dc.JobReply)
    assert reply.status == dc.DispyJob.Finished
    assert reply.result == 42
    assert reply.stdout == 'doubling 21\n' and reply.stderr == ''
    assert reply.exception is None
    assert reply.hash == drv.job_hashes[11]
    assert reply.ip_addr == '127.0.0.1'
    assert reply.start_time <= reply.end_time


def test_job_kwargs_and_depends_code(drv):
    code = 'def f(a, b=0):\n    return helper(a) + b\n'
    _, compute = drv.compute(code, 'f')
    assert drv.job(compute.id, 1, (2,), {'b': 3},
                   code='def helper(x):\n    return x * 10\n') == b'ACK'
    assert drv.server.wait_reply(1).result == 23


def test_job_exception_gives_terminated_with_traceback(drv):
    _, compute = drv.compute('def f():\n    raise KeyError("nope")\n', 'f')
    assert drv.job(compute.id, 1) == b'ACK'
    reply = drv.server.wait_reply(1)
    assert reply.status == dc.DispyJob.Terminated
    assert 'KeyError' in reply.exception and 'nope' in reply.exception


def test_job_globals_do_not_leak_between_jobs(drv):
    code = 'COUNT = 0\ndef f():\n    global COUNT\n    COUNT += 1\n    return COUNT\n'
    _, compute = drv.compute(code, 'f')
    for uid in (1, 2):
        assert drv.job(compute.id, uid) == b'ACK'
        assert drv.server.wait_reply(uid).result == 1


def test_job_unpicklable_result_still_replies(drv):
    _, compute = drv.compute('import threading\ndef f():\n    return threading.Lock()\n', 'f')
    assert drv.job(compute.id, 1) == b'ACK'
    reply = drv.server.wait_reply(1)
    assert reply.status == dc.DispyJob.Terminated and 'pickled' in reply.exception


def test_job_process_crash_still_replies(drv):
    _, compute = drv.compute('import os\ndef f():\n    os._exit(3)\n', 'f')
    assert drv.job(compute.id, 1) == b'ACK'
    reply = drv.server.wait_reply(1)
    assert reply.status == dc.DispyJob.Terminated and 'status 3' in reply.exception


def test_provisional_result_and_send_file(drv):
    code = ('def f(n):\n'
            '    dispy_provisional_result(n)\n'
            '    with open("out.txt", "w") as fh:\n'
            '        fh.write("x" * n)\n'
            '    return dispy_send_file("out.txt")\n')
    _, compute = drv.compute(code, 'f')
    assert drv.job(compute.id, 1, (7,)) == b'ACK'
    reply = drv.server.wait_reply(1)
    assert reply.status == dc.DispyJob.Finished and reply.result == 0
    # The job sent both before its reply, but the driver ACKs a message
    # before it queues it, so they may be queued after the reply (and
    # waiting for them in order dropped the reply once in ten runs).
    provisional = wait_for(lambda: [m.obj for m in drv.server.all if m.tag == 'JOB_REPLY'
                                    and m.obj.status == dc.DispyJob.ProvisionalResult], 5)
    assert [(p.uid, p.result) for p in provisional] == [(1, 7)]
    xfers = wait_for(lambda: [m for m in drv.server.all if m.tag == 'FILEXFER'], 5)
    assert len(xfers) == 1
    xfer = xfers[0]
    assert xfer.obj.name == 'out.txt' and xfer.extra['data'] == b'xxxxxxx'
    assert isinstance(xfer.obj.stat_buf, os.stat_result)


def test_job_for_unknown_computation_is_refused(drv):
    assert drv.job(99999, 1).startswith(b'NAK (invalid computation')


def test_invalid_job_is_refused(drv):
    _, compute = drv.compute(DOUBLE, 'double')
    job = dc.DispyJobRecord(uid='x', hash='h', compute_id=compute.id, args=b'', kwargs=b'')
    assert drv.request(b'JOB', job) == b'NAK (invalid job)'


def test_job_when_all_cpus_busy_then_terminate(unit_nodes):
    node = unit_nodes(args=['-c', '1'])
    d = new_driver(node, unit_nodes)
    _, compute = d.compute(SLEEPER, 'sleeper')
    assert d.job(compute.id, 1, (60,)) == b'ACK'
    assert d.job(compute.id, 2, (0,)) == b'NAK (all cpus busy)'
    running = d.jobs(compute.id)
    assert [j['uid'] for j in running] == [1]
    assert running[0]['hash'] == d.job_hashes[1]
    assert d.pending_jobs(compute.id) == {'done': [], 'pending': 1}
    start = time.monotonic()
    assert d.terminate(compute.id, 1) is None          # no answer
    reply = d.server.wait_reply(1, 10)
    assert time.monotonic() - start < 5
    assert reply.status == dc.DispyJob.Terminated
    assert reply.result is None
    # the CPU is free again
    assert wait_for(lambda: d.job(compute.id, 3, (0,)) == b'ACK', 5)
    assert d.server.wait_reply(3).result == 0
    assert d.jobs(compute.id) == []


def test_duplicate_job_uid_is_refused(unit_nodes):
    node = unit_nodes(args=['-c', '2'])
    d = new_driver(node, unit_nodes)
    _, compute = d.compute(SLEEPER, 'sleeper')
    assert d.job(compute.id, 1, (60,)) == b'ACK'
    assert d.job(compute.id, 1, (0,)).startswith(b'NAK (duplicate')
    d.terminate(compute.id, 1)
    assert d.server.wait_reply(1).status == dc.DispyJob.Terminated


def test_terminate_unknown_job_is_ignored(drv):
    _, compute = drv.compute(DOUBLE, 'double')
    assert drv.terminate(compute.id, 777) is None
    assert drv.job(compute.id, 1, (1,)) == b'ACK'
    assert drv.server.wait_reply(1).result == 2


def test_jobs_wrong_auth_lists_nothing(drv):
    _, compute = drv.compute(SLEEPER, 'sleeper')
    assert drv.job(compute.id, 1, (60,)) == b'ACK'
    assert [j['uid'] for j in drv.jobs(compute.id)] == [1]
    assert drv.jobs(compute.id, auth='ffff') == []
    drv.terminate(compute.id, 1)
    assert drv.server.wait_reply(1) is not None


# ---------------------------------------------------------------- CLOSE

def test_close_removes_files_and_frees_node(node, drv, unit_nodes, tmp_path):
    src = tmp_path / 'dep.txt'
    src.write_bytes(b'dep')
    _, compute = drv.compute(DOUBLE, 'double', xfer_files=[drv.xfer_file(src, None)])
    drv.xfer(src, compute.id)
    assert drv.job(compute.id, 1, (1,)) == b'ACK'
    assert drv.server.wait_reply(1).result == 2
    path = comp_dir(node, drv)
    assert drv.close(compute.id) is None
    assert not os.path.exists(path)
    assert not (node.prefix / ('%d_%s' % (compute.id, compute.auth))).exists()
    assert drv.job(compute.id, 2, (1,)).startswith(b'NAK')
    other = new_driver(node, unit_nodes)
    assert other.compute(DOUBLE, 'double')[0] == b'ACK'


def test_close_keeps_files_with_cleanup_false(node, drv):
    _, compute = drv.compute(DOUBLE, 'double', dest_path='keep', cleanup=False)
    (node.prefix / '127.0.0.1' / 'keep' / 'mine.txt').write_text('x')
    drv.close(compute.id)
    assert (node.prefix / '127.0.0.1' / 'keep' / 'mine.txt').exists()


def test_close_with_wrong_auth_is_ignored(drv):
    _, compute = drv.compute(DOUBLE, 'double')
    drv.close(compute.id, auth='abcdef')
    assert drv.job(compute.id, 1, (1,)) == b'ACK'
    assert drv.server.wait_reply(1).result == 2


def test_close_terminate_pending(node, drv, unit_nodes):
    _, compute = drv.compute(SLEEPER, 'sleeper')
    assert drv.job(compute.id, 1, (60,)) == b'ACK'
    start = time.monotonic()
    drv.close(compute.id, terminate_pending=True)
    reply = drv.server.wait_reply(1, 10)
    assert reply.status == dc.DispyJob.Terminated
    assert time.monotonic() - start < 8
    other = new_driver(node, unit_nodes)
    assert wait_for(lambda: other.compute(DOUBLE, 'double')[0] == b'ACK', 10)


CLEANUP_CODE = (
    'def cleanup(path):\n'
    '    open(path, "w").close()\n'
    '    return 0\n'
    '\n'
    'def f():\n'
    '    return 1\n')


def test_cleanup_runs_at_close_after_jobs(node, drv, tmp_path):
    marker = tmp_path / 'cleaned'
    _, compute = drv.compute(CLEANUP_CODE, 'f',
                             cleanup=dc.Function('cleanup', (str(marker),), {}))
    assert drv.job(compute.id, 1) == b'ACK'
    assert drv.server.wait_reply(1).result == 1
    assert not marker.exists()
    drv.close(compute.id)         # returns once the node has closed it
    assert wait_for(marker.exists, 2)


def test_cleanup_runs_at_close_without_jobs(node, drv, tmp_path):
    """The original node runs a computation's cleanup at close even when no
    job ran on this node (e.g. the client's jobs all went to other nodes)."""
    marker = tmp_path / 'cleaned'
    _, compute = drv.compute(CLEANUP_CODE, 'f',
                             cleanup=dc.Function('cleanup', (str(marker),), {}))
    drv.close(compute.id)         # returns once the node has closed it
    assert wait_for(marker.exists, 2)


# ---------------------------------------------------------------- dead client, recovery

def test_dead_client_reply_is_stored_then_resent(node, drv):
    _, compute = drv.compute(DOUBLE, 'double')
    path = comp_dir(node, drv)
    drv.server.ack = False                        # the client stops ACKing
    assert drv.job(compute.id, 5, (50,)) == b'ACK'
    assert wait_for(lambda: os.path.exists(reply_file(path, 5)), 10), node.log()
    assert drv.server.unacked and drv.server.unacked[0].obj.uid == 5
    # the node writes the file first, then notes the result as stored
    assert wait_for(lambda: drv.pending_jobs(compute.id) == {'done': [5], 'pending': 0}, 5)
    assert drv.pending_jobs(compute.id, auth='0000') == {'done': [], 'pending': 0}
    # the client is back
    drv.server.ack = True
    drv.server.ack_delay = 0.1    # keep the delivery in flight while the count is made
    assert drv.resend(compute.id) == 1
    reply = drv.server.wait_reply(5)
    assert reply.result == 100 and reply.status == dc.DispyJob.Finished
    assert wait_for(lambda: not os.path.exists(reply_file(path, 5)), 5)
    assert drv.pending_jobs(compute.id) == {'done': [], 'pending': 0}
    assert drv.resend(compute.id) == 0
    assert drv.resend(compute.id, auth='1234') == 0


def test_retrieve_job_returns_stored_reply_and_deletes_after_ack(node, drv):
    _, compute = drv.compute(DOUBLE, 'double')
    path = comp_dir(node, drv)
    drv.server.ack = False
    assert drv.job(compute.id, 8, (4,)) == b'ACK'
    assert wait_for(lambda: os.path.exists(reply_file(path, 8)), 10)
    stored = open(reply_file(path, 8), 'rb').read()
    # wrong hash, wrong auth, unknown uid -> None (and nothing deleted)
    assert drv.retrieve(compute.id, 8, job_hash='bad') is None
    assert drv.retrieve(compute.id, 8, auth='abab') is None
    assert drv.retrieve(compute.id, 9) is None
    # without ACK the stored reply stays
    reply = drv.retrieve(compute.id, 8, ack=False)
    assert isinstance(reply, dc.JobReply) and reply.result == 8
    # the node's handler has seen the connection close without an ACK
    assert wait_for(lambda: 'RETRIEVE_JOB from 127.0.0.1 ended early' in node.log(), 5)
    assert os.path.exists(reply_file(path, 8))
    # the bytes are the job's own pickled reply, forwarded as is
    assert dc.loads_plain(stored)['reply'] == dc.dumps(reply) or \
        dc.loads_full(dc.loads_plain(stored)['reply']).__dict__ == reply.__dict__
    reply = drv.retrieve(compute.id, 8)
    assert reply.uid == 8 and reply.result == 8 and reply.hash == drv.job_hashes[8]
    assert wait_for(lambda: not os.path.exists(reply_file(path, 8)), 5)
    assert drv.pending_jobs(compute.id)['done'] == []


def test_results_survive_close_and_node_restart(unit_nodes):
    """A dead client's results stay after CLOSE and after a node restart,
    and recovery (RESEND_JOB_RESULTS with the old auth) still gets them."""
    node = unit_nodes()
    d = new_driver(node, unit_nodes)
    _, compute = d.compute(DOUBLE, 'double')
    d.server.ack = False
    assert d.job(compute.id, 3, (3,)) == b'ACK'
    path = comp_dir(node, d)
    assert wait_for(lambda: os.path.exists(reply_file(path, 3)), 10)
    assert node.stop() == 0
    assert os.path.exists(reply_file(path, 3))
    assert (node.prefix / ('%d_%s' % (compute.id, compute.auth))).exists()
    # same prefix, same port, new run (new sign); the client keeps its old auth
    node2 = unit_nodes(port=node.port, prefix=node.prefix)
    try:
        d.server.ack = True
        d.server.ack_delay = 0.1
        assert d.resend(compute.id) == 1            # recovery accepts the old auth
        reply = d.server.wait_reply(3)
        assert reply is not None and reply.result == 6
        assert wait_for(lambda: not os.path.exists(reply_file(path, 3)), 5)
        # requests that are not recovery requests need the new auth
        assert d.request(b'JOB', dc.DispyJobRecord(uid=1, hash='h', compute_id=compute.id,
                                                   args=b'', kwargs=b'')) is None
    finally:
        node2.stop()


# ---------------------------------------------------------------- programs

def test_program_computation(node, drv, tmp_path):
    prog = tmp_path / 'prog.py'
    prog.write_text('import sys\nprint("args", *sys.argv[1:])\n'
                    'sys.stderr.write("err\\n")\nsys.exit(len(sys.argv) - 1)\n')
    answer, compute = drv.compute('', 'prog.py', compute_type=dc.Compute.prog_type,
                                  xfer_files=[drv.xfer_file(prog, None)])
    assert answer == b'ACK'
    assert drv.xfer(prog, compute.id) == (b'NAK', b'ACK')
    assert drv.job(compute.id, 1, ('a', 2)) == b'ACK'
    reply = drv.server.wait_reply(1)
    assert reply.status == dc.DispyJob.Finished
    assert reply.result == 2
    assert reply.stdout == b'args a 2\n' and reply.stderr == b'err\n'


def test_shell_program_is_made_executable(node, drv, tmp_path):
    prog = tmp_path / 'run.sh'
    prog.write_text('#!/bin/sh\necho "sh $1"\nexit 3\n')
    os.chmod(str(prog), 0o644)                     # not executable on the client
    _, compute = drv.compute('', 'run.sh', compute_type=dc.Compute.prog_type,
                             xfer_files=[drv.xfer_file(prog, None)])
    drv.xfer(prog, compute.id)
    assert drv.job(compute.id, 1, ('x',)) == b'ACK'
    reply = drv.server.wait_reply(1)
    assert (reply.result, reply.stdout) == (3, b'sh x\n')


# ---------------------------------------------------------------- UDP, pulses, zombies

def test_udp_ping_gets_tcp_pong(node, drv):
    import socket
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.sendto(b'PING:' + dc.dumps_plain(drv.ping_info()), ('127.0.0.1', node.port))
    drv.server.wait('PONG', 5)          # the one from the driver's TCP ping
    # Another source: the same PING from the same source within a second
    # gets no second round of PONGs (rate limit; see test_security_unauth).
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.bind(('127.0.0.2', 0))
        udp.sendto(b'PING:' + dc.dumps_plain(drv.ping_info()), ('127.0.0.1', node.port))
    message = drv.server.wait('PONG', 5)
    assert message is not None
    assert message.obj['auth'] == dc.auth_code('', drv.sign)


def test_udp_garbage_is_ignored(node, drv):
    import socket
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        for data in (b'junk', b'PING:\x80\x04garbage', b'PULSE:' + b'x' * 9000,
                     b'PING:' + pickle.dumps({'version': '4.5', 'x': {1j}}, 4)):
            udp.sendto(data, ('127.0.0.1', node.port))
        assert drv.server.wait('PONG', 5)       # the one from the driver's TCP ping
        # A PING after the garbage (another sign: not rate limited) is
        # answered: the listener went through the garbage and goes on.
        udp.sendto(b'PING:' + dc.dumps_plain(dict(drv.ping_info(), sign=driver.random_hex())),
                   ('127.0.0.1', node.port))
        assert drv.server.wait('PONG', 5)
    assert drv.ping_tcp() is not None
    assert node.proc.poll() is None


def test_silent_client_becomes_zombie_and_node_is_freed(unit_nodes):
    node = unit_nodes(env={'DISPYNODE_ZOMBIE_SECONDS': '0.2'})
    d = new_driver(node, unit_nodes)
    _, compute = d.compute(DOUBLE, 'double')
    terminated = d.server.wait('TERMINATED', 6)
    assert terminated is not None and terminated.obj['port'] == node.port
    other = new_driver(node, unit_nodes)
    assert wait_for(lambda: other.compute(DOUBLE, 'double')[0] == b'ACK', 5)


def test_pulses_keep_a_computation_alive(unit_nodes):
    import socket
    # The node checks for zombies every tenth of this interval; pulses come
    # every tenth too, for twice the interval.
    zombie = 0.4
    node = unit_nodes(env={'DISPYNODE_ZOMBIE_SECONDS': str(zombie)})
    d = new_driver(node, unit_nodes)
    _, compute = d.compute(DOUBLE, 'double')
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        end = time.monotonic() + 2 * zombie
        while time.monotonic() < end:
            udp.sendto(b'PULSE:' + dc.dumps_plain({'ip_addr': '127.0.0.1', 'port': 1}),
                       ('127.0.0.1', node.port))
            time.sleep(zombie / 10)
    assert d.job(compute.id, 1, (2,)) == b'ACK'
    assert d.server.wait_reply(1).result == 4



ENV_PROBE = ('def probe(name):\n'
             '    import os\n'
             '    return os.environ.get(name)\n')


def test_env_secret_does_not_reach_jobs(unit_nodes):
    """DISPYNODE_SECRET authenticates clients, then leaves the environment
    that workers and jobs inherit."""
    node = unit_nodes(env={'DISPYNODE_SECRET': 'sesame'})
    d = new_driver(node, unit_nodes, secret='sesame')
    answer, compute = d.compute(ENV_PROBE, 'probe')
    assert answer == b'ACK'
    # one at a time: the driver's wait drops replies it skips over
    assert d.job(compute.id, 1, ('DISPYNODE_SECRET',)) == b'ACK'
    assert d.server.wait_reply(1).result is None
    assert d.job(compute.id, 2, ('PATH',)) == b'ACK'
    assert d.server.wait_reply(2).result          # the rest of the environment is kept
