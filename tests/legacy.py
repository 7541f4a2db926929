"""Test harness for running dispy nodes and legacy dispy 4.5.5 clients.

Stable API (other test modules import these names):

- ``REPO``: the repository root (a ``Path``).
- ``CLIENTS``: ``REPO/'tests'/'clients'``, the directory of legacy client scripts.
- ``LegacyUnavailable``: raised when the legacy stack can't be provided.
- ``legacy_python_base()``: path of a Python 3.6 interpreter, or None.
- ``ensure_legacy_venv()``: path of the cached legacy venv's python
  (``REPO/.legacy-venv``), built on first use with dispy 4.5.5 + asyncoro 4.3.4;
  LEGACY_EXTRAS (numpy 1.19.5) are added to it, also to a venv cached before.
- ``pyenv_python(version_prefix)``: newest ``$(pyenv root)/versions/<prefix>*``
  interpreter, or None.
- ``free_port()``: a port number free for both TCP and UDP on 127.0.0.1.
- nodes are started by ``tests/nodes.py`` (``NodeProc``), which uses this module.
- ``LegacyClient(script, *args, cwd, env=None, watchdog=60)``: a client in the
  background (``wait_line``, ``signal``, ``kill``, ``finish``, ``result``).
- ``start_client(script, *args, timeout=120, cwd=None, env=None)``: the same,
  started in the background (a LegacyClient; ``result()`` waits for it).
- ``run_client(script, *args, timeout=120, cwd=None, env=None) -> ClientResult``:
  runs a legacy client script (a path, a name in ``tests/clients/`` or a string
  of code) with the legacy venv's python. ``ClientResult`` has ``returncode,
  stdout, stderr, data`` (``data`` is the JSON printed on the last stdout line
  starting with ``RESULT:``, or None).
- ``wait_for(predicate, timeout, interval=0.05)``: poll until ``predicate()`` is
  true; returns its last value (falsy on timeout).
- ``pid_alive(pid)``: whether a process (not a zombie) with this pid exists.
- ``describe(res, node=None)``: client output plus the node's log, for messages.
- ``check_client(res, node=None, expect_closed=True)``: assert a client run
  (using tests/clients/_common.py) printed RESULT without error/watchdog and
  closed its cluster; returns ``res.data``.
- ``files_under(path)``: sorted relative paths of the regular files below path.
"""

import fcntl
import json
import os
import queue
import random
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CLIENTS = REPO / 'tests' / 'clients'
LEGACY_VENV = REPO / '.legacy-venv'
_MARKER = LEGACY_VENV / '.dispy-4.5.5-ok'
_LOCK = LEGACY_VENV / '.build.lock'
LEGACY_PACKAGES = ('asyncoro==4.3.4', 'dispy==4.5.5')
_CHECK = ("import dispy, asyncoro; assert dispy.__version__ == '4.5', dispy.__version__")
# Added to the venv, also to one built before they were listed (their own
# marker, so a cached venv gets them without a rebuild): numpy 1.19.5, the
# newest for Python 3.6, for the results of numpy 2 jobs (issue 21).
LEGACY_EXTRAS = ('numpy==1.19.5',)
_EXTRAS_MARKER = LEGACY_VENV / '.extras-ok'
_EXTRAS_CHECK = "import numpy; assert numpy.__version__ == '1.19.5', numpy.__version__"

__all__ = ['REPO', 'CLIENTS', 'LegacyUnavailable', 'legacy_python_base', 'ensure_legacy_venv',
           'pyenv_root', 'pyenv_python', 'free_port', 'ClientResult', 'LegacyClient',
           'start_client', 'run_client',
           'wait_for', 'pid_alive', 'describe', 'check_client', 'files_under', 'find_files']


class LegacyUnavailable(Exception):
    """The legacy Python 3.6 + dispy 4.5.5 stack cannot be provided."""

    @property
    def reason(self):
        return str(self.args[0]) if self.args else 'unknown reason'


# ---------------------------------------------------------------- interpreters

def pyenv_root():
    """pyenv's root directory (from ``pyenv root``, else ~/.pyenv), or None."""
    try:
        out = subprocess.run(['pyenv', 'root'], stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, timeout=20, check=True)
        root = out.stdout.decode().strip()
        if root and os.path.isdir(root):
            return Path(root)
    except (OSError, subprocess.SubprocessError):
        pass
    root = Path.home() / '.pyenv'
    return root if root.is_dir() else None


