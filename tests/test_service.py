"""Issue 12, "Run it like a service" (and issue 11's shutdown outcome):
what the node does when it leaves or is told to drop a client, with the
real dispy 4.5.5 client.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import legacy
from legacy import REPO, free_port, pid_alive, wait_for
from recovery_util import LegacyProc, processes_gone

pytestmark = [pytest.mark.interop]

PROVISIONAL, TERMINATED, ABANDONED, FINISHED = 7, 9, 10, 11
NODE_CLOSED = FINISHED + 5    # dispy.DispyNode.Closed


def start_node(tmp_path, name, args, port=None, env=None, stdin=subprocess.DEVNULL):
    """Our node with exactly ``args`` (legacy.Node.start always adds
    ``-i 127.0.0.1``, and -i is repeatable here)."""
    port = port or free_port()
    prefix = tmp_path / name / 'prefix'
    prefix.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(REPO / 'dispynode.py'), '-d', '-p', str(port),
           '--dest_path_prefix', str(prefix)] + [str(a) for a in args]
    log_path = prefix.parent / 'node.log'
    full_env = dict(os.environ, PYTHONUNBUFFERED='1')
    full_env.update(env or {})
    with open(str(log_path), 'ab') as log:
        proc = subprocess.Popen(cmd, stdin=stdin, stdout=log, stderr=subprocess.STDOUT,
                                env=full_env, cwd=str(prefix.parent), start_new_session=True)
    return legacy.Node('ours', port, prefix, proc, log_path, cmd)


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


@pytest.mark.parametrize('sig', [signal.SIGTERM, signal.SIGINT], ids=['SIGTERM', 'SIGINT'])
def test_shutdown_reschedules_reentrant_abandons_other(nodes, legacy_python, tmp_path, sig):
    """A node (127.0.0.1) runs a job of a reentrant cluster and one of a
    non-reentrant cluster when it gets SIGTERM (systemd's stop) or SIGINT.
    As with the original node on SIGINT: the node kills both job processes,
    sends no Terminated reply, tells the client TERMINATED and exits with
    code 0; the client reschedules the reentrant job, which finishes on a
    second node (127.0.0.2) that announces itself afterwards, and marks the
    other Abandoned."""
    a = nodes('a', ['-i', '127.0.0.1', '-c', '2'])
    a.wait_ready()
    flag = tmp_path / 'flag'
    cport = free_port()
    client = LegacyProc('shutdown_reentrant.py', a.port, cport, 'flag=%s' % flag,
                        cwd=tmp_path, watchdog=60)
    b = None
    try:
        line = client.wait_line('RUNNING:', 25)
        assert line is not None, client.describe() + a.log()[-5000:]
        pids = [i['job_pid'] for i in json.loads(line)]
        assert len(pids) == 2 and all(pid_alive(p) for p in pids), line
        a.proc.send_signal(sig)
        try:
            rc = a.proc.wait(15)
        except subprocess.TimeoutExpired:
            rc = None
        assert rc == 0, 'node exit code %r\n%s' % (rc, a.log()[-8000:])
        assert processes_gone(pids, 5), [p for p in pids if pid_alive(p)]
        # a second node announces itself to the client (as the 4.5 client
        # needs, to run a rescheduled job: it schedules on a node event)
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
    assert reent['ip_addr'] == '127.0.0.2', reent
    assert plain['status'] == ABANDONED, (plain, desc)
    # no Terminated reply reached the client; it saw the node leave
    events = data['events']
    assert not [e for e in events if e[1] == TERMINATED], events
    assert [e for e in events if e[1] == NODE_CLOSED and e[2] == '127.0.0.1'], events
    assert [e for e in events if e[0] == 'plain' and e[1] == ABANDONED and e[3] == 2], events
    assert 'node shutting down' in a.log()
