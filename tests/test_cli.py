"""Command line of dispynode.py: option validation, --help, --version,
signals, --clean and a few options' effects.  Current Python only."""

import os
import re
import signal
import time

import pytest

import driver  # noqa: F401  (puts the repository on sys.path)
from driver import Driver, NodeProcess, ReplyServer, free_port
from nodes import run_to_exit
import dispy_common as dc
import dispynode as dn

NCPU = os.cpu_count() or 1


run_node = run_to_exit      # our node with exactly these args, to its exit


@pytest.fixture
def nodes():
    started = []
    yield started
    for node in started:
        node.stop_async()


def missing(tmp_path):
    return str(tmp_path / 'no-such-file.pem')


def invalid_cases(tmp_path):
    garbage = tmp_path / 'garbage.pem'
    garbage.write_text('not a certificate\n')
    a_file = tmp_path / 'plain-file'
    a_file.write_text('x')
    return {
        'cpus-too-many': ['-c', str(NCPU + 1)],
        'cpus-too-negative': ['-c', str(-NCPU)],
        'size-suffix': ['--max_file_size', '10x'],
        'size-negative': ['--max_file_size', '-5'],
        'size-float': ['--max_file_size', '1.5m'],
        'ip-not-local': ['-i', '203.0.113.9'],
        'ip-unresolvable': ['-i', 'no-such-host.invalid'],
        'ext-ip-unresolvable': ['--ext_ip_addr', 'no-such-host.invalid'],
        'scheduler-unresolvable': ['--scheduler_node', 'no-such-host.invalid'],
        'certfile-missing': ['--certfile', missing(tmp_path)],
        'keyfile-missing': ['--certfile', str(garbage), '--keyfile', missing(tmp_path)],
        'keyfile-alone': ['--keyfile', str(garbage)],
        'certfile-garbage': ['--certfile', str(garbage)],
        'msg-timeout-negative': ['--msg_timeout', '-1'],
        'msg-timeout-zero': ['--msg_timeout', '0'],
        'zombie-negative': ['--zombie_interval', '-1'],
        'port-zero': ['-p', '0'],
        'port-too-big': ['-p', '70000'],
        'scheduler-port-zero': ['--scheduler_port', '0'],
        'secret-file-missing': ['--secret_file', missing(tmp_path)],
        'prefix-under-a-file': ['--dest_path_prefix', str(a_file / 'sub')],
        'max-connections-zero': ['--max_connections', '0'],
    }


CASES = [
    'cpus-too-many', 'cpus-too-negative', 'size-suffix', 'size-negative', 'size-float',
    'ip-not-local', 'ip-unresolvable', 'ext-ip-unresolvable', 'scheduler-unresolvable',
    'certfile-missing', 'keyfile-missing', 'keyfile-alone', 'certfile-garbage',
    'msg-timeout-negative', 'msg-timeout-zero', 'zombie-negative', 'port-zero',
    'port-too-big', 'scheduler-port-zero', 'secret-file-missing', 'prefix-under-a-file',
    'max-connections-zero']


def check_one_line_error(r):
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert 'Traceback' not in r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith('dispynode: error: ')
    assert r.stdout == ''


@pytest.mark.parametrize('case', CASES)
def test_invalid_option_with_ip(tmp_path, case):
    args = invalid_cases(tmp_path)[case]
    if '-i' not in args:
        args = ['-i', '127.0.0.1', '-p', str(free_port())] + args
    check_one_line_error(run_node(args, tmp_path))


# Without -i the node first picks and logs its primary address; that log
# line must not come before the error (the user would see two or three
# lines, one of them claiming the node is "serving").
NEEDS_IP_DEFAULT = ['ext-ip-unresolvable', 'scheduler-unresolvable', 'certfile-missing',
                    'keyfile-missing', 'keyfile-alone', 'certfile-garbage']


@pytest.mark.parametrize('case', NEEDS_IP_DEFAULT)
def test_invalid_option_without_ip(tmp_path, case):
    args = ['-p', str(free_port())] + invalid_cases(tmp_path)[case]
    check_one_line_error(run_node(args, tmp_path))


