"""Operating a node without a terminal (issue 22, and issue 20's /metrics
items): the control commands (drain, pause, resume, cpus, release, stop)
over the control socket, drain with the real dispy 4.5.5 client, SIGHUP
and --log_file, /healthz, the process and build metrics, the reasons of
terminated jobs (metrics and one log line each), escaped label values,
and a /metrics endpoint that a slow client cannot block."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from dispy_common import DispyJob

from legacy import CLIENTS, REPO, check_client, describe, free_port, start_client, wait_for
from nodes import NodeProc
from test_observe import _open_prefix, as_user

sys.path.insert(0, str(REPO))
import dispynode as dn  # noqa: E402

pytestmark = [pytest.mark.interop]

FINISHED, TERMINATED, ABANDONED = DispyJob.Finished, DispyJob.Terminated, DispyJob.Abandoned
NOBODY = 65534


def cli(*args, timeout=60):
    """``python3 dispynode.py <args>``: (exit code, stdout, stderr) as text."""
    r = subprocess.run([sys.executable, str(REPO / 'dispynode.py')] + [str(a) for a in args],
                       stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, timeout=timeout, universal_newlines=True)
    return r.returncode, r.stdout, r.stderr


def status(node):
    rc, out, err = cli('status', '--json', '--dest_path_prefix', node.prefix)
    assert rc == 0, (out, err, node.log()[-4000:])
    return json.loads(out)


def http_get(port, path, timeout=10):
    """(status, body) of GET http://127.0.0.1:port/path."""
    try:
        with urllib.request.urlopen('http://127.0.0.1:%d%s' % (port, path),
                                    timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def metric_samples(text):
    from prometheus_client.parser import text_string_to_metric_families
    samples, kinds = {}, {}
    for family in text_string_to_metric_families(text):
        kinds[family.name] = family.type
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples, kinds


@pytest.fixture
def nodes(tmp_path):
    started = []

    def start(name, args=(), **kw):
        node = NodeProc.start(tmp_path / name, list(args), **kw)
        started.append(node)
        return node

    yield start
    for node in started:
        node.stop(timeout=5)


# ---------------------------------------------------------------- drain

def test_drain_two_running_jobs_then_exit(nodes, legacy_python, tmp_path):
    """Two jobs of a real client run on node A when A is drained: the drain
    command returns once A has exited (0), both jobs are Finished; while A
    drains, its status says so, /healthz is 503 'draining', a drain with a
    short --timeout exits 1, and a second client's computation that
    arrives then runs on node B, not on A."""
    mport = free_port()
    b_client_port = free_port()
    a = nodes('a', ['-c', '2', '--daemon', '--metrics', mport])
    # B announces itself to the second client every second while it is free
    b = nodes('b', ['--daemon', '--scheduler_node', '127.0.0.1', '--scheduler_port',
                    b_client_port, '--ping_interval', '1'], ip_addr='127.0.0.2')
    assert http_get(mport, '/healthz') == (200, 'ok\n')
    first = start_client(CLIENTS / 'operate_jobs.py', a.port, free_port(), 'modes=sleep,sleep',
                         'seconds=5', timeout=90, cwd=tmp_path)
    second = drain = None
    try:
        assert wait_for(lambda: len(status(a)['jobs_running']) == 2, 30, 0.2), \
            first.describe() + a.log()[-4000:]
        drain = subprocess.Popen([sys.executable, str(REPO / 'dispynode.py'), 'drain',
                                  '--dest_path_prefix', str(a.prefix)],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 universal_newlines=True)
        st = wait_for(lambda: (lambda s: s if s['draining'] else None)(status(a)), 10, 0.1)
        assert st and st['serving'] is False and len(st['jobs_running']) == 2, st
        assert st['refusing'] == 'draining', st
        assert http_get(mport, '/healthz') == (503, 'draining\n')
        rc, out, err = cli('drain', '--timeout', '0.5', '--dest_path_prefix', a.prefix)
        assert rc == 1 and 'still draining after 0.5s' in err, (rc, out, err)
        assert a.alive()
        second = start_client(CLIENTS / 'operate_jobs.py', a.port, b_client_port,
                              'modes=sleep,sleep', 'seconds=0.1', 'nodes=127.0.0.1,127.0.0.2',
                              timeout=60, cwd=tmp_path)
        out, err = drain.communicate(timeout=60)
        assert drain.returncode == 0, (out, err, a.log()[-6000:])
        assert out.splitlines() == ['drained: the node (pid %d) has exited' % a.pid], out
        assert a.proc.wait(10) == 0, a.log()[-6000:]
        res = first.result(60)
        data = check_client(res, a)
        assert [j['status'] for j in data['jobs']] == [FINISHED] * 2, describe(res, a)
        assert [j['result'] for j in data['jobs']] == [0, 1], describe(res, a)
        res = second.result(60)
        data = check_client(res, b)
        assert [j['status'] for j in data['jobs']] == [FINISHED] * 2, describe(res, b)
        assert {j['ip_addr'] for j in data['jobs']} == {'127.0.0.2'}, describe(res, b)
    finally:
        for proc in (first, second):
            if proc is not None:
                proc.kill()
        if drain is not None and drain.poll() is None:
            drain.kill()
            drain.wait()
    log = a.log()
    assert log.count(' started in ') == 1, log[-6000:]      # only the first client's
    assert 'draining: no new computation or job' in log and 'exiting: drained' in log, log
    assert 'Traceback' not in log, log


def test_drain_refuses_new_jobs_and_computations(nodes):
    """At the protocol level: while draining, a JOB of the current client
    and a new COMPUTE get 'NAK (node is draining)'; the running job's
    reply is still delivered, then the node exits 0."""
    from driver import Driver
    a = nodes('a', ['--daemon'])
    d = Driver('127.0.0.1', a.port)
    drain = None
    try:
        d.ping_tcp()
        _, compute = d.compute('import time\ndef f(n):\n    time.sleep(n)\n    return n\n', 'f')
        assert d.job(compute.id, 1, args=(3,)) == b'ACK'
        assert wait_for(lambda: status(a)['jobs_running'], 10, 0.1)
        drain = subprocess.Popen([sys.executable, str(REPO / 'dispynode.py'), 'drain',
                                  '--dest_path_prefix', str(a.prefix), '--timeout', '60'],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 universal_newlines=True)
        assert wait_for(lambda: status(a)['draining'], 10, 0.1)
        assert d.job(compute.id, 2, args=(0,)) == b'NAK (node is draining)'
        answer, _ = d.compute('def g():\n    return 1\n', 'g')
        assert answer == b'NAK (node is draining)'
        reply = d.server.wait_reply(1, 30)
        assert reply is not None and reply.status == FINISHED and reply.result == 3, a.log()
        out, err = drain.communicate(timeout=60)
        assert drain.returncode == 0 and out.startswith('drained: '), (out, err)
        assert a.proc.wait(10) == 0
        assert d.server.wait_reply(2, 0.5) is None
    finally:
        d.close_server()
        if drain is not None and drain.poll() is None:
            drain.kill()
            drain.wait()


# ---------------------------------------------------------------- control commands

def test_control_commands(nodes, legacy_python, tmp_path):
    """pause, resume, cpus N, release and stop through ``python3
    dispynode.py <command>`` (found by --dest_path_prefix or --config):
    one line each, exit 0, and the node does it; a bad value exits 1.
    SIGHUP without --log_file leaves the node serving."""
    mport = free_port()
    a = nodes('a', ['-c', '2', '--daemon', '--metrics', mport])
    config = tmp_path / 'node.ini'
    config.write_text('[dispynode]\ndest_path_prefix = %s\n' % a.prefix)
    by_prefix = ('--dest_path_prefix', a.prefix)

    assert cli('pause', *by_prefix) == (
        0, 'stopped: running work goes on, no new computation\n', '')
    st = status(a)
    assert st['paused'] is True and st['serving'] is False and st['refusing'] == 'paused', st
    assert http_get(mport, '/healthz') == (503, 'paused\n')
    assert cli('resume', '--config', config) == (0, 'started\n', '')
    assert status(a)['paused'] is False and http_get(mport, '/healthz') == (200, 'ok\n')
    assert cli('cpus', '1', *by_prefix) == (0, 'offering 1 cpus\n', '')
    assert status(a)['cpus'] == 1
    rc, out, err = cli('cpus', '99', *by_prefix)
    assert rc == 1 and out == '' and 'cpus must be between' in err, (rc, out, err)
    assert cli('cpus', '2', *by_prefix)[0] == 0

    # release drops a real client's computation: its running (not
    # reentrant) job is abandoned, as with the console's release
    client = start_client(CLIENTS / 'operate_jobs.py', a.port, free_port(), 'modes=timeout',
                          'wait=30', timeout=60, cwd=tmp_path)
    try:
        assert wait_for(lambda: status(a)['jobs_running'], 30, 0.2), client.describe()
        assert cli('release', *by_prefix) == (0, 'released 1 computation(s)\n', '')
        res = client.result(60)
    finally:
        client.kill()
    data = check_client(res, a)
    assert [j['status'] for j in data['jobs']] == [ABANDONED], describe(res, a)
    assert wait_for(lambda: not status(a)['computations'], 15, 0.2), a.log()[-4000:]
    assert 'released by a control command' in a.log()

    # SIGHUP without --log_file: the node goes on serving
    a.send_signal(signal.SIGHUP)
    assert wait_for(lambda: 'SIGHUP: no --log_file to reopen' in a.log(), 10), a.log()
    assert a.alive() and status(a)['serving'] is True

    rc, out, err = cli('stop', '--config', config)
    assert (rc, out) == (0, 'stopped: the node (pid %d) has exited\n' % a.pid), (rc, out, err)
    assert a.proc.wait(10) == 0
    assert 'exiting: control stop' in a.log(), a.log()[-3000:]
    rc, out, err = cli('pause', *by_prefix)
    assert rc == 1 and 'no node control socket' in err, (rc, out, err)


def test_control_commands_refuse_other_users(nodes):
    """Another user's commands are refused by its peer credentials (and
    change nothing), even with the socket opened up to it; the node's own
    user is still served."""
    if os.geteuid() != 0 and os.environ.get('CI') != 'true':
        pytest.skip('needs root to act as another user')
    base = Path(tempfile.mkdtemp(prefix='dispynode-op-'))
    a = nodes('a', ['-c', '2', '--daemon'], prefix=base / 'prefix')
    _open_prefix(a.prefix)
    path = a.prefix / dn.CONTROL_SOCKET
    os.chmod(str(path), 0o666)
    try:
        for line in ('pause', 'resume', 'cpus 1', 'release', 'drain', 'stop'):
            got = as_user(NOBODY, lambda: _raw(path, line))
            assert got == 'ok:{"error": "permission denied"}\n', (line, got)
        got = as_user(NOBODY, lambda: json.dumps(dn.query_control(str(a.prefix))))
        assert got.startswith('error:OSError: refusing'), got     # the CLI's own check
    finally:
        os.chmod(str(path), 0o600)
    st = status(a)
    assert st['paused'] is False and st['draining'] is False and st['cpus'] == 2, st
    assert a.alive() and 'refusing a request of user %d' % NOBODY in a.log()
    assert cli('pause', '--dest_path_prefix', a.prefix)[0] == 0     # the node's own user
    assert status(a)['paused'] is True
    shutil.rmtree(str(base), ignore_errors=True)


def _raw(path, line):
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(path))
        s.sendall(line.encode() + b'\n')
        data = b''
        while True:
            chunk = s.recv(4096)
            if not chunk:
                return data.decode()
            data += chunk


