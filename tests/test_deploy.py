"""Issue 22, running the node as a service: start-up checks (Python
version, one node per prefix, secrets, the start-up line), systemd
(NOTIFY_SOCKET, journald priorities), a node that is PID 1, ``bash
tests/run`` under a PEP 668 Python, and the wheel that pyproject.toml builds."""

import ast
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid

import pytest

import driver  # noqa: F401  (puts the repository on sys.path)
from legacy import REPO, check_client, describe, free_port, pyenv_python, run_client, wait_for
from nodes import NodeProc, run_to_exit
import dispynode as dn


def _need(what, reason):
    if os.environ.get('CI') == 'true':
        pytest.fail('%s unavailable under CI: %s' % (what, reason))
    pytest.skip('%s unavailable: %s' % (what, reason))


def one_error_line(r):
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r
    assert lines[0].startswith('dispynode: error: ') and 'Traceback' not in r.stderr, r
    return lines[0]


# ---------------------------------------------------------------- Python < 3.8

@pytest.mark.parametrize('version', ['3.6', '3.7'])
def test_old_python_gets_one_line_and_exit_2(tmp_path, version):
    """Copied onto Python 3.6 the old node logged "serving" and every worker
    died; now the node says which Python it needs before anything else."""
    python = pyenv_python(version)
    if python is None:
        _need('Python %s' % version, 'not in pyenv (tests/run installs it)')
    for name in ('dispynode.py', 'dispy_common.py'):   # both stay parseable there
        source = (REPO / name).read_text()
        subprocess.run([str(python), '-c', 'import ast, sys; ast.parse(sys.stdin.read())'],
                       input=source, universal_newlines=True, check=True, timeout=60)
    r = run_to_exit(['-i', '127.0.0.1', '-p', str(free_port())], tmp_path, python=python)
    line = one_error_line(r)
    assert re.match(r'dispynode: error: Python 3\.8 or later is required \(this is Python '
                    r'%s\.\d+' % re.escape(version), line), line
    assert r.stdout == '' and not (tmp_path / 'prefix').exists()


def test_version_check_comes_first():
    """Nothing runs before the version check but ``import sys``."""
    tree = ast.parse((REPO / 'dispynode.py').read_text())
    body = [n for n in tree.body if not (isinstance(n, ast.Expr) and
                                         isinstance(n.value, ast.Constant))]
    assert isinstance(body[0], ast.Import) and [a.name for a in body[0].names] == ['sys']
    assert isinstance(body[1], ast.If) and 'version_info' in ast.dump(body[1].test)


# ---------------------------------------------------------------- one node per prefix

def test_second_node_on_a_prefix_exits_2_naming_the_holder(tmp_path):
    first = NodeProc.start(tmp_path / 'a', prefix=tmp_path / 'prefix', args=['-s', 'x'])
    try:
        keep = first.prefix / 'kept-by-the-first-node'
        keep.write_text('x')
        for extra in ([], ['--clean']):     # --clean must not empty the first's prefix
            r = run_to_exit(['-i', '127.0.0.1', '-p', str(free_port()), '-s', 'x'] + extra,
                            tmp_path)
            line = one_error_line(r)
            assert line == ('dispynode: error: --dest_path_prefix %s is in use by another '
                            'node (pid %d)' % (first.prefix, first.pid)), line
            assert keep.exists()
        assert first.proc.poll() is None
    finally:
        first.stop()
    assert first.proc.returncode == 0
    # the lock dies with its node: the next one starts (on a stale pid file, too)
    again = NodeProc.start(tmp_path / 'b', prefix=tmp_path / 'prefix', args=['-s', 'x'])
    again.stop()
    assert (tmp_path / 'prefix' / dn.PREFIX_LOCK).read_text() == '%d\n' % again.pid


def test_unit_prefix_lock(tmp_path):
    held = dn.lock_prefix(str(tmp_path))
    try:
        with pytest.raises(ValueError, match=r'in use by another node \(pid %d\)' % os.getpid()):
            dn.lock_prefix(str(tmp_path))
    finally:
        held.close()
    dn.lock_prefix(str(tmp_path)).close()


# ---------------------------------------------------------------- secrets

