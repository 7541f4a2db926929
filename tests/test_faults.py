"""Issue 24, "Survive every fault": a dead worker, the descriptor limit, a
refused reply; and issue 21's "no reply is retried for ever".

The legacy scenarios run the real dispy 4.5.5 client against our node
(nodes.NodeProc); the test_unit_* ones drive an InProcessNode with
tests/driver.py, with the node's retry interval shortened.
"""

import errno
import sys
import os
import signal
import socket
import threading
import time

import pytest

import driver  # noqa: F401  (puts the repository on sys.path)
from driver import Driver, InProcessNode, wait_for
from legacy import CLIENTS, LegacyClient, free_port, run_client
import dispy_common as dc
from dispy_common import DispyJob

import dispynode as dn

FINISHED, TERMINATED, ABANDONED, CREATED = (DispyJob.Finished, DispyJob.Terminated,
                                            DispyJob.Abandoned, DispyJob.Created)


def _describe(res, node):
    return '%s\n--- node log ---\n%s' % (res.describe() if hasattr(res, 'describe') else res,
                                          node.log()[-8000:])


def _children(pid):
    kids = []
    for name in os.listdir('/proc'):
        if not name.isdigit():
            continue
        try:
            with open('/proc/%s/stat' % name) as fh:
                fields = fh.read().rsplit(')', 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(name))
    return kids


def _busy_worker(node_pid, timeout=10):
    """The node's worker process that has job processes (the spare has none)."""
    found = wait_for(lambda: [w for w in _children(node_pid) if _children(w)], timeout)
    assert found, 'no worker with running jobs under the node'
    return found[0]


def _next_client_served(node, cwd):
    res = run_client(CLIENTS / 'basic_jobs.py', node.port, free_port(), 'jobs=3', 'give_up=10',
                     timeout=40, cwd=cwd)
    assert res.data and not res.data.get('gave_up') and not res.data.get('watchdog'), \
        _describe(res, node)
    assert [j['status'] for j in res.data['jobs']] == [FINISHED] * 3, _describe(res, node)


def _kill_worker_midrun(node, tmp_path, *args):
    client = LegacyClient(CLIENTS / 'worker_death.py', node.port, free_port(), *args,
                          cwd=tmp_path, watchdog=60)
    with client:
        assert client.wait_line('RUNNING', 30) is not None, node.log()[-5000:]
        worker = _busy_worker(node.pid)
        os.kill(worker, signal.SIGKILL)
        res = client.result(70)
    assert res.data and 'error' not in res.data and not res.data.get('watchdog'), \
        _describe(res, node)
    return worker, res


# ---------------------------------------------------------------- a dead worker

@pytest.mark.interop
def test_killed_worker_jobs_go_on_in_a_new_worker(legacy_python, tmp_path):
    """-c 2, 12 jobs of 1 s, kill -9 of the computation's worker: the two
    running jobs end Terminated with the reason, the ten others run in a
    fresh worker (the computation has no setup: its code is all its
    state), and the next client is served.  Before: ten jobs stayed Created
    for ever, every JOB got NAK (invalid computation), and the next client
    got Busy."""
    node = dn_node(tmp_path, '-c', '2')
    with node:
        worker, res = _kill_worker_midrun(node, tmp_path, 'jobs=12', 'secs=1')
        jobs = res.data['jobs']
        assert res.data['all_final'], _describe(res, node)
        dead = [j for j in jobs if j['status'] == TERMINATED]
        assert len(dead) == 2, _describe(res, node)
        for j in dead:
            assert j['exception'] == ('worker process of the computation died '
                                      '(worker %d killed by signal 9)' % worker), j
        done = [j for j in jobs if j['status'] == FINISHED]
        assert len(done) == 10, _describe(res, node)
        assert {j['result']['worker'] for j in done} != {worker}, done
        assert worker not in {j['result']['worker'] for j in done}
        _next_client_served(node, tmp_path)