def test_control_cli_usage_errors(tmp_path):
    """Usage errors exit 2; no node behind the prefix exits 1."""
    rc, out, err = cli('cpus', '--dest_path_prefix', tmp_path)
    assert rc == 2 and 'N' in err, err
    rc, out, err = cli('drain', '--timeout', '-1', '--dest_path_prefix', tmp_path)
    assert rc == 2, err
    rc, out, err = cli('drain', '--dest_path_prefix', tmp_path / 'none')
    assert rc == 1 and err.startswith('dispynode: error: no node control socket'), err


# ---------------------------------------------------------------- SIGHUP, --log_file

def test_sighup_reopens_log_file(nodes, legacy_python, tmp_path):
    """With --log_file the log goes to that file; after logrotate's move
    and a SIGHUP the node writes to a new file of that name and goes on
    serving a real client."""
    log = tmp_path / 'logs' / 'dispynode.log'
    log.parent.mkdir()
    a = nodes('a', ['--daemon', '--log_file', log], wait=False)
    assert wait_for(lambda: log.exists() and 'serving ' in log.read_text(), 15), a.log()
    assert 'serving ' not in a.log()          # nothing on stderr
    rotated = log.with_name('dispynode.log.1')
    os.rename(str(log), str(rotated))
    a.send_signal(signal.SIGHUP)
    assert wait_for(lambda: log.exists() and 'log file %s reopened' % log in log.read_text(),
                    10), rotated.read_text()[-3000:]
    assert a.alive()
    res = start_client(CLIENTS / 'operate_jobs.py', a.port, free_port(), 'modes=sleep,sleep',
                       'seconds=0.1', timeout=60, cwd=tmp_path).result(60)
    data = check_client(res)
    assert [j['status'] for j in data['jobs']] == [FINISHED] * 2, res.describe() + \
        log.read_text()
    assert ' started in ' in log.read_text() and ' started in ' not in rotated.read_text()
    assert a.stop(signal.SIGTERM) == 0
    assert 'stopped' in log.read_text() and 'Traceback' not in log.read_text()


