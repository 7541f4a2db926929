"""Helpers for the recovery and crash-consistency tests.

- ``LegacyProc``: a legacy client script run in the background, its stdout
  read line by line (for scenarios where the test acts while the client
  runs: freeze it, signal the node, ...).
(The protocol client and its result server are driver.Driver and
driver.ReplyServer.)
- ``node_is_free(port)`` / ``wait_node_free``: probe with a UDP PING whether
  the node answers with a TCP PONG, which it does only while it is free.
- ``scan_store(prefix)``: classify every file under a node's prefix and check
  that records and stored replies are whole.
"""

import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from legacy import CLIENTS, REPO, ensure_legacy_venv

sys.path.insert(0, str(REPO))
import dispy_common as dc  # noqa: E402

REPLY_PREFIX = '_dispy_job_reply_'


# ---------------------------------------------------------------- legacy client

class LegacyProc:
    """A legacy client script (in tests/clients/) running in the background.

    ``wait_line(prefix, timeout)`` returns the first stdout line starting with
    ``prefix`` (without the prefix); ``finish(timeout)`` waits for the exit and
    returns the parsed ``RESULT:`` JSON (or None)."""

    def __init__(self, script, *args, cwd, env=None, watchdog=60):
        full_env = dict(os.environ)
        full_env['PYTHONUNBUFFERED'] = '1'
        full_env['DISPYTEST_CLIENT_WATCHDOG'] = str(watchdog)
        full_env['PYTHONPATH'] = os.pathsep.join(
            [str(CLIENTS)] + ([full_env['PYTHONPATH']] if full_env.get('PYTHONPATH') else []))
        if env:
            full_env.update(env)
        path = CLIENTS / script if not os.path.isabs(str(script)) else Path(script)
        self.cmd = [str(ensure_legacy_venv()), str(path)] + [str(a) for a in args]
        self.proc = subprocess.Popen(self.cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, env=full_env, cwd=str(cwd),
                                     start_new_session=True)
        self.pid = self.proc.pid
        self.lines = queue.Queue()
        self.out = []
        self.err = []
        self._threads = [threading.Thread(target=self._pump, args=(self.proc.stdout, self.out,
                                                                     True), daemon=True),
                         threading.Thread(target=self._pump, args=(self.proc.stderr, self.err,
                                                                     False), daemon=True)]
        for t in self._threads:
            t.start()

    def _pump(self, stream, store, lines):
        for raw in iter(stream.readline, b''):
            line = raw.decode(errors='replace')
            store.append(line)
            if lines:
                self.lines.put(line.rstrip('\n'))
        stream.close()

    def wait_line(self, prefix, timeout):
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            try:
                line = self.lines.get(timeout=min(left, 0.2))
            except queue.Empty:
                if self.proc.poll() is not None and self.lines.empty():
                    # the process ended; give the pump a moment to deliver
                    time.sleep(0.1)
                    if self.lines.empty():
                        return None
                continue
            if line.startswith(prefix):
                return line[len(prefix):]

    def signal(self, sig):
        try:
            os.killpg(self.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def finish(self, timeout):
        """Wait for the exit (SIGKILL after ``timeout``); the RESULT JSON."""
        import json
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
        for t in self._threads:
            t.join(5)
        for line in reversed(self.out):
            if line.startswith('RESULT:'):
                try:
                    return json.loads(line[len('RESULT:'):])
                except ValueError:
                    return None
        return None

    def kill(self):
        self.signal(signal.SIGCONT)
        self.signal(signal.SIGKILL)
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            pass

    def describe(self):
        return 'client %s (rc %s)\n--- stdout ---\n%s\n--- stderr ---\n%s' % (
            ' '.join(self.cmd), self.proc.returncode, ''.join(self.out)[-6000:],
            ''.join(self.err)[-6000:])


# ---------------------------------------------------------------- node probes

def node_is_free(node_port, wait=0.6):
    """True if the node answers a UDP PING with a TCP PONG (only a free node
    does)."""
    lst = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lst.bind(('127.0.0.1', 0))
    lst.listen(8)
    port = lst.getsockname()[1]
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        udp.sendto(b'PING:' + dc.dumps_plain({
            'version': dc.PROTOCOL_VERSION, 'sign': 'feedc0de', 'port': port,
            'ip_addrs': ['127.0.0.1']}), ('127.0.0.1', node_port))
        lst.settimeout(wait)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                conn, _ = lst.accept()
            except socket.timeout:
                return False
            with conn:
                conn.settimeout(2)
                try:
                    msg = dc.recv_msg(conn, None, time.monotonic() + 2)
                except (OSError, dc.ProtocolError):
                    continue
                if msg.startswith(b'PONG:'):
                    return True
        return False
    finally:
        udp.close()
        lst.close()


def wait_node_free(node_port, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if node_is_free(node_port, wait=min(0.6, max(0.05, deadline - time.monotonic()))):
            return True
    return False


def processes_gone(pids, timeout):
    from legacy import pid_alive, wait_for
    return wait_for(lambda: not [p for p in pids if pid_alive(p)], timeout)


# ---------------------------------------------------------------- store scan

def scan_store(prefix):
    """Classify the files under ``prefix``.

    Returns a dict: ``records`` {path: dict}, ``replies`` {path: dict},
    ``tmp`` [paths of .tmp-* files], ``corrupt`` [paths of .corrupt-* files],
    ``torn`` [(path, why)] for records/replies that do not load whole,
    ``other`` [paths]."""
    import re
    out = {'records': {}, 'replies': {}, 'tmp': [], 'corrupt': [], 'torn': [], 'other': []}
    prefix = Path(prefix)
    if not prefix.exists():
        return out
    for root, dirs, files in os.walk(str(prefix)):
        for name in files:
            path = os.path.join(root, name)
            if name.startswith('.tmp-'):
                out['tmp'].append(path)
            elif '.corrupt-' in name:
                out['corrupt'].append(path)
            elif name.startswith(REPLY_PREFIX):
                rec = _load(path)
                if isinstance(rec, dict) and isinstance(rec.get('uid'), int) \
                        and 'hash' in rec and isinstance(rec.get('reply'), bytes) \
                        and name == REPLY_PREFIX + str(rec['uid']):
                    try:
                        reply = dc.loads_records(rec['reply'])
                    except dc.ProtocolError as exc:
                        out['torn'].append((path, 'reply bytes: %s' % exc))
                        continue
                    out['replies'][path] = dict(rec, decoded=reply)
                else:
                    out['torn'].append((path, repr(rec)[:200]))
            elif root == str(prefix) and re.match(r'^\d+_[0-9a-fA-F]+$', name):
                rec = _load(path)
                if isinstance(rec, dict) and {'id', 'auth', 'dest_path', 'sign'} <= set(rec):
                    out['records'][path] = rec
                else:
                    out['torn'].append((path, repr(rec)[:200]))
            else:
                out['other'].append(path)
    return out


def _load(path):
    try:
        with open(path, 'rb') as fh:
            return dc.loads_plain(fh.read())
    except (OSError, dc.ProtocolError) as exc:
        return exc