def test_port_in_use(tmp_path, nodes):
    node = NodeProcess.start(tmp_path / 'first')
    nodes.append(node)
    r = run_node(['-i', '127.0.0.1', '-p', str(node.port)], tmp_path)
    check_one_line_error(r)
    assert 'in use' in r.stderr.lower()


@pytest.mark.parametrize('args', [['-c', 'abc'], ['--bogus'], ['-p'], ['--msg_timeout', 'x'],
                                  ['extra-positional']])
def test_argparse_errors(tmp_path, args):
    r = run_node(args, tmp_path)
    assert r.returncode == 2
    assert 'Traceback' not in r.stderr
    assert r.stderr.splitlines()[-1].startswith('dispynode: error: ')


ORIGINAL_OPTIONS = ['-c', '--cpus', '-d', '--debug', '-i', '--ip_addr', '--ext_ip_addr',
                    '-p', '--node_port', '--name', '-s', '--secret', '--dest_path_prefix',
                    '--scheduler_node', '--scheduler_port', '--keyfile', '--certfile',
                    '--max_file_size', '--zombie_interval', '--clean', '--msg_timeout']


def test_help_lists_every_original_option(tmp_path):
    r = run_node(['--help'], tmp_path)
    assert r.returncode == 0
    assert r.stderr == ''
    for opt in ORIGINAL_OPTIONS:
        assert re.search(r'(^|[\s,\[])%s\b' % re.escape(opt), r.stdout), opt
    # and it does not touch the prefix
    assert not (tmp_path / 'prefix').exists()


def test_version(tmp_path):
    r = run_node(['--version'], tmp_path)
    assert r.returncode == 0
    out = r.stdout + r.stderr
    assert dn.__version__ in out
    assert 'protocol 4.5' in out
    assert out.strip().splitlines() == [out.strip()]


# ---------------------------------------------------------------- running node

@pytest.mark.parametrize('sig', [signal.SIGINT, signal.SIGTERM])
def test_signal_clean_exit(tmp_path, sig):
    node = NodeProcess.start(tmp_path)
    start = time.monotonic()
    assert node.stop(sig, timeout=10) == 0
    assert time.monotonic() - start < 5
    assert 'Traceback' not in node.log()
    assert 'stopped' in node.log()


def test_sigterm_with_running_job(tmp_path):
    """The job is killed and, as with the original node (issue 11), sends
    no reply: the client is only told the node leaves (TERMINATED), so a
    4.5 client reschedules or abandons it.  The node exits 0."""
    node = NodeProcess.start(tmp_path)
    d = Driver('127.0.0.1', node.port)
    try:
        d.ping_tcp()
        _, compute = d.compute('import time\ndef f():\n    time.sleep(60)\n', 'f')
        assert d.job(compute.id, 1) == b'ACK'
        time.sleep(0.2)
        start = time.monotonic()
        assert node.stop(signal.SIGTERM, timeout=15) == 0
        assert time.monotonic() - start < 8
        terminated = d.server.wait('TERMINATED', 5)
        assert terminated is not None and terminated.obj['port'] == node.port
        assert d.server.wait_reply(1, 1) is None
        assert 'Traceback' not in node.log()
    finally:
        d.close_server()
        node.stop()


def test_second_signal_exits_at_once(tmp_path):
    """A clean shutdown that is slow (here: a client that takes 20 s to ACK
    the reply of a job that finished just before) is cut short by a second
    signal."""
    node = NodeProcess.start(tmp_path, args=['--msg_timeout', '30'])
    d = Driver('127.0.0.1', node.port, server=ReplyServer(ack_delay=20.0))
    try:
        d.ping_tcp()
        _, compute = d.compute('def f():\n    return 1\n', 'f')
        assert d.job(compute.id, 1) == b'ACK'
        time.sleep(0.5)
        node.proc.send_signal(signal.SIGTERM)
        time.sleep(1.5)                     # now waiting on the slow client
        assert node.proc.poll() is None, 'the first signal alone should still be at work'
        start = time.monotonic()
        node.proc.send_signal(signal.SIGTERM)
        assert node.proc.wait(5) == 1
        assert time.monotonic() - start < 2
    finally:
        d.close_server()
        node.stop()


