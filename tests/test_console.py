"""Issue 12: the interactive console, driven through a pseudo-terminal:
status, cpus, stop/start, quit (protocol driver) and release (real legacy
4.5.5 client: the outcome of a node drop)."""

import os
import pty
import signal
import subprocess
import threading
import time

import pytest

import dispy_common as dc
from driver import Driver, NodeProcess, free_port
from nodes import node_argv
from legacy import wait_for

import test_service as ts

NCPU = os.cpu_count() or 1


class Terminal:
    """A pty whose slave end is the node's stdin (and, with ``all_io``,
    stdout and stderr too); ``text`` collects what the node writes."""

    def __init__(self, all_io=True):
        self.master, self.slave = pty.openpty()
        self.chunks = []
        self.all_io = all_io
        if all_io:
            threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        while True:
            try:
                data = os.read(self.master, 65536)
            except OSError:
                return
            if not data:
                return
            self.chunks.append(data.decode(errors='replace'))

    @property
    def text(self):
        return ''.join(self.chunks)

    def type(self, line):
        os.write(self.master, (line + '\n').encode())

    def wait_for(self, text, timeout=10, start=0):
        return wait_for(lambda: text in self.text[start:], timeout)

    def close(self):
        for fd in (self.master, self.slave):
            try:
                os.close(fd)
            except OSError:
                pass


def start_console_node(tmp_path, args=()):
    """Our node with its stdin, stdout and stderr on a terminal (the test
    reads its output there, not from a log file)."""
    term = Terminal()
    port = free_port()
    prefix = tmp_path / 'prefix'
    cmd = node_argv() + ['-i', '127.0.0.1', '-p', str(port),
           '--dest_path_prefix', str(prefix), '-c', str(NCPU)] + list(args)
    proc = subprocess.Popen(cmd, stdin=term.slave, stdout=term.slave, stderr=term.slave,
                            start_new_session=True, env=dict(os.environ, PYTHONUNBUFFERED='1'))
    return term, proc, port


def _stop(proc):
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait(5)


def test_console_status_cpus_stop_start_quit(tmp_path):
    term, proc, port = start_console_node(tmp_path)
    d = None
    try:
        assert term.wait_for('dispynode console', 15), term.text
        d = Driver('127.0.0.1', port)
        pong = d.ping_tcp()
        assert pong['cpus'] == NCPU
        answer, compute = d.compute('import time\ndef crunch_numbers():\n'
                                    '    time.sleep(30)\n', 'crunch_numbers')
        assert answer == b'ACK'
        assert d.job(compute.id, 1) == b'ACK'
        mark = len(term.text)
        term.type('status')
        assert term.wait_for('crunch_numbers', 10, mark), term.text[mark:]
        out = term.text[mark:]
        assert 'cpus' in out and 'uptime' in out, out
        # fewer cpus: the client is told with a PONG (which a 4.5 client
        # applies: it only ever lowers its count)
        fewer = max(1, NCPU - 1)
        term.type('cpus %d' % fewer)
        assert term.wait_for('offering %d cpus' % fewer, 5), term.text
        if fewer < NCPU:
            pong = d.server.wait('PONG', 10, lambda info: info['cpus'] == fewer)
            assert pong is not None, term.text
        term.type('cpus 999')
        assert term.wait_for('cpus must be between', 5), term.text
        # stop: no new computation (the running one goes on); start: again
        d.close(compute.id, terminate_pending=True)
        assert wait_for(lambda: 'computation %s closed' % compute.id in term.text, 15), \
            term.text
        mark = len(term.text)       # (the text before may say these words already)
        term.type('stop')
        assert term.wait_for('stopped:', 5, mark)
        answer, _ = d.compute('def f():\n    return 1\n', 'f')
        assert answer == b'NAK (node is stopped)'
        mark = len(term.text)   # 'started' also ends an earlier log line
        term.type('start')
        assert term.wait_for('started', 5, mark)
        answer, _ = d.compute('def f():\n    return 1\n', 'f')
        assert answer == b'ACK'
        term.type('help')
        assert term.wait_for('commands: status', 5)
        term.type('quit')
        assert proc.wait(15) == 0, term.text
        assert 'console quit' in term.text
    finally:
        if d is not None:
            d.close_server()
        _stop(proc)
        term.close()


