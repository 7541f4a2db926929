"""Operating a node: the status query (control socket) and the Prometheus
metrics endpoint, checked with the real legacy client (issue 13)."""

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from dispy_common import DispyJob

from legacy import (CLIENTS, REPO, check_client, describe, free_port, run_client,
                    start_client, wait_for)

sys.path.insert(0, str(REPO))
import dispynode as dn  # noqa: E402
from driver import read_all  # noqa: E402

pytestmark = [pytest.mark.interop]

FINISHED, TERMINATED = DispyJob.Finished, DispyJob.Terminated
SOCKET = dn.CONTROL_SOCKET


def status_cli(prefix, *extra):
    """Run ``python3 dispynode.py status``."""
    return subprocess.run([sys.executable, str(REPO / 'dispynode.py'), 'status',
                           '--dest_path_prefix', str(prefix)] + list(extra),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=30)


def status_json(node):
    r = status_cli(node.prefix, '--json')
    assert r.returncode == 0, (r.stdout, r.stderr, node.log()[-4000:])
    return json.loads(r.stdout)


def idle(node):
    """Status once the node holds no computation and runs no job."""
    def check():
        st = status_json(node)
        return st if not st['computations'] and not st['jobs_running'] \
            and st['client'] is None else None
    st = wait_for(check, 15, interval=0.2)
    assert st, node.log()[-4000:]
    return st


def test_status_counts_after_legacy_clients(node_factory, legacy_python, tmp_path):
    """After 12 plain jobs and 4 jobs of which 2 raise, run by two real
    clients one after the other, the status JSON counts are exact; the
    table shows the same numbers."""
    node = node_factory()
    res = run_client(CLIENTS / 'basic_jobs.py', node.port, free_port(), 'jobs=12',
                     timeout=90, cwd=tmp_path)
    data = check_client(res, node)
    assert [j['status'] for j in data['jobs']] == [FINISHED] * 12, describe(res, node)
    res = run_client(CLIENTS / 'job_exception.py', node.port, free_port(), 'jobs=4',
                     timeout=60, cwd=tmp_path)
    data = check_client(res, node)
    assert sorted(j['status'] for j in data['jobs']) == [TERMINATED] * 2 + [FINISHED] * 2
    st = idle(node)
    assert st['jobs_done'] == {'Finished': 14, 'Terminated': 2}, st
    assert st['computations_total'] == 2, st
    assert st['cpus'] == os.cpu_count(), st
    assert st['cpus_busy'] == 0 and st['jobs_running'] == [], st
    assert st['stored_results'] == 0 and st['refused_connections'] == 0, st
    assert st['serving'] is True and st['version'] == dn.__version__, st
    # 16 JOB frames carry pickled jobs in; 16 job replies go out.
    assert st['bytes_in'] > 16 * 100 and st['bytes_out'] > 16 * 100, st
    assert st['uptime'] > 0 and st['name'], st
    r = status_cli(node.prefix)
    assert r.returncode == 0, r.stderr
    table = r.stdout.decode()
    assert 'Finished 14, Terminated 2' in table, table
    assert 'computations: 0' in table and 'jobs running: 0' in table, table
    # The log has one start and one end line per computation, with outcomes.
    log = node.log()
    assert log.count(' started in ') == 2, log[-4000:]
    assert 'jobs: Finished 12)' in log, log[-4000:]
    assert 'jobs: Finished 2, Terminated 2)' in log, log[-4000:]


def test_status_while_a_job_runs(node_factory, legacy_python, tmp_path):
    """While a real client's job sleeps, the status names the client, the
    computation and the running job with its run time."""
    node = node_factory()
    client_port = free_port()
    client = start_client(CLIENTS / 'obs_jobs.py', node.port, client_port, 'mode=sleep',
                          'seconds=4', timeout=60, cwd=tmp_path)
    try:
        st = wait_for(lambda: (lambda s: s if s['jobs_running'] else None)(status_json(node)),
                      30, interval=0.2)
        assert st, node.log()[-4000:]
        assert st['client'] == '127.0.0.1:%d' % client_port, st
        assert st['cpus_busy'] == 1, st
        [comp] = st['computations']
        assert comp['name'] == 'compute' and comp['state'] == 'running', comp
        assert comp['client'] == st['client'] and comp['jobs_running'] == 1, comp
        [job] = st['jobs_running']
        assert job['computation'] == comp['id'] and 0 <= job['seconds'] < 4, job
        table = dn.format_status_table(st)
        assert '127.0.0.1:%d' % client_port in table and 'running' in table, table
    finally:
        client.wait()
    res = client.result()
    data = check_client(res, node)
    assert data['jobs'][0]['status'] == FINISHED, describe(res, node)
    assert idle(node)['jobs_done'] == {'Finished': 1}