def test_secret_from_two_sources_or_an_empty_file_is_an_error(tmp_path):
    secret_file = tmp_path / 'secret'
    secret_file.write_text('from-file\n')
    empty = tmp_path / 'empty'
    empty.write_text(' \n')
    cases = [
        (['-s', 'x', '--secret_file', str(secret_file)], {},
         'the secret is given by both -s/--secret and --secret_file'),
        (['-s', 'x'], {'DISPYNODE_SECRET': 'y'},
         'the secret is given by both -s/--secret and DISPYNODE_SECRET'),
        (['--secret_file', str(secret_file)], {'DISPYNODE_SECRET': 'y'},
         'the secret is given by both --secret_file and DISPYNODE_SECRET'),
        (['--secret_file', str(empty)], {}, '--secret_file %s is empty' % empty),
    ]
    for args, env, message in cases:
        r = run_to_exit(['-i', '127.0.0.1', '-p', str(free_port())] + args, tmp_path, env=env)
        assert message in one_error_line(r), (args, env, r.stderr)
        assert not (tmp_path / 'prefix').exists()


def test_no_secret_is_a_warning_at_start(tmp_path):
    warning = 'WARNING no secret is set: anyone who reaches port'
    bare = NodeProc.start(tmp_path / 'a')
    bare.stop()
    assert warning in bare.log(), bare.log()
    assert 'set DISPYNODE_SECRET, --secret_file or -s' in bare.log()
    for args, env in ((['-s', 'x'], {}), ([], {'DISPYNODE_SECRET': 'x'})):
        node = NodeProc.start(tmp_path / ('b%d' % len(env)), args=args, env=env)
        node.stop()
        assert warning not in node.log(), node.log()


# ---------------------------------------------------------------- the start-up line

def test_start_up_line(tmp_path):
    node = NodeProc.start(tmp_path, args=['-s', 'x', '--service_start', '00:00',
                                          '--service_end', '23:59'])
    node.stop()
    lines = [line for line in node.log().splitlines() if ' INFO dispynode %s ' % dn.__version__
             in line]
    assert len(lines) == 1, node.log()
    assert lines[0].split(' INFO ', 1)[1] == (
        'dispynode %s (dispy protocol 4.5) pid %d, Python %s (%s), prefix %s, addresses '
        '127.0.0.1 port %d, TLS off, secret on, service window start 00:00, end 23:59 '
        '(open now)' % (dn.__version__, node.pid, '.'.join(map(str, sys.version_info[:3])),
                        sys.executable, node.prefix, node.port))
    # it comes before the "serving" line (the tests' readiness line)
    assert node.log().index(lines[0]) < node.log().index(' cpus at 127.0.0.1:')
    bare = NodeProc.start(tmp_path / 'bare')
    bare.stop()
    assert ', TLS off, secret off, service window always\n' in bare.log(), bare.log()


# ---------------------------------------------------------------- systemd