@pytest.mark.interop
def test_killed_worker_with_setup_ends_the_computation(legacy_python, tmp_path):
    """With setup, the worker's state cannot be rebuilt behind the client's
    back: the running jobs end Terminated with the reason, the client gets
    TERMINATED (as from an original node that shut down: jobs it had sent
    are rescheduled if reentrant, else Abandoned) and is invited back; it
    sets the computation up anew (setup runs again) and its remaining jobs
    run.  No job stays Created, and the next client is served."""
    node = dn_node(tmp_path, '-c', '2')
    with node:
        worker, res = _kill_worker_midrun(node, tmp_path, 'jobs=12', 'secs=1', 'setup=1')
        jobs = res.data['jobs']
        assert res.data['all_final'], _describe(res, node)
        statuses = [j['status'] for j in jobs]
        assert CREATED not in statuses, statuses
        dead = [j for j in jobs if j['status'] == TERMINATED]
        assert len(dead) == 2, _describe(res, node)
        for j in dead:
            assert j['exception'] == ('worker process of the computation died '
                                      '(worker %d killed by signal 9)' % worker), j
        done = [j for j in jobs if j['status'] == FINISHED]
        assert done and all(j['result']['base'] == 1000 for j in done), jobs
        assert worker not in {j['result']['worker'] for j in done}
        assert set(statuses) <= {TERMINATED, FINISHED, ABANDONED}, statuses
        assert 'computation has setup' in node.log()
        _next_client_served(node, tmp_path)


@pytest.mark.interop
def test_killed_worker_leaves_no_job_running(legacy_python, tmp_path):
    """The job processes of a killed worker are killed too: they would run
    on unseen (a 30 s job here), holding a CPU, their results lost with the
    worker.  Before, they ran to their end."""
    from legacy import pid_alive
    node = dn_node(tmp_path, '-c', '2')
    with node:
        client = LegacyClient(CLIENTS / 'worker_death.py', node.port, free_port(), 'jobs=2',
                              'secs=30', cwd=tmp_path, watchdog=60)
        with client:
            assert client.wait_line('RUNNING', 30) is not None, node.log()[-4000:]
            worker = _busy_worker(node.pid)
            jobs = wait_for(lambda: len(_children(worker)) == 2 and _children(worker), 10)
            assert jobs, node.log()[-4000:]
            os.kill(worker, signal.SIGKILL)
            assert wait_for(lambda: not [p for p in jobs if pid_alive(p)], 10), \
                'job processes %s still run\n%s' % (jobs, node.log()[-4000:])
            res = client.result(70)
        assert res.data and res.data.get('all_final'), _describe(res, node)
        assert [j['status'] for j in res.data['jobs']] == [TERMINATED] * 2, _describe(res, node)


def dn_node(tmp_path, *args, **kw):
    from nodes import NodeProc
    return NodeProc.start(tmp_path / 'node', args=args, **kw)


# ---------------------------------------------------------------- unit: requests and replies

@pytest.fixture
def unit_node(tmp_path, monkeypatch):
    monkeypatch.setattr(dn, 'RETRY_SECONDS', 0.2)
    nodes = []

    def start(args=(), **kw):
        node = InProcessNode.start(tmp_path / ('n%d' % len(nodes)), args=args, **kw)
        nodes.append(node)
        return node
    yield start
    for node in nodes:
        node.stop()


class AnswerServer:
    """A client's TCP server that answers every JOB_REPLY with ``answer``
    (None: reads it and closes without a word); counts them by uid."""

    def __init__(self, answer=b'NAK', port=0):
        self.answer = answer
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(('127.0.0.1', port))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.got = []
        self.answer_for = lambda uid: self.answer
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                try:
                    conn.settimeout(5)
                    msg = dc.recv_msg(conn)
                    if msg.startswith(b'JOB_REPLY:'):
                        uid = dc.loads_full(msg[10:]).uid
                        self.got.append(uid)
                        answer = self.answer_for(uid)
                        if answer is not None:
                            dc.send_msg(conn, answer)
                except (OSError, dc.ProtocolError):
                    pass

    def close(self):
        self.sock.close()


def _compute(drv, cid, code='def f(n):\n    return n\n'):
    answer, _ = drv.compute(code, 'f', compute_id=cid, auth='ab%04d' % cid, cleanup=True)
    assert answer == b'ACK', answer


