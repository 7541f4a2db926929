"""Issue 4, "Nothing is lost": results survive a dead client, a killed
node, zombie clients and node shutdown; SharedJobCluster via the legacy
dispyscheduler.  Real dispy 4.5.5 clients against our node.
"""

import json
import os
import signal
import subprocess
import time

import pytest

from dispy_common import DispyJob

from legacy import (CLIENTS, ensure_legacy_venv, find_files, free_port, pid_alive,
                    run_client, wait_for)
from driver import Driver, ReplyServer, udp_pongs
from recovery_util import (REPLY_PREFIX, LegacyProc, node_is_free, processes_gone,
                           scan_store, wait_node_free)

pytestmark = [pytest.mark.interop]

RUNNING, PROVISIONAL, TERMINATED, ABANDONED, FINISHED = (
    DispyJob.Running, DispyJob.ProvisionalResult,
    DispyJob.Terminated, DispyJob.Abandoned, DispyJob.Finished)
NODE_CLOSED = FINISHED + 5    # dispy.DispyNode.Closed


def _fmt(res, *nodes):
    msg = res.describe() if hasattr(res, 'describe') else repr(res)
    for node in nodes:
        if node is not None:
            msg += '\n--- node log (%s port %s) ---\n%s' % (node.impl, node.port,
                                                           node.log()[-10000:])
    return msg


def _check(res, *nodes):
    assert res.data is not None, 'client printed no RESULT\n' + _fmt(res, *nodes)
    assert 'error' not in res.data, 'client raised:\n%s\n%s' % (res.data['error'],
                                                                _fmt(res, *nodes))
    assert not res.data.get('watchdog'), 'client watchdog fired\n' + _fmt(res, *nodes)
    return res.data


def _reply_files(prefix):
    return [str(p) for p in find_files(prefix, REPLY_PREFIX + '*')]


def _submit_and_die(node, client_port, recover_file, cwd, jobs=2, secs=1.5):
    res = run_client(CLIENTS / 'recovery_submit.py', node.port, client_port,
                     'recover_file=%s' % recover_file, 'jobs=%d' % jobs, 'secs=%s' % secs,
                     timeout=45, cwd=cwd)
    data = _check(res, node)
    assert res.returncode == 0, _fmt(res, node)
    assert data['statuses'] == [RUNNING] * jobs, _fmt(res, node)
    return data


def _recover(node, client_port, recover_file, cwd, timeout=20):
    res = run_client(CLIENTS / 'recovery_recover.py', node.port, client_port,
                     'recover_file=%s' % recover_file, 'timeout=%s' % timeout,
                     timeout=timeout + 25, cwd=cwd)
    return _check(res, node), res


def _assert_recovered(data, res, node, jobs=2):
    got = sorted(data['jobs'], key=lambda j: (j['result'] or {}).get('n', -1))
    assert len(got) == jobs, 'recovered %d of %d jobs\n%s' % (len(got), jobs, _fmt(res, node))
    for n, j in enumerate(got):
        assert j['status'] == FINISHED, (j, _fmt(res, node))
        assert j['result']['n'] == n and j['result']['value'] == n * n + 7, j
        assert j['stdout'] == 'recovered-out-%d\n' % n, j
        assert j['ip_addr'] == '127.0.0.1', j
        assert j['end_time'] - j['start_time'] >= 1.4, j
    assert len({j['result']['pid'] for j in got}) == jobs, got
    # recover_jobs removes the recover file once every result is in
    assert data['recover_files_left'] == [], data


def _assert_store_empty(node, timeout=10):
    """After recovery closed the computation: no records, replies or temps."""
    def empty():
        s = scan_store(node.prefix)
        return not (s['records'] or s['replies'] or s['tmp'] or s['torn'] or s['corrupt'])
    ok = wait_for(empty, timeout, interval=0.1)
    s = scan_store(node.prefix)
    assert ok, 'node prefix not emptied after recovery: %s\n%s' % (
        {k: v for k, v in s.items() if v}, node.log()[-8000:])