def test_metrics_after_legacy_client(node_factory, legacy_python, tmp_path):
    """--metrics PORT serves the Prometheus text format that
    prometheus_client's own parser reads, with exact job counts."""
    from prometheus_client.parser import text_string_to_metric_families
    import urllib.request
    mport = free_port()
    node = node_factory(args=('--metrics', str(mport)))
    res = run_client(CLIENTS / 'job_exception.py', node.port, free_port(), 'jobs=6',
                     timeout=60, cwd=tmp_path)
    check_client(res, node)
    idle(node)
    with urllib.request.urlopen('http://127.0.0.1:%d/metrics' % mport, timeout=10) as r:
        assert r.status == 200
        assert r.headers['Content-Type'].startswith('text/plain; version=0.0.4')
        text = r.read().decode()
    samples = {}
    kinds = {}
    for family in text_string_to_metric_families(text):
        kinds[family.name] = family.type
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    assert kinds['dispynode_jobs'] == 'counter', kinds
    assert kinds['dispynode_job_seconds'] == 'histogram', kinds
    assert kinds['dispynode_cpus_busy'] == 'gauge', kinds
    assert samples[('dispynode_jobs_total', (('outcome', 'Finished'),))] == 3, text
    assert samples[('dispynode_jobs_total', (('outcome', 'Terminated'),))] == 3, text
    assert samples[('dispynode_computations_total', ())] == 1, text
    assert samples[('dispynode_job_seconds_count', ())] == 6, text
    assert samples[('dispynode_job_seconds_bucket', (('le', '+Inf'),))] == 6, text
    assert samples[('dispynode_cpus_busy', ())] == 0, text
    assert samples[('dispynode_jobs_running', ())] == 0, text
    assert samples[('dispynode_stored_results', ())] == 0, text
    assert samples[('dispynode_refused_connections_total', ())] == 0, text
    assert samples[('dispynode_bytes_received_total', ())] > 0, text
    assert samples[('dispynode_bytes_sent_total', ())] > 0, text
    assert ('dispynode_dropped_packets_total', ()) in samples, text
    # A datagram of garbage is a dropped packet; a request with a wrong
    # secret is a refused connection.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.sendto(b'JUNK:xyz', ('127.0.0.1', node.port))
    with socket.create_connection(('127.0.0.1', node.port), timeout=10) as sock:
        sock.sendall(b'x' * dn.dc.AUTH_LEN)
        dn.dc.send_msg(sock, b'JOBS:' + dn.dc.dumps_plain({'compute_id': 1}))
        assert sock.recv(100) == b''        # ignored, then closed
    st = wait_for(lambda: (lambda s: s if s['dropped_packets'] and s['refused_connections']
                           else None)(status_json(node)), 10)
    assert st and st['dropped_packets'] == 1 and st['refused_connections'] == 1, st
    assert st['auth_failures'] == 1, st
    with urllib.request.urlopen('http://127.0.0.1:%d/metrics' % mport, timeout=10) as r:
        text = r.read().decode()
    assert 'dispynode_refused_connections_total 1.0' in text, text
    assert 'dispynode_dropped_packets_total 1.0' in text, text
    # Anything but /metrics is a 404.
    import urllib.error
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen('http://127.0.0.1:%d/other' % mport, timeout=10)
    assert info.value.code == 404


def test_metrics_off_by_default_and_bad_option(node_factory, tmp_path):
    """No --metrics: no HTTP listener; an invalid value is a CLI error."""
    node = node_factory()
    st = status_json(node)
    assert st['serving']
    r = subprocess.run([sys.executable, str(REPO / 'dispynode.py'), '--metrics', 'x:y',
                        '-i', '127.0.0.1', '--dest_path_prefix', str(tmp_path / 'p')],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=30)
    assert r.returncode == 2, r
    assert r.stderr.decode().startswith('dispynode: error: --metrics'), r.stderr
    assert b'\n' == r.stderr[-1:] and r.stderr.count(b'\n') == 1, r.stderr


def _open_prefix(prefix):
    """Let any user reach the socket file (to test the node's own check)."""
    for p in [prefix] + list(prefix.parents):
        if str(p) in ('/', '/tmp'):
            break
        os.chmod(str(p), 0o755)


def as_user(uid, func):
    """Run ``func()`` in a forked child with user id ``uid`` (no exec: the
    interpreter may live where that user cannot read); returns its text."""
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            os.close(rfd)
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            text = 'ok:' + func()
        except BaseException as exc:  # report whatever happened to the parent
            text = 'error:%s: %s' % (type(exc).__name__, exc)
        finally:
            try:
                os.write(wfd, text.encode())
            finally:
                os._exit(code)
    os.close(wfd)
    chunks = []
    while True:
        chunk = os.read(rfd, 65536)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(rfd)
    os.waitpid(pid, 0)
    return b''.join(chunks).decode()