def test_clean_empties_prefix(tmp_path, nodes):
    prefix = tmp_path / 'prefix'
    (prefix / '127.0.0.1' / 'old_comp').mkdir(parents=True)
    (prefix / '127.0.0.1' / 'old_comp' / '_dispy_job_reply_1').write_bytes(b'x')
    (prefix / '1_ab').write_bytes(b'junk')
    (prefix / 'loose.txt').write_text('x')
    os.symlink('/etc', str(prefix / 'link'))
    node = NodeProcess.start(tmp_path / 'run', args=['--clean'], prefix=prefix)
    nodes.append(node)
    assert prefix.is_dir()
    # Nothing old is left; the only entries are the running node's control
    # socket and its lock on the prefix.
    assert sorted(os.listdir(str(prefix))) == ['.dispynode-control', '.dispynode-lock']
    assert os.path.isdir('/etc/')              # the symlink's target is untouched


def test_without_clean_prefix_is_kept(tmp_path, nodes):
    prefix = tmp_path / 'prefix'
    prefix.mkdir()
    (prefix / 'loose.txt').write_text('x')
    node = NodeProcess.start(tmp_path / 'run', prefix=prefix)
    nodes.append(node)
    assert (prefix / 'loose.txt').exists()


def _pong(node, secret=''):
    d = Driver('127.0.0.1', node.port, secret=secret)
    try:
        return d.sign, d.ping_tcp()
    finally:
        d.close_server()


def test_secret_sources(tmp_path, nodes):
    secret_file = tmp_path / 'secret'
    secret_file.write_text('from-file\n')
    cases = [(['-s', 'opt'], {}, 'opt'),
             (['--secret_file', str(secret_file)], {}, 'from-file'),
             ([], {'DISPYNODE_SECRET': 'from-env'}, 'from-env'),
             ([], {'DISPYNODE_SECRET': ''}, '')]
    for i, (args, env, secret) in enumerate(cases):
        node = NodeProcess.start(tmp_path / ('n%d' % i), args=args, env=env)
        nodes.append(node)
        sign, pong = _pong(node)
        assert pong['auth'] == dc.auth_code(secret, sign), args


def test_secret_not_in_store(tmp_path, nodes):
    node = NodeProcess.start(tmp_path, args=['-s', 'TOPSECRET-123'])
    nodes.append(node)
    d = Driver('127.0.0.1', node.port, secret='TOPSECRET-123')
    try:
        d.ping_tcp()
        assert d.compute('def f():\n    return 1\n', 'f')[0] == b'ACK'
        for root, _, files in os.walk(str(node.prefix)):
            for name in files:
                if os.path.join(root, name) == str(node.prefix / '.dispynode-control'):
                    continue    # the control socket holds no data
                with open(os.path.join(root, name), 'rb') as fh:
                    assert b'TOPSECRET-123' not in fh.read()
    finally:
        d.close_server()


def test_name_cpus_and_ext_ip_in_pong(tmp_path, nodes):
    cpus, opt = (NCPU - 1, '-1') if NCPU > 1 else (1, '1')   # negative: leave that many
    node = NodeProcess.start(tmp_path, args=['--name', 'unit-node', '-c', opt,
                                             '--ext_ip_addr', '127.0.0.5'])
    nodes.append(node)
    _, pong = _pong(node)
    assert pong['name'] == 'unit-node'
    assert pong['cpus'] == cpus
    assert pong['ip_addr'] == '127.0.0.5'


def test_default_name_is_hostname(tmp_path, nodes):
    import socket
    node = NodeProcess.start(tmp_path)
    nodes.append(node)
    _, pong = _pong(node)
    assert pong['name'] == socket.gethostname()
    assert pong['cpus'] == NCPU