def _version_key(name):
    key = []
    for part in name.split('.'):
        digits = ''.join(c for c in part if c.isdigit())
        key.append(int(digits) if digits else -1)
    return key


def pyenv_python(version_prefix):
    """The newest pyenv interpreter whose version starts with ``version_prefix``
    (e.g. '3.8' matches 3.8.18 but not 3.80), or None."""
    root = pyenv_root()
    if root is None:
        return None
    versions = root / 'versions'
    if not versions.is_dir():
        return None
    found = []
    for d in versions.iterdir():
        name = d.name
        if name == version_prefix or name.startswith(version_prefix + '.'):
            py = d / 'bin' / 'python'
            if py.exists() and os.access(str(py), os.X_OK):
                found.append((_version_key(name), py))
    if not found:
        return None
    return max(found)[1]


def legacy_python_base():
    """The Python 3.6 interpreter used to build the legacy venv, or None."""
    env = os.environ.get('DISPY_LEGACY_PYTHON')
    if env:
        return Path(env)
    root = pyenv_root()
    if root is not None:
        py = root / 'versions' / '3.6.15' / 'bin' / 'python'
        if py.exists():
            return py
    return None


def _legacy_venv_python():
    return LEGACY_VENV / 'bin' / 'python'


def _check_venv(py, timeout=60):
    try:
        r = subprocess.run([str(py), '-c', _CHECK], stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, timeout=timeout)
    except (OSError, subprocess.SubprocessError) as exc:
        return False, str(exc)
    return r.returncode == 0, r.stdout.decode(errors='replace')


def ensure_legacy_venv():
    """Return the python of the cached legacy venv (REPO/.legacy-venv), building
    it if needed. Safe against parallel callers (fcntl lock). Raises
    LegacyUnavailable with a reason if Python 3.6 is missing or install fails."""
    py = _legacy_venv_python()
    if _MARKER.exists() and py.exists():
        return _ensure_extras(py)
    base = legacy_python_base()
    if base is None or not Path(base).exists():
        raise LegacyUnavailable(
            'Python 3.6 interpreter not found (set DISPY_LEGACY_PYTHON or install 3.6.15 '
            'with pyenv; looked for %s)' % (base or '$(pyenv root)/versions/3.6.15/bin/python'))
    LEGACY_VENV.mkdir(parents=True, exist_ok=True)
    with open(str(_LOCK), 'a+') as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            if _MARKER.exists() and py.exists():
                return _ensure_extras(py, locked=True)
            steps = [
                [str(base), '-m', 'venv', str(LEGACY_VENV)],
                [str(py), '-m', 'pip', 'install', '-q', '--disable-pip-version-check']
                + list(LEGACY_PACKAGES),
            ]
            for cmd in steps:
                try:
                    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                       timeout=900, env=dict(os.environ, PIP_NO_INPUT='1'))
                except (OSError, subprocess.SubprocessError) as exc:
                    raise LegacyUnavailable('legacy venv build failed at %r: %s' % (cmd, exc))
                if r.returncode != 0:
                    raise LegacyUnavailable('legacy venv build failed at %r (exit %s):\n%s' % (
                        ' '.join(cmd), r.returncode, r.stdout.decode(errors='replace')[-3000:]))
            ok, out = _check_venv(py)
            if not ok:
                raise LegacyUnavailable('legacy venv import check failed:\n%s' % out[-3000:])
            tmp = _MARKER.with_name(_MARKER.name + '.tmp')
            tmp.write_text('%s\n' % ' '.join(LEGACY_PACKAGES))
            os.replace(str(tmp), str(_MARKER))
            return _ensure_extras(py, locked=True)
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def _extras_ok():
    try:
        return _EXTRAS_MARKER.read_text().split() == list(LEGACY_EXTRAS)
    except OSError:
        return False