def test_no_console_with_daemon_or_without_terminal(tmp_path):
    """--daemon (or a stdin that is no terminal) means no console: the node
    neither prints the console banner nor reads stdin."""
    term, proc, port = start_console_node(tmp_path / 'd', ['--daemon'])
    try:
        assert term.wait_for('serving', 15), term.text
        term.type('quit')
        time.sleep(1.0)
        assert proc.poll() is None and 'dispynode console' not in term.text
    finally:
        _stop(proc)
        term.close()
    node = NodeProcess.start(tmp_path / 'n')     # stdin is /dev/null
    try:
        assert 'dispynode console' not in node.log()
        assert node.stop(signal.SIGTERM) == 0
    finally:
        node.stop()


@pytest.mark.interop
def test_console_release(legacy_python, tmp_path):
    """'release' in the console drops the current client's computations
    now, with the client-visible outcome of a node drop: the reentrant job
    is rescheduled and finishes on another node, the other is Abandoned.
    The node stays up and free (so the client may take it again).
    'status' showed the computation first."""
    term = Terminal(all_io=False)
    started = []

    def nodes(name, args, **kw):
        kw['stdin'] = term.slave if name == 'a' else subprocess.DEVNULL
        node = ts.start_node(tmp_path, name, args, **kw)
        started.append(node)
        return node

    def trigger(a, cport):
        assert wait_for(lambda: 'dispynode console' in a.log(), 10), a.log()
        term.type('status')
        assert wait_for(lambda: 'compute ' in a.log().split('dispynode console')[-1]
                        and 'uptime' in a.log(), 10), a.log()
        term.type('release')
        assert wait_for(lambda: 'released from the console' in a.log(), 10), a.log()

    try:
        a = ts._drop_scenario(nodes, tmp_path, [], trigger,
                              rerun_on=('127.0.0.1', '127.0.0.2'))
        assert a.alive()
        assert 'released 2 computation(s)' in a.log()
    finally:
        for node in started:
            node.stop(timeout=5)
        term.close()


@pytest.mark.interop
@pytest.mark.skipif(NCPU < 2 and os.environ.get('CI') != 'true',
                    reason='lowering the CPU count needs 2 cpus')
def test_console_cpus_reaches_legacy_client(legacy_python, tmp_path):
    """'cpus 1' on a 2-cpu node while a legacy client's job runs: the
    client's view of the node (cluster.status()) drops to 1 cpu, and its
    job still finishes."""
    term = Terminal(all_io=False)
    node = ts.start_node(tmp_path, 'a', ['-i', '127.0.0.1', '-c', '2'], stdin=term.slave)
    flag = tmp_path / 'flag'
    client = None
    try:
        node.wait_ready()
        client = ts.LegacyProc('console_cpus.py', node.port, free_port(), 'flag=%s' % flag,
                               cwd=tmp_path, watchdog=50)
        line = client.wait_line('RUNNING:', 25)
        assert line == '2', '%r\n%s\n%s' % (line, client.describe(), node.log()[-4000:])
        term.type('cpus 1')
        assert wait_for(lambda: 'now offering 1 cpus' in node.log(), 10), node.log()
        flag.write_text('go')
        data = client.finish(40)
    finally:
        if client is not None:
            client.kill()
        node.stop(timeout=5)
        term.close()
    assert data is not None and 'error' not in data and not data.get('watchdog'), \
        client.describe() + node.log()[-4000:]
    assert data['before'] == 2 and data['after'] == 1, (data, node.log()[-4000:])
    assert data['all_final'] and data['job']['status'] == dc.DispyJob.Finished, data