def test_log_file_unwritable_is_a_cli_error(tmp_path):
    rc, out, err = cli('-i', '127.0.0.1', '--dest_path_prefix', tmp_path / 'p',
                       '--log_file', tmp_path / 'missing' / 'x.log')
    assert rc == 2 and err.startswith('dispynode: error: --log_file ') and \
        err.count('\n') == 1, err


# ---------------------------------------------------------------- health

@pytest.mark.parametrize('case', ['guard', 'window'])
def test_healthz_names_the_reason(nodes, case):
    """503 with the reason while the free-memory guard refuses work, and
    outside the service window; other paths stay 404."""
    mport = free_port()
    if case == 'guard':
        nodes('a', ['--daemon', '--metrics', mport, '--min_free_memory', '64m'],
              env={'DISPYNODE_FREE_MEMORY': '1m'})
        want = 'guard: free memory 1m is below --min_free_memory 64m\n'
    else:
        # the clock shows 23:00; the service starts at 23:30
        nodes('a', ['--daemon', '--metrics', mport, '--service_start', '23:30',
                    '--service_stop', '23:50'], env={'DISPYNODE_CLOCK_START': '23:00'})
        want = 'outside the service window\n'
    assert http_get(mport, '/healthz') == (503, want)
    assert http_get(mport, '/nothing')[0] == 404