def _ensure_extras(py, locked=False):
    """Install LEGACY_EXTRAS into the venv unless its marker lists them
    (only adds packages); returns ``py``."""
    if _extras_ok():
        return py
    if not locked:
        with open(str(_LOCK), 'a+') as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            try:
                return _ensure_extras(py, locked=True)
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
    if _extras_ok():
        return py
    cmd = [str(py), '-m', 'pip', 'install', '-q', '--disable-pip-version-check',
           '--only-binary', ':all:'] + list(LEGACY_EXTRAS)
    r = subprocess.run([str(py), '-c', _EXTRAS_CHECK], stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT)
    if r.returncode != 0:
        try:
            r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               timeout=900, env=dict(os.environ, PIP_NO_INPUT='1'))
        except (OSError, subprocess.SubprocessError) as exc:
            raise LegacyUnavailable('installing %s into the legacy venv failed: %s'
                                    % (' '.join(LEGACY_EXTRAS), exc))
        if r.returncode != 0:
            raise LegacyUnavailable('installing %s into the legacy venv failed (exit %s):\n%s'
                                    % (' '.join(LEGACY_EXTRAS), r.returncode,
                                       r.stdout.decode(errors='replace')[-3000:]))
        r = subprocess.run([str(py), '-c', _EXTRAS_CHECK], stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT)
        if r.returncode != 0:
            raise LegacyUnavailable('legacy venv extras check failed:\n%s'
                                    % r.stdout.decode(errors='replace')[-3000:])
    tmp = _EXTRAS_MARKER.with_name(_EXTRAS_MARKER.name + '.tmp')
    tmp.write_text('%s\n' % ' '.join(LEGACY_EXTRAS))
    os.replace(str(tmp), str(_EXTRAS_MARKER))
    return py


# ----------------------------------------------------------------------- ports

_ports_lock = threading.Lock()
_ports_given = set()


def _port_is_free(port):
    # binding the wildcard address (without SO_REUSEADDR) fails if anything
    # holds the port on any local address, 127.0.0.1 included
    socks = []
    try:
        for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
            s = socket.socket(socket.AF_INET, kind)
            socks.append(s)
            s.bind(('', port))
        return True
    except OSError:
        return False
    finally:
        for s in socks:
            s.close()


def free_port():
    """A port free for both TCP and UDP on 127.0.0.1 (and the wildcard address),
    chosen below the kernel's ephemeral range so outgoing connections won't
    grab it later; never the same port twice in one process."""
    lo, hi = 20000, 32000
    try:
        with open('/proc/sys/net/ipv4/ip_local_port_range') as f:
            elo = int(f.read().split()[0])
        if elo <= hi:
            hi = max(lo + 1000, elo - 1)
    except (OSError, ValueError, IndexError):
        pass
    rng = random.Random(os.getpid() ^ int(time.time() * 1e6))
    with _ports_lock:
        for _ in range(2000):
            port = rng.randint(lo, hi)
            if port in _ports_given:
                continue
            if _port_is_free(port):
                _ports_given.add(port)
                return port
    raise RuntimeError('no free TCP+UDP port found')


# ---------------------------------------------------------------- misc helpers

from clients._common import pid_alive  # noqa: E402,F401  (the client scripts' own)

def wait_for(predicate, timeout=10.0, interval=0.02):
    """Poll predicate() until it returns a true value or timeout seconds pass.
    Returns the last value of predicate()."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


def next_from(items, timeout, match=None, ended=None):
    """The next entry of the queue ``items`` that ``match`` accepts (the
    others are dropped), or None after ``timeout`` seconds or once
    ``ended()``, asked when the queue is empty, says none can come."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        try:
            item = items.get(timeout=min(left, 0.2))
        except queue.Empty:
            if ended is not None and ended():
                return None
            continue
        if match is None or match(item):
            return item


class ClosesOnExit:
    """``with obj:`` calls ``obj.close()`` on the way out, however it leaves."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def killpg(proc, sig):
    """Signal ``proc``'s process group (it leads one), else ``proc`` alone."""
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        try:
            proc.send_signal(sig)
        except (ProcessLookupError, OSError):
            pass


class GroupLeader(ClosesOnExit):
    """A child process that leads its own process group (started with
    start_new_session): ``popen`` (the Popen) and ``pid``; stop, kill,
    close.  ``with`` stops it."""

    def __init__(self, popen):
        self.popen = popen
        self.pid = popen.pid

    def alive(self):
        return self.popen.poll() is None

    def send_signal(self, sig):
        if self.popen.poll() is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def stop(self, sig=signal.SIGINT, timeout=10.0):
        """Signal the process, wait up to ``timeout``, then SIGKILL its
        process group (whatever it left running too).  Returns the exit
        code (None if it would not die)."""
        self.send_signal(sig)
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        return self.kill()

    def kill(self, group=True):
        """SIGKILL the process group (with ``group=False`` the process
        alone: what it started must notice by itself)."""
        if group:
            killpg(self.popen, signal.SIGKILL)
        else:
            self.send_signal(signal.SIGKILL)
        try:
            return self.popen.wait(5)
        except subprocess.TimeoutExpired:
            return None

    def close(self):
        self.stop()