def test_recover_jobs_after_client_death(node_factory, legacy_python, tmp_path):
    """Scenario 1: a client submits 2 jobs of 1.5 s and dies (os._exit) as
    soon as both are Running; a second legacy process on the same port runs
    dispy.recover_jobs(recover_file) and gets both results (Finished, right
    values); the node is then free again and its prefix holds nothing."""
    node = node_factory()
    client_port = free_port()
    recover_file = str(tmp_path / 'recover.dat')
    t0 = time.monotonic()
    _submit_and_die(node, client_port, recover_file, tmp_path)
    data, res = _recover(node, client_port, recover_file, tmp_path)
    _assert_recovered(data, res, node)
    _assert_store_empty(node)
    assert wait_node_free(node.port, 10), 'node not free after recovery\n' + node.log()[-5000:]
    assert time.monotonic() - t0 < 40
    assert node.alive()


def test_recover_jobs_after_node_kill(node_factory, legacy_python, tmp_path):
    """Scenario 2: the client dies as in scenario 1; once the node has stored
    both results (_dispy_job_reply_* files), the node is SIGKILLed and
    restarted with the same port and prefix (no --clean); recover_jobs still
    gets both results (the restarted node accepts the old run's auth for
    recovery), and the prefix then holds no reply files or records."""
    node = node_factory()
    client_port = free_port()
    recover_file = str(tmp_path / 'recover.dat')
    _submit_and_die(node, client_port, recover_file, tmp_path)
    stored = wait_for(lambda: len(_reply_files(node.prefix)) == 2, 15, interval=0.1)
    assert stored, 'results not stored: %s\n%s' % (_reply_files(node.prefix), node.log())
    s = scan_store(node.prefix)
    assert len(s['records']) == 1 and len(s['replies']) == 2 and not s['torn'], s
    node.kill()
    assert not node.alive()
    node2 = node_factory(port=node.port, prefix=node.prefix)
    assert len(_reply_files(node2.prefix)) == 2
    data, res = _recover(node2, client_port, recover_file, tmp_path)
    _assert_recovered(data, res, node2)
    _assert_store_empty(node2)
    assert wait_node_free(node2.port, 10), 'node not free after recovery\n' + node2.log()[-5000:]
    assert node2.alive()