@pytest.mark.parametrize('answer', [b'NAK', None], ids=['nak', 'no_answer'])
def test_unit_unacknowledged_reply_is_kept_after_bounded_attempts(unit_node, answer):
    """A reply the client refuses (or never answers) is sent
    MAX_REPLY_ATTEMPTS times in all, then only kept in the store, with a log
    line; before, the timer resent it every retry interval for ever."""
    sink = AnswerServer(answer)
    node = unit_node()
    drv = Driver('127.0.0.1', node.port, reply_port=sink.port)
    drv.ping_tcp()
    _compute(drv, 501)
    assert drv.job(501, 7, (1,)) == b'ACK'
    limit = getattr(dn, 'MAX_REPLY_ATTEMPTS', 5)
    assert wait_for(lambda: len(sink.got) >= limit, 20), (sink.got, node.log()[-4000:])
    # at 0.2 s per retry round, ten more rounds
    time.sleep(2.0)
    assert sink.got == [7] * limit, sink.got
    assert 'did not acknowledge the reply of job 7 in %d attempts' % limit in node.log()
    comp = node.node.state.find(501)
    assert node.node.state.stored_uids(comp) == [7]      # kept for recovery
    # the client asks (RESEND_JOB_RESULTS, as recover_jobs does): it is sent
    assert drv.resend(501, 'ab0501') == 1
    assert wait_for(lambda: len(sink.got) > limit, 10), sink.got
    sink.close()


def test_unit_one_refused_reply_does_not_stop_the_others(unit_node, monkeypatch):
    """A NAK concerns that one reply: the client's address is not marked
    down, so the replies of the jobs still running are delivered as they
    end, none stored.  Before, the NAK marked the address down and every
    reply of the next 10 s went to the store."""
    monkeypatch.setattr(dn, 'RETRY_SECONDS', 10.0)
    sink = AnswerServer(b'ACK')
    sink.answer_for = lambda uid: b'NAK' if uid == 1 else b'ACK'
    node = unit_node(args=('-c', '2'))
    drv = Driver('127.0.0.1', node.port, reply_port=sink.port)
    drv.ping_tcp()
    _compute(drv, 503, 'import time\ndef f(n):\n    time.sleep(n)\n    return n\n')
    assert drv.job(503, 2, (1.0,)) == b'ACK'
    assert drv.job(503, 1, (0,)) == b'ACK'     # refused as the others run
    assert wait_for(lambda: sink.got[:1] == [1], 10), sink.got
    comp = node.node.state.find(503)
    stored = set()
    deadline = time.monotonic() + 10
    while not wait_for(lambda: 2 in sink.got, 0.02):
        assert time.monotonic() < deadline, (sink.got, node.log()[-4000:])
        stored.update(node.node.state.stored_uids(comp))
    assert stored | set(node.node.state.stored_uids(comp)) == {1}, node.log()[-4000:]
    sink.close()


def test_unit_refused_requests_are_no_sign_of_life(unit_node):
    """A client whose every request is refused (the legacy client retries a
    refused JOB at once) is silent for the zombie rule: its computation is
    dropped after the zombie interval and the node is free again.  Before,
    each refusal refreshed the computation, which never became a zombie."""
    node = unit_node(env={'DISPYNODE_ZOMBIE_SECONDS': '1'})
    drv = Driver('127.0.0.1', node.port)
    drv.ping_tcp()
    _compute(drv, 504)
    deadline = time.monotonic() + 6
    while time.monotonic() < deadline and node.node.state.find(504) is not None:
        assert drv.job(999, 1, (1,)).startswith(b'NAK (invalid computation')
        time.sleep(0.05)
    assert node.node.state.find(504) is None, node.log()[-3000:]
    assert 'computation 504 of 127.0.0.1 is a zombie' in node.log()


def test_unit_undeliverable_reply_logs_are_summarised(unit_node):
    """A stored reply whose client is unreachable is retried every retry
    interval; the failure is logged once per minute with a count, not once
    per retry (360 lines an hour per result before)."""
    port = free_port()      # nobody listens: unreachable
    node = unit_node()
    drv = Driver('127.0.0.1', node.port, reply_port=port)
    drv.ping_tcp()
    _compute(drv, 505)
    assert drv.job(505, 3, (1,)) == b'ACK'
    comp = wait_for(lambda: node.node.state.find(505), 5)
    assert wait_for(lambda: node.node.state.stored_uids(comp) == [3], 10)
    time.sleep(2.0)             # some ten retry rounds
    lines = [line for line in node.log().splitlines() if 'could not deliver' in line]
    assert len(lines) == 1, lines