def __getattr__(name):
    """``legacy.Node``, which bench/ imports: nodes.Node (loaded late, as
    nodes imports this module)."""
    if name == 'Node':
        from nodes import Node
        return Node
    raise AttributeError('module %r has no attribute %r' % (__name__, name))


# ---------------------------------------------------------------------- client

class ClientResult:
    def __init__(self, returncode, stdout, stderr, data, cmd):
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        self.data = data
        self.cmd = cmd

    def describe(self):
        return 'client %r exited %s\n--- stdout ---\n%s\n--- stderr ---\n%s' % (
            ' '.join(self.cmd), self.returncode, self.stdout[-8000:], self.stderr[-8000:])

    def __repr__(self):
        return '<ClientResult rc=%s data=%r>' % (self.returncode, self.data)


def _parse_result(stdout):
    for line in reversed(stdout.splitlines()):
        if line.startswith('RESULT:'):
            try:
                return json.loads(line[len('RESULT:'):])
            except ValueError:
                return None
    return None


def client_env(watchdog, env=None):
    """The environment of a client script: unbuffered, tests/clients on its
    path (for _common.py), and a watchdog (_common.run reports its partial
    state and exits after ``watchdog`` seconds, before the harness kills it)."""
    full_env = dict(os.environ, PYTHONUNBUFFERED='1', DISPYTEST_CLIENT_WATCHDOG=str(watchdog))
    full_env['PYTHONPATH'] = os.pathsep.join(
        [str(CLIENTS)] + ([full_env['PYTHONPATH']] if full_env.get('PYTHONPATH') else []))
    full_env.update(env or {})
    return full_env


def client_script(script):
    """(path, temp file or None) of a client: a Path, a name in
    tests/clients/, a path, or a string of code (written to a temp file)."""
    if isinstance(script, Path):
        return script, None
    if '\n' not in script and (CLIENTS / script).exists():
        return CLIENTS / script, None
    if '\n' not in script and os.path.exists(script):
        return Path(script), None
    fd, name = tempfile.mkstemp(prefix='dispyclient-', suffix='.py')
    with os.fdopen(fd, 'w') as f:
        f.write(script)
    return Path(name), Path(name)