def _proc_state(pid):
    try:
        with open('/proc/%d/stat' % pid) as f:
            return f.read().rsplit(')', 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def test_zombie_client_frees_node(node_factory, legacy_python, tmp_path):
    """Scenario 3: with DISPYNODE_ZOMBIE_SECONDS=3 a client that froze
    (SIGSTOP) after its job started stops pulsing; about 3 s later the node
    declares the computation a zombie and becomes free (it answers a PING
    with a PONG again, which it does only when free), the frozen client's
    result is kept in the store, and a new client on another port is served
    with correct results.  Bounded to ~20 s."""
    t_start = time.monotonic()
    node = node_factory(env={'DISPYNODE_ZOMBIE_SECONDS': '3'})
    frozen_port = free_port()
    frozen = LegacyProc('recovery_zombie.py', node.port, frozen_port, 'jobs=1', 'secs=1.0',
                        cwd=tmp_path, watchdog=40)
    try:
        line = frozen.wait_line('SUBMITTED:', 20)
        assert line is not None, frozen.describe() + node.log()[-5000:]
        assert json.loads(line) == [RUNNING], line
        assert wait_for(lambda: _proc_state(frozen.pid) == 'T', 5), frozen.describe()
        t_freeze = time.monotonic()
        assert not node_is_free(node.port, wait=0.5), 'node free while its client is alive'
        freed = wait_node_free(node.port, 12)
        waited = time.monotonic() - t_freeze
        assert freed, 'node still busy %.1f s after its client froze\n%s' % (
            waited, node.log()[-8000:])
        # the last pulse was at most 3/5 s before the freeze
        assert waited >= 2.0, 'node freed after %.1f s, before the zombie interval' % waited
        assert 'zombie' in node.log()
        # the new client is served at once
        cwd = tmp_path / 'second'
        cwd.mkdir()
        res = run_client(CLIENTS / 'basic_jobs.py', node.port, free_port(), 'jobs=3',
                         'give_up=8', timeout=30, cwd=cwd)
        data = _check(res, node)
        assert not data.get('gave_up'), 'new client not served\n' + _fmt(res, node)
        assert data['all_final'], _fmt(res, node)
        assert [j['status'] for j in data['jobs']] == [FINISHED] * 3, _fmt(res, node)
        assert [j['result'] for j in data['jobs']] == [1, 2, 5], _fmt(res, node)
        # nothing lost: the frozen client's finished job is stored for recovery
        assert wait_for(lambda: len(_reply_files(node.prefix)) == 1, 8, interval=0.1), (
            _reply_files(node.prefix), node.log()[-5000:])
        # (the second client's record goes once the node has handled its CLOSE)
        wait_for(lambda: len(scan_store(node.prefix)['records']) == 1, 5, interval=0.1)
        s = scan_store(node.prefix)
        assert len(s['records']) == 1 and not s['torn'] and not s['tmp'], s
        (rec,) = s['records'].values()
        assert rec['result_port'] == frozen_port, rec
        (rep,) = s['replies'].values()
        assert rep['decoded'].status == FINISHED and rep['decoded'].result == 100, rep
    finally:
        frozen.kill()
    assert node.alive()
    assert time.monotonic() - t_start < 30


def test_sigterm_ends_jobs_and_children(node_factory, legacy_python, tmp_path):
    """Scenario 4: SIGTERM to the node while 2 jobs run (each started a
    `sleep 600` child and reported both pids as a provisional result): the
    node exits with code 0 within a few seconds, every job process and child
    is gone, and the legacy client saw the node leave as the original node's
    SIGINT shows it (issue 11): no Terminated reply, only the node's
    TERMINATED message, so the (non-reentrant) jobs ended Abandoned and the
    cluster_status callback got DispyNode.Closed for the node."""
    node = node_factory()
    client = LegacyProc('recovery_sigterm.py', node.port, free_port(), 'jobs=2',
                        cwd=tmp_path, watchdog=50)
    try:
        line = client.wait_line('PIDS:', 25)
        assert line is not None, client.describe() + node.log()[-5000:]
        infos = json.loads(line)
        assert sorted(i['n'] for i in infos) == [0, 1], infos
        pids = [i['job_pid'] for i in infos] + [i['child_pid'] for i in infos]
        assert all(pid_alive(p) for p in pids), pids
        t0 = time.monotonic()
        node.proc.send_signal(signal.SIGTERM)
        try:
            rc = node.proc.wait(10)
        except subprocess.TimeoutExpired:
            rc = None
        took = time.monotonic() - t0
        assert rc == 0, 'node exit code %r after SIGTERM (%.1f s)\n%s' % (rc, took,
                                                                        node.log()[-8000:])
        assert took < 6, 'node took %.1f s to stop' % took
        assert processes_gone(pids, 5), 'left running: %s' % [p for p in pids if pid_alive(p)]
        data = client.finish(40)
    finally:
        client.kill()
    assert data is not None, client.describe()
    assert 'error' not in data and not data.get('watchdog'), client.describe()
    assert data['all_final'], client.describe()
    for j in data['jobs']:
        assert j['status'] == ABANDONED, (j, client.describe(), node.log()[-6000:])
    events = data['events']
    assert not [e for e in events if e[0] == TERMINATED], events
    closed = [e for e in events if e[0] == NODE_CLOSED]
    assert closed and closed[0][1] == '127.0.0.1', (events, client.describe())
    # the client abandoned the jobs on the node's TERMINATED, before its Closed
    abandoned = [e for e in events if e[0] == ABANDONED]
    assert sorted(e[2] for e in abandoned) == [0, 1], events
    assert max(e[3] for e in abandoned) <= closed[0][3], events


class _Scheduler:
    """The legacy dispyscheduler in the background (legacy venv)."""

    def __init__(self, node_port, tmp_path):
        self.port = free_port()            # --scheduler_port: for clients
        self.node_side_port = free_port()  # -p: where nodes send PONG/replies
        self.log_path = tmp_path / 'scheduler.log'
        prefix = tmp_path / 'scheduler-prefix'
        env = dict(os.environ, PYTHONUNBUFFERED='1')
        cmd = [str(ensure_legacy_venv()), '-m', 'dispy.dispyscheduler',
               '-d', '-n', '127.0.0.1', '-i', '127.0.0.1', '-p', str(self.node_side_port),
               '--node_port', str(node_port), '--scheduler_port', str(self.port),
               '--dest_path_prefix', str(prefix)]
        with open(str(self.log_path), 'wb') as log:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, env=env, cwd=str(tmp_path),
                                         start_new_session=True)

    def wait_ready(self, timeout=20):
        import socket
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, 'dispyscheduler exited\n' + self.log()
            try:
                with socket.create_connection(('127.0.0.1', self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.1)
        raise AssertionError('dispyscheduler not listening\n' + self.log())

    def log(self):
        try:
            return self.log_path.read_text(errors='replace')[-8000:]
        except OSError:
            return ''

    def stop(self):
        for sig in (signal.SIGINT, signal.SIGKILL):
            if self.proc.poll() is not None:
                break
            try:
                os.killpg(self.proc.pid, sig)
            except OSError:
                pass
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except OSError:
            pass


def test_shared_job_cluster_via_dispyscheduler(node_factory, legacy_python, tmp_path):
    """Scenario 5: SharedJobCluster clients through the legacy dispyscheduler
    (which talks to our node as its client): results are correct; after the
    first client closes, the node drops that computation and a fresh
    SharedJobCluster client is served again."""
    node = node_factory()
    sched = _Scheduler(node.port, tmp_path)
    try:
        sched.wait_ready()
        for tag in ('a', 'b'):
            cwd = tmp_path / ('client-' + tag)
            cwd.mkdir()
            res = run_client(CLIENTS / 'shared_jobs.py', node.port, free_port(),
                             'scheduler_port=%d' % sched.port, 'jobs=6', 'tag=' + tag,
                             timeout=60, cwd=cwd)
            where = _fmt(res, node) + '\n--- scheduler log ---\n' + sched.log()
            data = _check(res, node)
            assert data['all_final'], where
            assert data.get('closed'), 'close() did not finish\n' + where
            for j in data['jobs']:
                n = j['id']
                assert j['status'] == FINISHED, (j, where)
                assert j['result'] == {'n': n, 'tag': tag, 'value': n * 3 + 1,
                                       'pid': j['result']['pid']}, j
                assert j['stdout'] == 'shared-%s-%d\n' % (tag, n), j
                assert j['ip_addr'] == '127.0.0.1', j
            # the scheduler closed the computation on the node
            closed = wait_for(lambda: not scan_store(node.prefix)['records'], 10, interval=0.1)
            assert closed, 'computation %s still on the node\n%s' % (tag, where)
        assert node.alive(), node.log()
        assert sched.proc.poll() is None, sched.log()
    finally:
        sched.stop()


# ------------------------------------------------------------ node defects found
# Defects of our node found while writing the scenarios above.  A defect not
# fixed yet is strict-xfail: CI stays green and turns red (XPASS) once the
# fix lands, when the marker must go.

def test_pong_ignores_unspecified_address(node_factory):
    """A PING whose ip_addrs (or source address: a broadcast from a host
    without an address) is 0.0.0.0 must not produce a PONG that names
    scheduler_ip_addr '0.0.0.0': the legacy client adopts the address of the
    first PONG it handles as its computation's scheduler_ip_addr, and the
    node then refuses every JOB from the client's real address (seen in this
    test suite before the netns broadcast route got 'src 127.0.0.1')."""
    node = node_factory()
    pongs = udp_pongs(node.port, ['0.0.0.0'], 1.5)
    assert pongs, 'no PONG at all\n' + node.log()[-3000:]
    assert [p['scheduler_ip_addr'] for p in pongs] == ['127.0.0.1'], pongs


def test_frozen_client_does_not_delay_next_client(node_factory, legacy_python, tmp_path):
    """A frozen client (its port accepts connections but it never reads, like
    a SIGSTOPped process) holds a result the node must deliver; after the
    node drops it as a zombie, the next client's results must not wait behind
    the frozen client's 5 s (msg_timeout) delivery attempts.  The original
    node sends replies from independent coroutines."""
    import socket as _socket
    node = node_factory(env={'DISPYNODE_ZOMBIE_SECONDS': '2'})
    frozen = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)
    frozen.setsockopt(_socket.SOL_SOCKET, _socket.SO_REUSEADDR, 1)
    frozen.bind(('127.0.0.1', 0))
    frozen.listen(16)              # never accept(): connects succeed, no ACK ever
    fport = frozen.getsockname()[1]
    try:
        drv = Driver('127.0.0.1', node.port, timeout=5.0, reply_port=fport)
        drv.ping_tcp()
        assert drv.compute('def f(n):\n    return n + 1\n', 'f', compute_id=7001,
                           auth='abcdef', cleanup=True)[0] == b'ACK'
        assert drv.job(7001, 1, (41,)) == b'ACK'
        assert wait_node_free(node.port, 10), node.log()[-5000:]
        t0 = time.monotonic()
        res = run_client(CLIENTS / 'basic_jobs.py', node.port, free_port(), 'jobs=3',
                         timeout=40, cwd=tmp_path)
        took = time.monotonic() - t0
        data = _check(res, node)
        assert [j['status'] for j in data['jobs']] == [FINISHED] * 3, _fmt(res, node)
        assert took < 4.0, 'next client took %.1f s for 3 jobs of 0.05 s\n%s' % (
            took, node.log()[-6000:])
    finally:
        frozen.close()