def test_unit_reply_is_held_when_it_cannot_be_stored(unit_node, monkeypatch):
    """Neither delivered nor storable (a full disk, no descriptor left): the
    reply is held in memory and tried again, delivered once the client is
    back, never dropped (before: "could not store the reply" and the job
    stayed Running at the client for ever)."""
    node = unit_node()
    port = free_port()
    drv = Driver('127.0.0.1', node.port, reply_port=port)
    drv.ping_tcp()
    _compute(drv, 506)
    real = node.node.workspace.save_reply
    fails = []

    def full_disk(*args):
        fails.append(args[1])
        raise OSError(errno.ENOSPC, 'No space left on device')
    monkeypatch.setattr(node.node.workspace, 'save_reply', full_disk)
    assert drv.job(506, 4, (1,)) == b'ACK'
    assert wait_for(lambda: len(fails) >= 2, 10), node.log()[-3000:]
    sink = AnswerServer(b'ACK', port=port)
    node.node.courier.revive(('127.0.0.1', port))
    assert wait_for(lambda: sink.got == [4], 10), node.log()[-3000:]
    monkeypatch.setattr(node.node.workspace, 'save_reply', real)
    assert not getattr(node.node, 'held', None)
    sink.close()


# ---------------------------------------------------------------- descriptors