class LegacyClient(ClosesOnExit):
    """A legacy client script running in the background with the legacy
    venv's python, in its own process group; its stdout is read line by line.

    ``wait_line(prefix, timeout)`` returns the first stdout line starting
    with ``prefix`` (without it), for tests that act while the client runs;
    ``result(timeout)`` waits for the exit (AssertionError with the output
    after ``timeout``) and returns a ClientResult; ``finish(timeout)`` waits,
    SIGKILLs after ``timeout`` and returns the RESULT data (or None)."""

    def __init__(self, script, *args, cwd, env=None, watchdog=60, python=None, timeout=None):
        self.deadline = time.monotonic() + (timeout or watchdog + 5)   # for result()
        path, self.tmpfile = client_script(script)
        self.cmd = [str(python or ensure_legacy_venv()), str(path)] + [str(a) for a in args]
        self.proc = subprocess.Popen(self.cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, env=client_env(watchdog, env),
                                     cwd=str(cwd), start_new_session=True)
        self.pid = self.proc.pid
        self.lines = queue.Queue()
        self.out, self.err = [], []
        self._threads = [threading.Thread(target=self._pump, args=(stream, store, keep),
                                          daemon=True, name='client-%s-%d' % (name, self.pid))
                         for stream, store, keep, name in (
                             (self.proc.stdout, self.out, True, 'out'),
                             (self.proc.stderr, self.err, False, 'err'))]
        for t in self._threads:
            t.start()

    def _pump(self, stream, store, lines):
        for raw in iter(stream.readline, b''):
            line = raw.decode(errors='replace')
            store.append(line)
            if lines:
                self.lines.put(line.rstrip('\n'))
        stream.close()

    def _ended(self):
        if self.proc.poll() is None:
            return False
        time.sleep(0.1)         # the process ended; give the pump a moment to deliver
        return self.lines.empty()

    def wait_line(self, prefix, timeout):
        line = next_from(self.lines, timeout, lambda line: line.startswith(prefix),
                         self._ended)
        return None if line is None else line[len(prefix):]

    def signal(self, sig):
        try:
            os.killpg(self.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def wait(self, timeout=None):
        """Wait for the exit (SIGKILL after ``timeout``, by default what is
        left of the one it started with) and the output; True if it exited
        in time."""
        if timeout is None:
            timeout = max(1.0, self.deadline - time.monotonic())
        try:
            self.proc.wait(timeout)
            in_time = True
        except subprocess.TimeoutExpired:
            in_time = False
        self.kill()         # leftovers of its group too
        for t in self._threads:
            t.join(5)
        if self.tmpfile is not None:
            try:
                self.tmpfile.unlink()
            except OSError:
                pass
        return in_time

    def finish(self, timeout):
        self.wait(timeout)
        return _parse_result(''.join(self.out))

    def result(self, timeout=None):
        if not self.wait(timeout):
            raise AssertionError('client %s timed out after %ss\n--- stdout ---\n%s\n'
                                 '--- stderr ---\n%s' % (' '.join(self.cmd), timeout,
                                                         ''.join(self.out)[-8000:],
                                                         ''.join(self.err)[-8000:]))
        out = ''.join(self.out)
        return ClientResult(self.proc.returncode, out, ''.join(self.err), _parse_result(out),
                            self.cmd)

    def kill(self):
        self.signal(signal.SIGCONT)
        self.signal(signal.SIGKILL)
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            pass

    close = kill            # (a ``with`` block kills a client it leaves running)

    def describe(self):
        return 'client %s (rc %s)\n--- stdout ---\n%s\n--- stderr ---\n%s' % (
            ' '.join(self.cmd), self.proc.returncode, ''.join(self.out)[-6000:],
            ''.join(self.err)[-6000:])


def start_client(script, *args, timeout=120, cwd=None, env=None, python=None):
    """Start a legacy client script (see client_script) with the legacy
    venv's python, to run for at most ``timeout`` seconds (its watchdog fires
    a little earlier); returns the LegacyClient.  ``cwd`` defaults to a fresh
    temp directory (the client writes its _dispy_<time> recovery files and
    received files there)."""
    if cwd is None:
        cwd = tempfile.mkdtemp(prefix='dispyclient-cwd-')
    watchdog = max(1.0, timeout - 5 if timeout > 10 else timeout * 0.8)
    return LegacyClient(script, *args, cwd=cwd, env=env, watchdog=watchdog, python=python,
                        timeout=timeout)


def run_client(script, *args, timeout=120, **kw):
    """start_client, run to its exit: a ClientResult.  Raises AssertionError
    (with the output) if it runs longer than ``timeout`` seconds."""
    return start_client(script, *args, timeout=timeout, **kw).result(timeout)


# ------------------------------------------------------------ test helpers

def describe(res, node=None):
    """Client output (and the node's log) for assertion messages."""
    msg = res.describe()
    if node is not None:
        msg += '\n--- node log (%s, port %s) ---\n%s' % (node.impl, node.port, node.log()[-12000:])
    return msg


def check_client(res, node=None, expect_closed=True):
    """Assert that a client script (tests/clients/_common.py conventions)
    printed its RESULT without an error or watchdog timeout and, if
    expect_closed, that cluster.close() finished. Returns res.data."""
    assert res.data is not None, 'client printed no RESULT\n' + describe(res, node)
    assert 'error' not in res.data, 'client raised:\n%s\n%s' % (res.data['error'],
                                                                describe(res, node))
    assert not res.data.get('watchdog'), 'client watchdog fired\n' + describe(res, node)
    if expect_closed:
        assert res.data.get('closed'), 'cluster.close() did not finish\n' + describe(res, node)
    return res.data


def find_files(path, pattern, dirs=False):
    """Absolute Paths of the files (and, with ``dirs``, directories) below
    ``path`` whose name matches the fnmatch ``pattern``; like Path.rglob,
    but os.walk tolerates directories that the node removes meanwhile."""
    import fnmatch
    return sorted(Path(top) / name for top, subdirs, names in os.walk(str(path))
                  for name in fnmatch.filter(names + (subdirs if dirs else []), pattern))


def files_under(path):
    """Sorted relative paths of the regular files (and symlinks) below path."""
    # os.walk, not Path.rglob: the node may be removing (empty) directories
    # meanwhile, and os.walk skips one that vanishes instead of raising.
    found = []
    for top, dirs, files in os.walk(str(path)):
        found += [os.path.relpath(os.path.join(top, f), str(path)) for f in files]
        found += [os.path.relpath(os.path.join(top, d), str(path)) for d in dirs
                  if os.path.islink(os.path.join(top, d))]
    return sorted(found)