# ---------------------------------------------------------------- metrics and job log lines

def test_terminated_reasons_metrics_and_log_lines(nodes, legacy_python, tmp_path):
    """A real client's jobs that raise, die of a signal, exit, hit
    --job_memory and --job_timeout, and are cancelled: each is counted by
    its reason in dispynode_jobs_terminated_total and has one log line
    naming the job, its computation, the client and the reason; the job
    that finishes has none.  /metrics also carries process_* and
    dispynode_build_info."""
    mport = free_port()
    a = nodes('a', ['--daemon', '--metrics', mport, '--job_timeout', '3',
                    '--job_memory', '128m'])
    cport = free_port()
    modes = ['cancel', 'raise', 'signal', 'exit', 'alloc', 'timeout', 'sleep']
    res = start_client(CLIENTS / 'operate_jobs.py', a.port, cport, 'modes=' + ','.join(modes),
                       'seconds=0.1', timeout=90, cwd=tmp_path).result(90)
    data = check_client(res, a)
    assert [j['status'] for j in data['jobs']] == [TERMINATED] * 6 + [FINISHED], \
        describe(res, a)
    assert wait_for(lambda: sum(status(a)['jobs_done'].values()) == 7, 15, 0.2)
    code, text = http_get(mport, '/metrics')
    assert code == 200
    samples, kinds = metric_samples(text)
    reasons = {r: samples[('dispynode_jobs_terminated_total', (('reason', r),))]
               for r in ('exception', 'signal', 'exited', 'cancelled', 'job_timeout',
                         'job_memory')}
    assert reasons == dict.fromkeys(reasons, 1), (reasons, text)
    assert kinds['dispynode_jobs_terminated'] == 'counter'
    # the outcome counts are as before
    assert samples[('dispynode_jobs_total', (('outcome', 'Terminated'),))] == 6
    assert samples[('dispynode_jobs_total', (('outcome', 'Finished'),))] == 1
    assert samples[('dispynode_build_info', (('protocol', '4.5'), (
        'python', '%d.%d.%d' % sys.version_info[:3]), ('version', dn.__version__)))] == 1
    assert kinds['process_cpu_seconds'] == 'counter', kinds
    assert samples[('process_cpu_seconds_total', ())] > 0
    assert samples[('process_resident_memory_bytes', ())] > 4 << 20
    fds = samples[('process_open_fds', ())]
    assert 5 <= fds == int(fds) < 1000, fds
    start = samples[('process_start_time_seconds', ())]
    assert time.time() - 600 < start <= time.time(), start
    st = status(a)
    assert st['jobs_terminated'] == dict(reasons), st
    # one log line per job that did not finish normally
    log = a.log()
    lines = [line for line in log.splitlines()
             if re.search(r' job \d+ of computation \d+ \(compute\) from 127\.0\.0\.1:%d: '
                          % cport, line)]
    got = sorted(re.search(r': Terminated, (\w+) \(', line).group(1) for line in lines)
    assert got == sorted(reasons), '\n'.join(lines) + log[-6000:]
    assert len({re.search(r' job (\d+) ', line).group(1) for line in lines}) == 6, lines