def _cpu_seconds(pid):
    with open('/proc/%d/stat' % pid) as fh:
        fields = fh.read().rsplit(')', 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf('SC_CLK_TCK')


@pytest.mark.interop
def test_descriptor_limit_40_with_idle_connections(legacy_python, tmp_path):
    """``ulimit -n 40`` (soft and hard), a -c 2 node, 300 jobs of 20 ms and
    100 idle TCP connections held for 8 s: every job ends Finished, no
    reply is dropped, and the node uses under half a CPU over the run.
    Before: the accept loop spun on EMFILE, and "could not store the reply
    ...: [Errno 24]" left jobs Running for ever."""
    wrapper = tmp_path / 'python-nofile-40'
    wrapper.write_text('#!/bin/sh\nulimit -n 40\nexec %s "$@"\n' % sys.executable)
    wrapper.chmod(0o755)
    node = dn_node(tmp_path, '-c', '2', python=wrapper, debug=False)
    with node:
        cpu0, t0 = _cpu_seconds(node.pid), time.monotonic()
        client = LegacyClient(CLIENTS / 'worker_death.py', node.port, free_port(), 'jobs=300',
                              'secs=0.02', 'wait=100', cwd=tmp_path, watchdog=120)
        with client:
            assert client.wait_line('RUNNING', 30) is not None, node.log()[-4000:]
            idle = []
            try:
                for _ in range(100):
                    try:
                        idle.append(socket.create_connection(('127.0.0.1', node.port), 2))
                    except OSError:
                        pass        # refused or timed out: the node sheds them
                time.sleep(8)
            finally:
                for sock in idle:
                    sock.close()
            res = client.result(120)
        cpu = _cpu_seconds(node.pid) - cpu0
        wall = time.monotonic() - t0
        assert res.data and res.data.get('all_final'), _describe(res, node)
        statuses = [j['status'] for j in res.data['jobs']]
        assert statuses == [FINISHED] * 300, _describe(res, node)
        assert 'could not store' not in node.log(), node.log()[-4000:]
        assert cpu < 0.5 * wall, 'node used %.1f s of CPU in %.1f s\n%s' % (
            cpu, wall, node.log()[-4000:])


def test_unit_fd_budget_leaves_headroom_at_any_size():
    """The pending cap and the requests handled at once fit the soft limit
    with room for the node's own descriptors, from 32 up (the old cap was
    at least 32 pending connections whatever the limit)."""
    for soft in list(range(32, 2000)) + [4096, 65536]:
        pending, handlers = dn.fd_budget(soft, dn.MAX_CONNECTIONS)
        reserve = min(dn.FD_RESERVE, soft // 2)
        assert pending >= 4 and handlers >= 4, soft
        assert pending + max(2, pending // 4) + 2 * handlers + reserve <= soft + 8, soft
    assert dn.fd_budget(65536, 64) == (dn.MAX_PENDING, 64)


def test_unit_accept_pauses_while_descriptors_are_short(unit_node, monkeypatch):
    """accept() failing with EMFILE while a connection waits: the listener
    stays readable, so the accept loop stops polling it for a back-off
    interval instead of spinning, logs it once, and serves again after."""
    node = unit_node()
    calls = []
    real = node.node.tcp.get_request

    def no_descriptors():
        calls.append(time.monotonic())
        raise OSError(errno.EMFILE, 'Too many open files')
    monkeypatch.setattr(node.node.tcp, 'get_request', no_descriptors)
    waiting = socket.create_connection(('127.0.0.1', node.port), 2)
    try:
        time.sleep(2.0)
        assert 1 <= len(calls) <= 10, len(calls)
        assert node.log().count('out of descriptors') == 1, node.log()[-3000:]
        monkeypatch.setattr(node.node.tcp, 'get_request', real)
        drv = Driver('127.0.0.1', node.port)
        assert drv.ping_tcp() is not None
    finally:
        waiting.close()


# ---------------------------------------------------------------- faults that ended cleanly before (kept)

@pytest.mark.interop
@pytest.mark.node_modes('local', 'original')
def test_node_stopped_12s_midrun(node_factory, legacy_python, tmp_path):
    """SIGSTOP of the node's process group for 12 s while 20 jobs of 0.5 s
    run on -c 2, then SIGCONT: every job ends Finished at the client, on
    ours as on the original."""
    node = node_factory(args=('-c', '2'))
    client = LegacyClient(CLIENTS / 'worker_death.py', node.port, free_port(), 'jobs=20',
                          'secs=0.5', 'wait=80', cwd=tmp_path, watchdog=120)
    with client:
        assert client.wait_line('RUNNING', 30) is not None, node.log()[-4000:]
        os.killpg(node.pid, signal.SIGSTOP)
        try:
            time.sleep(12)
        finally:
            os.killpg(node.pid, signal.SIGCONT)
        res = client.result(120)
    assert res.data and res.data.get('all_final'), _describe(res, node)
    assert [j['status'] for j in res.data['jobs']] == [FINISHED] * 20, _describe(res, node)


@pytest.mark.interop
def test_killed_job_process_ends_terminated(legacy_python, tmp_path):
    """kill -9 of one job process (not its worker): that job ends
    Terminated with the signal, the others Finished in the same worker (no
    replacement).  The original never replies for such a job (README)."""
    node = dn_node(tmp_path, '-c', '2')
    with node:
        client = LegacyClient(CLIENTS / 'worker_death.py', node.port, free_port(), 'jobs=6',
                              'secs=1', cwd=tmp_path, watchdog=60)
        with client:
            assert client.wait_line('RUNNING', 30) is not None, node.log()[-4000:]
            worker = _busy_worker(node.pid)
            victim = _children(worker)[0]
            os.kill(victim, signal.SIGKILL)
            res = client.result(70)
        assert res.data and res.data.get('all_final'), _describe(res, node)
        jobs = res.data['jobs']
        dead = [j for j in jobs if j['status'] == TERMINATED]
        assert len(dead) == 1 and 'killed by signal 9' in dead[0]['exception'], jobs
        done = [j for j in jobs if j['status'] == FINISHED]
        assert len(done) == 5 and {j['result']['worker'] for j in done} == {worker}, jobs
        assert 'new worker' not in node.log()



def test_unit_soft_descriptor_limit_is_raised_to_the_hard_one(tmp_path):
    """At start the node raises its soft descriptor limit to the hard one
    (at most 65536), and says so when the limit stays under 1024."""
    import subprocess
    code = ('import resource, dispynode\n'
            'note = dispynode._raise_fd_limit()\n'
            'print(resource.getrlimit(resource.RLIMIT_NOFILE)[0], note)\n')
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    import resource
    for limits, noted in (((40, 4096), False), ((40, 40), True)):
        out = subprocess.run([sys.executable, '-c', code], cwd=repo, timeout=30,
                             stdout=subprocess.PIPE, universal_newlines=True,
                             preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE,
                                                                   limits))
        got, _, note = out.stdout.strip().partition(' ')
        assert int(got) == limits[1], out.stdout
        assert (note != 'None') == noted, out.stdout


def test_unit_worker_dying_in_setup_frees_the_node_without_invitation(unit_node):
    """A setup that kills its own worker: SETUP answers the failure, the
    computation ends and the node is free; the client is not invited back
    (no job ended with that worker), so a setup that always crashes cannot
    loop."""
    from recovery_util import wait_node_free
    node = unit_node()
    drv = Driver('127.0.0.1', node.port)
    drv.ping_tcp()
    code = ('import os, signal\ndef boom():\n    os.kill(os.getpid(), signal.SIGKILL)\n'
            'def f(n):\n    return n\n')
    answer, _ = drv.compute(code, 'f', compute_id=507, auth='ab0507',
                            setup=dc.Function('boom', (), {}))
    assert answer == b'ACK'
    assert drv.setup(507) != b'ACK'
    assert wait_node_free(node.port, 10), node.log()[-3000:]
    time.sleep(1.5)     # past the invitation's delay
    assert not [m for m in drv.server.all if m.tag == 'PING'], node.log()[-3000:]
    assert node.node.state.find(507) is None


def _live_children(pid):
    live = []
    for kid in _children(pid):
        try:
            with open('/proc/%d/stat' % kid) as fh:
                if fh.read().rsplit(')', 1)[1].split()[0] not in ('Z', 'X'):
                    live.append(kid)
        except OSError:
            pass
    return live


def test_unit_worker_dying_in_setup_is_not_replaced_behind_the_close(tmp_path):
    """Module code that kills its first worker (a flag in the computation
    directory lets the next one live): SETUP fails and closes the
    computation while the node handles the worker's death.  Nothing of it
    stays: the node keeps its spare alone, no reader thread and no
    cgroup.  (Before, the death was handled as a running computation's: a
    new worker was attached to the closed computation and lived on, one
    process, thread and cgroup per failed setup.)"""
    from recovery_util import wait_node_free
    node = driver.NodeProcess.start(tmp_path / 'n', args=('--zombie_interval', '0'))
    try:
        drv = Driver('127.0.0.1', node.port, timeout=20)
        drv.ping_tcp()
        code = ('import os\nif not os.path.exists("died"):\n'
                '    open("died", "w").close()\n    os._exit(3)\n'
                'def f(n):\n    return n\n')
        threads = len(os.listdir('/proc/%d/task' % node.pid))
        for _ in range(4):
            answer, comp = drv.compute(code, 'f')
            assert answer == b'ACK', node.log()[-3000:]
            assert drv.setup(comp.id) != b'ACK'
            assert wait_node_free(node.port, 10), node.log()[-3000:]
        assert wait_for(lambda: len(_live_children(node.pid)) == 1, 10), (
            _live_children(node.pid), node.log()[-4000:])
        assert wait_for(lambda: len(os.listdir('/proc/%d/task' % node.pid)) <= threads, 10)
        if 'cgroup of its own under ' in node.log():
            group = node.log().split('cgroup of its own under ', 1)[1].split()[0]
            assert wait_for(lambda: len([n for n in os.listdir(group)
                                         if n.startswith('w-')]) == 1, 10), os.listdir(group)
    finally:
        node.stop()


def test_unit_a_dead_spare_worker_leaves_no_cgroup(unit_node):
    """The spare worker is killed (a job of another computation of the job
    user may): the next computation gets a fresh worker, and the dead
    spare's cgroup is removed (before, it stayed, one per killed spare)."""
    node = unit_node()
    spare = wait_for(lambda: node.node.spare, 20)
    assert spare is not None
    group = spare.cgroup
    os.kill(spare.proc.pid, signal.SIGKILL)
    assert wait_for(lambda: spare.proc.poll() is not None, 10)
    drv = Driver('127.0.0.1', node.port)
    drv.ping_tcp()
    answer, comp = drv.compute('def f(n):\n    return n + 1\n', 'f')
    assert answer == b'ACK'
    assert drv.job(comp.id, 1, (1,)) == b'ACK'
    assert drv.server.wait_reply(1, timeout=20).result == 2
    if group is not None:
        assert not os.path.exists(group), group


# ---------------------------------------------------------------- many nodes (namespaces)

@pytest.mark.slow
@pytest.mark.node_modes('netns', 'original')
def test_four_nodes_through_the_scheduler(impl, node_factory, tmp_path, legacy_python):
    """SharedJobCluster through the legacy dispyscheduler to four nodes on
    one LAN (namespaces): every job Finished, spread over all four nodes,
    on ours as on the original."""
    import netns
    from test_netns import _lan, _tcp_probe
    ok, why = netns.available()
    if not ok:
        if os.environ.get('CI') == 'true':
            pytest.fail(why)
        pytest.skip(why)
    lab = netns.Lab(tmp_path / 'lab')
    try:
        _, c, hosts = _lan(lab, '10.231.40', 4)
        nodes = [node_factory(host=h, ip_addr=h.addr, args=['-c', '1']) for h in hosts]
        args = ['-d', '-i', c.addr, '--dest_path_prefix', str(tmp_path / 'sched')]
        for h in hosts:
            args += ['-n', h.addr]
        from legacy import ensure_legacy_venv
        sched = c.spawn([str(ensure_legacy_venv()), '-m', 'dispy.dispyscheduler'] + args,
                        tmp_path / 'scheduler.log', cwd=tmp_path)
        assert wait_for(lambda: _tcp_probe(lab, c, c.addr, 51349) == 'ok', 30), sched.log(8000)
        res = lab.run_client(c, 'netns_shared.py', 'ip_addr=%s' % c.addr, 'jobs=16',
                             'sleep=0.3', timeout=90)
        where = '%s\n--- scheduler ---\n%s' % (res.describe(), sched.log(8000))
        assert res.data and res.data.get('all_final'), where
        assert [j['status'] for j in res.data['jobs']] == [FINISHED] * 16, where
        assert all(j['result'] == j['id'] ** 2 + 1 for j in res.data['jobs']), where
        assert {j['ip_addr'] for j in res.data['jobs']} == {h.addr for h in hosts}, where
        assert all(n.alive() for n in nodes)
    finally:
        problems = lab.close()
    assert not problems, problems


def test_real_client_refusing_one_reply_gets_all_the_others_at_once(unit_node, legacy_python,
                                                                  tmp_path, monkeypatch):
    """The real 4.5.5 client refuses (NAK) a reply for a job it does not
    know, sent to it while its own 40 jobs run: that refusal concerns that
    reply alone, so every reply of its own jobs is delivered as the job
    ends and none goes to the store.  Before, the NAK marked the client's
    address down and the replies of the next RETRY_SECONDS were stored."""
    monkeypatch.setattr(dn, 'RETRY_SECONDS', 10.0)
    node = unit_node(args=('-c', '2'))
    client = LegacyClient(CLIENTS / 'basic_jobs.py', node.port, free_port(), 'jobs=40',
                          cwd=tmp_path, watchdog=90)
    stored = set()
    with client:
        comp = wait_for(lambda: next(iter(node.node.state.active.values()), None), 30)
        assert comp is not None, node.log()[-3000:]
        assert wait_for(lambda: comp.outcomes, 30), node.log()[-3000:]   # its jobs run
        foreign = dc.dumps(dc.JobReply(uid=1, hash='foreign', status=DispyJob.Finished,
                                       result=0))
        node.node.courier.submit(dn.Delivery(comp, 1, 'foreign', foreign, False))
        deadline = time.monotonic() + 80
        while client.proc.poll() is None and time.monotonic() < deadline:
            stored.update(comp.stored)
            time.sleep(0.02)
        res = client.result(10)
    assert res.data and res.data.get('jobs'), _describe(res, node)
    assert [j['status'] for j in res.data['jobs']] == [FINISHED] * 40, _describe(res, node)
    assert stored <= {1}, (stored, node.log()[-4000:])