@pytest.fixture(params=['path', 'abstract'])
def notify_socket(request, tmp_path):
    """A datagram socket standing in for systemd's: (NOTIFY_SOCKET value, socket)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if request.param == 'abstract':
        name = 'dispytest-notify-%s' % uuid.uuid4().hex
        sock.bind('\0' + name)
        address = '@' + name
    else:
        address = str(tmp_path / 'notify')
        sock.bind(address)
    sock.settimeout(10.0)
    yield address, sock
    sock.close()


def notify_messages(sock, until, timeout=10.0):
    """Datagrams (each a dict of its fields) until one has the field ``until``."""
    messages = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        data = sock.recv(4096).decode()
        messages.append(dict(line.split('=', 1) for line in data.split('\n') if line))
        if until in messages[-1]:
            return messages
    raise AssertionError('no %s in %r' % (until, messages))


def test_systemd_notify(tmp_path, notify_socket):
    address, sock = notify_socket
    node = NodeProc.start(tmp_path, env={'NOTIFY_SOCKET': address}, wait=False)
    try:
        ready = notify_messages(sock, 'READY')[-1]
        node.wait_ready()
        assert ready['READY'] == '1' and ready['MAINPID'] == str(node.pid), ready
        assert ready['STATUS'] == 'serving %d cpus at 127.0.0.1:%d; idle' % (
            os.cpu_count(), node.port), ready
    finally:
        node.send_signal(signal.SIGTERM)
    stopping = notify_messages(sock, 'STOPPING')[-1]
    assert stopping == {'STOPPING': '1', 'STATUS': 'stopping'}, stopping
    try:
        assert node.proc.wait(15) == 0, node.log()
    finally:
        node.stop()


def test_systemd_notify_on_drain(tmp_path, notify_socket):
    """``dispynode drain`` (control socket): STOPPING=1 at once, and the
    node exits 0 when its (here no) jobs have ended."""
    address, sock = notify_socket
    node = NodeProc.start(tmp_path, env={'NOTIFY_SOCKET': address}, args=['-s', 'x'])
    try:
        assert 'READY' in notify_messages(sock, 'READY')[-1]
        r = subprocess.run([sys.executable, str(REPO / 'dispynode.py'), 'drain',
                            '--dest_path_prefix', str(node.prefix)], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, universal_newlines=True, timeout=60)
        assert r.returncode == 0, r
        first = notify_messages(sock, 'STOPPING')[-1]
        assert first['STOPPING'] == '1' and 'draining' in first['STATUS'], first
        assert node.proc.wait(15) == 0, node.log()
    finally:
        node.stop()


def test_unit_notify_socket_not_inherited_and_status_lines(tmp_path):
    """start_up takes NOTIFY_SOCKET out of the environment workers and jobs
    inherit; STATUS= is sent when the status text changes."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / 'notify'))
    sock.settimeout(5.0)
    try:
        environ = {'NOTIFY_SOCKET': str(tmp_path / 'notify')}
        cfg = dn.resolve_config(dn.build_parser().parse_args(
            ['-i', '127.0.0.1', '-s', 'x', '--dest_path_prefix', str(tmp_path / 'p')]))
        done = dn.start_up(cfg, environ=environ)
        done.prefix_lock.close()
        assert environ == {} and done.notify_socket == str(tmp_path / 'notify')
        notifier = dn.SystemdNotifier(done.notify_socket)
        notifier.status('one', 'READY=1')
        notifier.status('one')
        notifier.status('two')
        notifier.close()
        assert sock.recv(100) == b'READY=1\nSTATUS=one'
        assert sock.recv(100) == b'STATUS=two'
    finally:
        sock.close()
    assert dn.SystemdNotifier(None).notify('READY=1') is False     # no socket: nothing


def test_journald_priorities(tmp_path):
    """With JOURNAL_STREAM naming the node's stderr, each line starts with
    its syslog priority; a JOURNAL_STREAM that is not stderr is ignored."""
    port = free_port()
    log = tmp_path / ('node-%d.log' % port)
    log.touch()
    st = log.stat()
    node = NodeProc.start(tmp_path, port=port,
                          env={'JOURNAL_STREAM': '%d:%d' % (st.st_dev, st.st_ino)})
    node.stop()
    lines = node.log().splitlines()
    assert '<4>dispynode WARNING no secret is set' in node.log(), lines
    assert any(line.startswith('<6>dispynode INFO serving ') for line in lines), lines
    assert all(re.match(r'<[2-7]>dispynode ', line) for line in lines), lines
    other = NodeProc.start(tmp_path / 'other', env={'JOURNAL_STREAM': '%d:%d' % (
        st.st_dev, st.st_ino)})
    other.stop()
    assert not any(line.startswith('<') for line in other.log().splitlines()), other.log()
    assert re.search(r'^\d{4}-\d\d-\d\d .* dispynode INFO serving ', other.log(), re.M)


def test_unit_journal_formatter_marks_every_line():
    formatter = dn.JournalFormatter('dispynode %(levelname)s %(message)s')
    try:
        raise ValueError('boom')
    except ValueError:
        record = dn.logging.LogRecord('dispynode', dn.logging.ERROR, __file__, 1, 'failed',
                                      (), sys.exc_info())
    text = formatter.format(record)
    assert text.startswith('<3>dispynode ERROR failed\n<3>Traceback')
    assert all(line.startswith('<3>') for line in text.split('\n'))
    for level, prio in ((dn.logging.CRITICAL, 2), (dn.logging.WARNING, 4),
                        (dn.logging.INFO, 6), (dn.logging.DEBUG, 7)):
        record = dn.logging.LogRecord('dispynode', level, __file__, 1, 'x', (), None)
        assert formatter.format(record).startswith('<%d>' % prio)


# ---------------------------------------------------------------- PID 1