def test_metrics_slow_client_beside_fast_scrape(nodes):
    """Three idle connections and one that sends a byte at a time do not
    keep a scrape out: it is answered while they are still connected; the
    slow ones are dropped at their deadline."""
    mport = free_port()
    a = nodes('a', ['--daemon', '--metrics', mport])
    idle = [socket.create_connection(('127.0.0.1', mport), timeout=10) for _ in range(3)]
    slow = socket.create_connection(('127.0.0.1', mport), timeout=10)
    stop = threading.Event()
    sent = []

    def trickle():
        for byte in b'GET /metrics HTTP/1.0\r\nX-Slow: ' + b'x' * 200:
            if stop.wait(0.2):
                return
            try:
                slow.sendall(bytes([byte]))
                sent.append(byte)
            except OSError:
                return

    thread = threading.Thread(target=trickle, daemon=True)
    thread.start()
    try:
        assert wait_for(lambda: sent, 5)
        code, text = http_get(mport, '/metrics', timeout=30)
        assert code == 200 and 'dispynode_jobs_total' in text
        for sock in idle + [slow]:
            sock.setblocking(False)
            with pytest.raises(BlockingIOError):
                sock.recv(1)           # still open: nothing to read, no end of file
        assert thread.is_alive()
        # each connection has one deadline for its whole request
        for sock in idle + [slow]:
            sock.setblocking(True)
            sock.settimeout(30)
            try:
                assert sock.recv(1) == b''
            except ConnectionResetError:
                pass        # the slow one wrote after the node closed it
    finally:
        stop.set()
        thread.join(5)
        for sock in idle + [slow]:
            sock.close()
    assert a.alive()


