"""Issue 12, "Run it like a service" (and issue 11's shutdown outcome):
what the node does when it leaves or is told to drop a client, with the
real dispy 4.5.5 client.
"""

import json
import signal
import subprocess

import pytest

from dispy_common import DispyJob

import legacy
from legacy import free_port, pid_alive, wait_for
from nodes import NodeProc
from recovery_util import LegacyProc, processes_gone

pytestmark = [pytest.mark.interop]

PROVISIONAL, TERMINATED, ABANDONED, FINISHED = (
    DispyJob.ProvisionalResult, DispyJob.Terminated, DispyJob.Abandoned, DispyJob.Finished)
NODE_CLOSED = FINISHED + 5    # dispy.DispyNode.Closed


def start_node(tmp_path, name, args, **kw):
    """A node with exactly ``args`` (no -i of the launcher's: -i is repeatable
    here), not waited for (keywords go to nodes.NodeProc.start)."""
    return NodeProc.start(tmp_path / name, args, ip_addr=None, wait=False, **kw)


@pytest.fixture
def nodes(tmp_path):
    started = []

    def start(name, args, **kw):
        node = start_node(tmp_path, name, args, **kw)
        started.append(node)
        return node

    yield start
    for node in started:
        node.stop(timeout=5)


def _wait_log(node, text, timeout):
    return wait_for(lambda: text in node.log() or not node.alive(), timeout) and \
        text in node.log()


def _drop_scenario(nodes, tmp_path, a_args, trigger, a_env=None, rerun_on=('127.0.0.2',)):
    """Node A (127.0.0.1, 2 cpus) runs one job of a reentrant cluster and
    one of a non-reentrant cluster; ``trigger(a, cport)`` makes A drop them
    (it returns once A has).  Then node B (127.0.0.2) announces itself.
    Checks the original's client-visible outcome: no Terminated reply, the
    node's TERMINATED (DispyNode.Closed), the reentrant job rescheduled and
    Finished on B (or on A again, if A stays up and free: ``rerun_on``),
    the other Abandoned; A's job processes are gone.  Returns node A."""
    cport = free_port()
    a = nodes('a', ['-i', '127.0.0.1', '-c', '2', '--scheduler_node', '127.0.0.1',
                    '--scheduler_port', cport] + list(a_args), env=a_env)
    a.wait_ready()
    flag = tmp_path / 'flag'
    client = LegacyProc('shutdown_reentrant.py', a.port, cport, 'flag=%s' % flag,
                        cwd=tmp_path, watchdog=60)
    b = None
    try:
        line = client.wait_line('RUNNING:', 25)
        assert line is not None, client.describe() + a.log()[-5000:]
        pids = [i['job_pid'] for i in json.loads(line)]
        assert len(pids) == 2 and all(pid_alive(p) for p in pids), line
        trigger(a, cport)
        assert processes_gone(pids, 5), [p for p in pids if pid_alive(p)]
        # a second node announces itself to the client (the 4.5 client runs
        # a rescheduled job when a node event makes it schedule again)
        b = nodes('b', ['-i', '127.0.0.2', '--scheduler_node', '127.0.0.1',
                        '--scheduler_port', cport])
        flag.write_text('go')
        data = client.finish(45)
    finally:
        client.kill()
    desc = client.describe() + '\n--- a ---\n' + a.log()[-6000:] + (
        '\n--- b ---\n' + b.log()[-4000:] if b else '')
    assert data is not None and 'error' not in data and not data.get('watchdog'), desc
    assert data['all_final'], desc
    reent, plain = data['jobs']
    assert reent['status'] == FINISHED and reent['result'] == 10, (reent, desc)
    assert reent['ip_addr'] in rerun_on, reent
    assert plain['status'] == ABANDONED, (plain, desc)
    events = data['events']
    assert not [e for e in events if e[1] == TERMINATED], events
    assert [e for e in events if e[1] == NODE_CLOSED and e[2] == '127.0.0.1'], events
    assert [e for e in events if e[0] == 'plain' and e[1] == ABANDONED and e[3] == 2], events
    return a


def _stop_with(sig):
    def trigger(a, cport):
        a.proc.send_signal(sig)
        try:
            rc = a.proc.wait(15)
        except subprocess.TimeoutExpired:
            rc = None
        assert rc == 0, 'node exit code %r\n%s' % (rc, a.log()[-8000:])
    return trigger


@pytest.mark.node_modes('local', 'original')
def test_sigint_reschedules_reentrant_abandons_other(impl, nodes, legacy_python, tmp_path):
    """SIGINT while a reentrant and a non-reentrant job run: the node kills
    both job processes, sends no Terminated reply, tells the client
    TERMINATED and exits with code 0; the client reschedules the reentrant
    job, which finishes on a second node, and marks the other Abandoned.
    (With DISPYTEST_IMPLS=original the first node is dispy 4.5.5's own: it
    passes too.)"""
    def start(name, args, **kw):
        return nodes(name, args, impl=impl if name == 'a' else 'ours', **kw)

    a = _drop_scenario(start, tmp_path, [], _stop_with(signal.SIGINT))
    if impl == 'ours':
        assert 'node shutting down' in a.log()


def test_sigterm_reschedules_reentrant_abandons_other(nodes, legacy_python, tmp_path):
    """Issue 11: SIGTERM (systemd's stop) gives the original's SIGINT
    outcome (the original itself just dies on SIGTERM, and its client waits
    for ever)."""
    a = _drop_scenario(nodes, tmp_path, [], _stop_with(signal.SIGTERM))
    assert 'node shutting down' in a.log()


def test_service_window(nodes, legacy_python, tmp_path):
    """--service_start 10:00 --service_end 10:06 on a fast clock (starts at
    09:59, 2 s a minute): the node answers no client before 10:00, then
    announces itself and serves the client; at 10:06 its running jobs end
    as in a shutdown (reentrant -> rescheduled on another node, the other
    Abandoned), and the node stays up, out of service."""
    env = {'DISPYNODE_CLOCK_START': '09:59', 'DISPYNODE_MINUTE_SECONDS': '2'}

    def trigger(a, cport):
        assert _wait_log(a, 'dropping computation', 20), a.log()[-5000:]
        assert a.alive()

    a = _drop_scenario(nodes, tmp_path, ['--service_start', '10:00', '--service_end', '10:06'],
                       trigger, a_env=env)
    log = a.log()
    assert log.index('service window: open') < log.index('computation ')
    assert log.index('service window: ended') < log.index('dropping computation')
    assert 'service window ended' in log
    assert a.alive()


def test_serve_one_computation(node_factory, legacy_python, tmp_path):
    """--serve 1: the node serves one client's computation, then exits 0."""
    node = node_factory(args=['--serve', '1'])
    res = legacy.run_client(legacy.CLIENTS / 'basic_jobs.py', node.port, free_port(),
                            'jobs=3', timeout=60, cwd=tmp_path)
    data = legacy.check_client(res, node)
    assert [j['status'] for j in data['jobs']] == [FINISHED] * 3, legacy.describe(res, node)
    try:
        rc = node.proc.wait(15)
    except subprocess.TimeoutExpired:
        rc = None
    assert rc == 0, node.log()[-5000:]
    assert 'served 1 computation' in node.log()