def raw_status(path):
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    s.connect(str(path))
    s.sendall(b'status\n')
    data = read_all(s)
    s.close()
    return data.decode()


def test_control_socket_refuses_other_users(node_factory):
    """The socket is mode 0600 (another user cannot connect); even when its
    mode is opened up, the node refuses other users by their peer
    credentials, and the status command refuses a socket not 0600."""
    if os.geteuid() != 0:
        pytest.skip('needs root to act as another user')
    base = Path(tempfile.mkdtemp(prefix='dispynode-obs-'))
    node = node_factory(prefix=base / 'prefix')
    path = node.prefix / SOCKET
    assert wait_for(path.exists, 10), node.log()
    st = os.lstat(str(path))
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600, oct(st.st_mode)
    assert stat.S_IMODE(os.stat(str(node.prefix)).st_mode) == 0o700
    nobody = 65534
    got = as_user(nobody, lambda: json.dumps(dn.query_control(str(node.prefix))))
    assert got.startswith('error:OSError: no node control socket'), got
    _open_prefix(node.prefix)
    got = as_user(nobody, lambda: raw_status(path))
    assert got.startswith('error:PermissionError'), got      # the 0600 mode
    os.chmod(str(path), 0o666)
    got = as_user(nobody, lambda: raw_status(path))
    assert got.startswith('ok:'), got
    assert json.loads(got[3:]) == {'error': 'permission denied'}, got
    assert 'refusing a request of user 65534' in node.log()
    # The node's own user still gets the status, but the CLI refuses a
    # socket that others could use.
    assert json.loads(raw_status(path))['serving'] is True
    r = status_cli(node.prefix)
    assert r.returncode == 1 and b'mode 666' in r.stderr, r.stderr
    shutil.rmtree(str(base), ignore_errors=True)


def test_status_without_node(tmp_path):
    r = status_cli(tmp_path / 'nothing')
    assert r.returncode == 1
    assert r.stderr.decode().startswith('dispynode: error: no node control socket'), r.stderr


def test_format_status_table_unit():
    st = {'version': '1.0.0', 'name': 'n1', 'uptime': 3725.5, 'cpus': 4, 'cpus_busy': 1,
          'serving': False, 'refusing': 'free memory 1m is below --min_free_memory 2m',
          'client': '10.0.0.1:51347',
          'computations': [{'id': 7, 'name': 'compute', 'client': '10.0.0.1:51347',
                            'state': 'running', 'jobs_running': 1, 'jobs_done': 3,
                            'stored': 0}],
          'jobs_running': [{'uid': 42, 'computation': 7, 'seconds': 12.25}],
          'jobs_done': {'Finished': 2, 'Terminated': 1}, 'stored_results': 0,
          'bytes_in': 100, 'bytes_out': 200, 'refused_connections': 5,
          'limits': {'job_timeout': 30, 'job_memory': '1g', 'job_threads': 2}}
    text = dn.format_status_table(st)
    assert '01:02:05' in text and '1 busy of 4' in text, text
    assert 'no (free memory 1m is below --min_free_memory 2m)' in text, text
    assert 'Finished 2, Terminated 1' in text and '100 / 200' in text, text
    assert 'timeout 30s, memory 1g (RLIMIT_AS only), threads 2' in text, text
    assert '42' in text and '12.2' in text and 'compute' in text, text
    assert dn.format_status_table({}).endswith('\n')   # tolerates missing keys


def test_metrics_port_in_use_is_a_cli_error(tmp_path):
    with socket.socket() as busy:
        busy.bind(('127.0.0.1', 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        r = subprocess.run([sys.executable, str(REPO / 'dispynode.py'), '-i', '127.0.0.1',
                            '-p', str(free_port()), '--metrics', '127.0.0.1:%d' % port,
                            '--dest_path_prefix', str(tmp_path / 'p')],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=30)
    assert r.returncode == 2, r
    assert r.stderr.decode().startswith(
        'dispynode: error: --metrics 127.0.0.1:%d: Address already in use' % port), r.stderr


def test_parse_hostport_and_format_size_unit():
    assert dn.parse_hostport('9100') == ('127.0.0.1', 9100)
    assert dn.parse_hostport('0.0.0.0:9100') == ('0.0.0.0', 9100)
    assert dn.parse_hostport(':9100') == ('127.0.0.1', 9100)
    for bad in ('x:y', '9100:', '0', '65536', 'host:-1', ''):
        with pytest.raises(ValueError):
            dn.parse_hostport(bad)
    assert [dn.format_size(n) for n in (None, 0, 1023, 1024, 1536, 64 << 20, 3 << 30)] == \
        ['-', '0', '1023', '1k', '1.5k', '64m', '3g']