def test_resend_count_matches_replies(node_factory):
    """RESEND_JOB_RESULTS answers with the number of JOB_REPLYs the client
    will get; the legacy recover_jobs decrements that count per reply and
    finishes (and removes its recover file) only when it reaches exactly 0.
    A reply pushed before the count is taken leaves the count short: with
    timeout=None recover_jobs then waits forever.  40 stored results of
    400 KB make the window wide (the request thread reads them all from disk
    before counting while the courier already delivers)."""
    node = node_factory(debug=False)
    code = "def f(n, size):\n    return {'n': n, 'blob': 'x' * size}\n"
    counts = []
    for r in range(2):
        cid, auth, rport, k = 900 + r, 'abcd%02d' % r, free_port(), 40
        drv = Driver('127.0.0.1', node.port, timeout=5.0, reply_port=rport)
        drv.ping_tcp()
        assert drv.compute(code, 'f', compute_id=cid, auth=auth, cleanup=True)[0] == b'ACK'
        for uid in range(1, k + 1):
            deadline = time.monotonic() + 10
            while drv.job(cid, uid, (uid, 400000)) != b'ACK':
                assert time.monotonic() < deadline
                time.sleep(0.005)
        assert wait_for(lambda: len(_reply_files(node.prefix)) == k, 20, interval=0.1)
        with ReplyServer(port=rport) as sink:
            count = drv.resend(cid, auth)
            assert wait_for(lambda: len(sink.uids()) >= k, 15, interval=0.05), sink.uids()
            time.sleep(0.2)
            counts.append((count, len(sink.uids())))
        drv.close(cid, auth)
        assert wait_for(lambda: not scan_store(node.prefix)['records'], 10, interval=0.1)
    assert all(c == n for c, n in counts), 'RESEND count vs replies pushed: %s' % counts