def _children(pid):
    found = []
    for name in os.listdir('/proc'):
        if name.isdigit():
            try:
                with open('/proc/%s/stat' % name) as fh:
                    fields = fh.read().rsplit(')', 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(fields[1]) == pid:
                found.append((int(name), fields[0]))
    return found


def _namespace(pid):
    """{pid inside: state} of the processes in ``pid``'s PID namespace."""
    ns = os.readlink('/proc/%d/ns/pid' % pid)
    found = {}
    for name in os.listdir('/proc'):
        if not name.isdigit():
            continue
        try:
            if os.readlink('/proc/%s/ns/pid' % name) != ns:
                continue
            with open('/proc/%s/status' % name) as fh:
                fields = dict(line.split(':', 1) for line in fh.read().splitlines()
                              if ':' in line)
        except OSError:
            continue
        found[int(fields['NSpid'].split()[-1])] = fields['State'].split()[0]
    return found


@pytest.mark.interop
@pytest.mark.slow
def test_pid_1_reaps_orphans(tmp_path, legacy_python, client_port):
    """As PID 1 of a PID namespace (a container without --init), the node
    is where orphans end up (those of jobs, unless a worker that is a
    subreaper takes them first); none stays a zombie (the old node left one
    per job: 12 here), and the workers still run every job.
    test_unit_children_reap_only_orphans checks the node's reaper itself."""
    if shutil.which('unshare') is None:
        _need('unshare', 'util-linux is not installed')
    wrap = ['unshare', '--pid', '--fork', '--mount-proc']
    if os.geteuid() != 0:
        wrap.insert(1, '--map-root-user')
    node = NodeProc.start(tmp_path, wrap=wrap, args=['-s', 'x'])
    try:
        inner = [pid for pid, _ in _children(node.pid)]
        assert len(inner) == 1, inner       # unshare's child: the node, PID 1 inside
        res = run_client('orphan_jobs.py', node.port, client_port, 'jobs=12', 'linger=0.3',
                         'secret=x', timeout=90)
        data = check_client(res, node)
        assert [j['status'] for j in data['jobs']] == [dn.DispyJob.Finished] * 12, \
            describe(res, node)
        assert all(isinstance(j['result'], int) and j['result'] > 1 for j in data['jobs'])
        orphans = set(j['result'] for j in data['jobs'])     # their pids in the namespace

        def left():     # the orphans still there, alive or zombie: {pid inside: state}
            procs = _namespace(inner[0])
            return {pid: state for pid, state in procs.items() if pid in orphans}
        assert wait_for(lambda: not left(), timeout=15), (left(), node.log()[-3000:])
        assert not [s for s in _namespace(inner[0]).values() if s == 'Z'], _namespace(inner[0])
        os.kill(inner[0], signal.SIGINT)        # (unshare ignores it while it waits)
        assert node.proc.wait(15) == 0, node.log()[-3000:]
    finally:
        node.stop()


def test_unit_children_reap_only_orphans(tmp_path):
    """Children.reap takes zombies that Children.start did not make, and
    leaves a known child's exit status to its Popen (here as a subreaper,
    which inherits orphans as PID 1 does)."""
    code = r'''
import ctypes, os, subprocess, sys, time
sys.path.insert(0, sys.argv[1])
import dispynode as dn
libc = ctypes.CDLL(None, use_errno=True)
assert libc.prctl(36, 1, 0, 0, 0) == 0          # PR_SET_CHILD_SUBREAPER
worker = dn.CHILDREN.start([sys.executable, '-c', 'import sys; sys.exit(7)'])
# a child that leaves three orphans and exits (we wait for it: it is ours)
middle = dn.CHILDREN.start([sys.executable, '-c', 'import os, time\n'
                            'for _ in range(3):\n'
                            '    if os.fork() == 0:\n'
                            '        time.sleep(0.2); os._exit(0)\n'])
middle.wait()
deadline = time.monotonic() + 10
reaped = 0
while reaped < 3 and time.monotonic() < deadline:
    reaped += dn.CHILDREN.reap()
    time.sleep(0.05)
time.sleep(0.2)
reaped += dn.CHILDREN.reap()
print(reaped, worker.wait(), len(dn.Children._zombie_children()))
'''
    r = subprocess.run([sys.executable, '-c', code, str(REPO)], stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, universal_newlines=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ['3', '7', '0'], r


# ---------------------------------------------------------------- bash tests/run

PEP668_PYTHON = """#!/bin/sh
# python3 as on Debian: its pip refuses to install (PEP 668)
case " $* " in
    *" -m pip install "*)
        echo "error: externally-managed-environment" >&2
        exit 1 ;;
esac
exec %s "$@"
"""


def test_tests_run_uses_its_own_venv_under_an_externally_managed_python(tmp_path):
    """``bash tests/run`` with a python3 whose pip refuses to install (PEP
    668; the old script failed at once there) installs nothing into it: the
    suite runs with the virtualenv's Python (here one made beforehand: the
    suite has no network; tests/run made .test-venv from Debian's
    /usr/bin/python3 when measured)."""
    shims = tmp_path / 'bin'
    shims.mkdir()
    python3 = shims / 'python3'
    python3.write_text(PEP668_PYTHON % sys.executable)
    python3.chmod(0o755)
    env = dict(os.environ, PATH='%s:%s' % (shims, os.environ['PATH']),
               DISPY_TEST_VENV=str(tmp_path / 'venv'))
    env.pop('PYTHON', None)
    assert subprocess.run([str(python3), '-m', 'pip', 'install', 'x'], env=env,
                          stderr=subprocess.PIPE).returncode == 1
    # the venv tests/run would make (its packages: this Python's), marked as made
    subprocess.run([str(python3), '-m', 'venv', '--without-pip', env['DISPY_TEST_VENV']],
                   check=True, env=env, timeout=120)
    import site
    site_dir = next((tmp_path / 'venv' / 'lib').glob('python3*/site-packages'))
    (site_dir / 'outer.pth').write_text('\n'.join(site.getsitepackages()) + '\n')
    made_for = subprocess.run(
        ['bash', '-c', "echo \"$(python3 -c 'import sys; print(sys.executable, "
         "sys.version.split()[0])') $(cksum < tests/requirements.txt)\""],
        cwd=str(REPO), env=env, stdout=subprocess.PIPE, universal_newlines=True, check=True)
    (tmp_path / 'venv' / '.made-for').write_text(made_for.stdout)
    r = subprocess.run(['bash', 'tests/run', '-q', '-p', 'no:cacheprovider', '-k',
                        'test_readme_is_valid_restructuredtext'], cwd=str(REPO), env=env,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       universal_newlines=True, timeout=600)
    assert r.returncode == 0 and re.search(r'^1 passed', r.stdout, re.M), r.stdout[-5000:]
    assert 'in %s)' % env['DISPY_TEST_VENV'] in r.stdout, r.stdout[-3000:]
    assert 'externally-managed' not in r.stdout, r.stdout[-3000:]


# ---------------------------------------------------------------- packaging

def test_pyproject_builds_the_wheel(tmp_path):
    """pyproject.toml names setuptools' PEP 517 backend, so ``pip install .``
    builds a wheel (no deprecated ``setup.py install``), and setup.py still
    works on its own."""
    import importlib.util
    if not (importlib.util.find_spec('setuptools') and importlib.util.find_spec('wheel')):
        _need('setuptools and wheel', 'not installed here (tests/requirements.txt)')
    src = tmp_path / 'src'
    src.mkdir()
    for name in ('setup.py', 'pyproject.toml', 'dispynode.py', 'dispy_common.py', 'README.rst',
                 'LICENSE'):
        shutil.copy(str(REPO / name), str(src / name))
    assert re.search(r'^build-backend = "setuptools\.build_meta"$',
                     (src / 'pyproject.toml').read_text(), re.M)
    r = subprocess.run([sys.executable, '-m', 'pip', 'wheel', '--no-deps', '--no-build-isolation',
                        '--disable-pip-version-check', '-w', str(tmp_path / 'dist'), str(src)],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       universal_newlines=True, timeout=300)
    assert r.returncode == 0 and 'DEPRECATION' not in r.stdout, r.stdout
    import zipfile
    wheel, = (tmp_path / 'dist').glob('dispynode-%s-py3-none-any.whl' % dn.__version__)
    with zipfile.ZipFile(str(wheel)) as zf:
        names = zf.namelist()
        info = '%s.dist-info/' % wheel.name.split('-py3')[0]
        entry_points = zf.read(info + 'entry_points.txt').decode()
        metadata = zf.read(info + 'METADATA').decode()
    assert 'dispynode.py' in names and 'dispy_common.py' in names
    assert 'dispynode = dispynode:main' in entry_points
    assert 'Requires-Python: >=3.8' in metadata
    version = subprocess.run([sys.executable, 'setup.py', '--version'], cwd=str(src),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             universal_newlines=True, timeout=120)
    assert version.stdout.strip().splitlines()[-1] == dn.__version__, version