def test_forged_done_message_cannot_inject_metrics(nodes, legacy_python, tmp_path):
    """Module code of a real client's computation forges the worker's
    'done' message for its running job, with limit and reason names that
    try to start metric lines of their own: /metrics stays one sample per
    line of the node's own families.  (The node checks a worker's messages
    like a peer's: this one is malformed, so the worker is stopped as
    faulty and its job ends Terminated, reason worker_lost.)"""
    mport = free_port()
    a = nodes('a', ['--daemon', '--metrics', mport])
    res = start_client(CLIENTS / 'forge_done.py', a.port, free_port(), timeout=60,
                       cwd=tmp_path).result(60)
    data = check_client(res, a)
    # it did reach us, and ended the worker that sent it
    assert 'worker process of the computation died' in data['jobs'][0]['exception'], \
        describe(res, a)
    assert 'sent an invalid message' in a.log() and 'stopping it as faulty' in a.log()
    assert wait_for(lambda: sum(status(a)['jobs_done'].values()) == 1, 15, 0.2)
    code, text = http_get(mport, '/metrics')
    assert code == 200
    assert 'evil_' not in ''.join(line.split(' ', 1)[0] for line in text.splitlines()), text
    samples, _ = metric_samples(text)
    assert not [k for k in samples if k[0].startswith('evil')], text
    assert samples[('dispynode_jobs_terminated_total', (('reason', 'worker_lost'),))] == 1, text
    assert all(v == 0 for k, v in samples.items()
               if k[0] == 'dispynode_job_limit_kills_total'), text


def test_unit_prometheus_label_escaping():
    """Label values escape backslash, double quote and line feed, so a
    value can neither end its label nor start a line of its own."""
    evil = 'a\\b"c\nfake_metric 1\n# x'
    assert dn.prometheus_label(evil) == 'a\\\\b\\"c\\nfake_metric 1\\n# x'
    st = {'jobs_done': {}, 'limit_kills': {evil: 2}, 'jobs_terminated': {evil: 3},
          'cpus': 1, 'cpus_busy': 0, 'jobs_running': [], 'stored_results': 0,
          'serving': True, 'uptime': 1.0, 'version': evil}
    text = dn.prometheus_text(st, {}, ([], 0, 0.0), {'cpu': 1.0})
    assert not [line for line in text.splitlines() if line.startswith('fake_metric')], text
    samples, _ = metric_samples(text)
    assert samples[('dispynode_job_limit_kills_total', (('limit', evil),))] == 2
    assert samples[('dispynode_jobs_terminated_total', (('reason', evil),))] == 3
    assert ('process_resident_memory_bytes', ()) not in samples     # unknown: left out


def test_unit_worker_names_are_checked_before_counting():
    """A worker runs client code: a done message's limit and reason count
    (and become labels) only if they are names the node knows."""
    class Fake:
        counters = dn.Counters()
        job_times = dn.JobTimes()
    entry = dn.JobEntry(1, 'h', 1, [])
    for limit, reason in (('x"}\nevil 1', None), (None, 'evil"\n'), ('job_timeout', 'signal'),
                          (None, 'signal'), (None, None)):
        dn.Node.note_job(Fake, None, entry, TERMINATED, limit, reason)
    dn.Node.note_job(Fake, None, entry, FINISHED, None, None)
    counts = Fake.counters.snapshot()
    assert {k: v for k, v in counts.items() if k.startswith(('limit_', 'terminated_'))} == {
        'limit_job_timeout': 1, 'terminated_job_timeout': 1, 'terminated_signal': 1,
        'terminated_exception': 2, 'terminated_other': 1}, counts
    assert counts['jobs_Terminated'] == 5 and counts['jobs_Finished'] == 1
