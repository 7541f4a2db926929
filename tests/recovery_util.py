"""Helpers for the recovery and crash-consistency tests.

- ``LegacyProc``: a legacy client script run in the background, its stdout
  read line by line (for scenarios where the test acts while the client
  runs: freeze it, signal the node, ...).
- ``ResultSink``: a client-side TCP server that ACKs ``JOB_REPLY:`` frames and
  records the replies (stands in for a dispy client's result port).
- ``ProtoDriver``: a minimal dispy 4.5 client speaking the wire protocol with
  dispy_common (PING, COMPUTE, JOB, RESEND_JOB_RESULTS, PENDING_JOBS,
  RETRIEVE_JOB, CLOSE).
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

from legacy import CLIENTS, REPO, ensure_legacy_venv, free_port

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


# ---------------------------------------------------------------- result sink

class ResultSink:
    """Listens on 127.0.0.1:``port`` like a client's TCP server: ACKs each
    ``JOB_REPLY:`` and keeps the decoded ``_JobReply`` records (and counts the
    other frames it got, e.g. PONG: and TERMINATED:)."""

    def __init__(self, port=None, ack=True):
        self.port = port or free_port()
        self.ack = ack
        self.replies = []          # dc.JobReply, in arrival order
        self.tags = []
        self.lock = threading.Lock()
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(('127.0.0.1', self.port))
        self.sock.listen(64)
        self.sock.settimeout(0.2)
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                break
            threading.Thread(target=self._conn, args=(conn,), daemon=True).start()

    def _conn(self, conn):
        with conn:
            try:
                conn.settimeout(5)
                msg = dc.recv_msg(conn, None, time.monotonic() + 5)
                tag, payload = dc.split_tag(msg)
                with self.lock:
                    self.tags.append(tag)
                if tag == b'JOB_REPLY':
                    reply = dc.loads_records(payload)
                    if self.ack:
                        dc.send_msg(conn, b'ACK')
                    with self.lock:
                        self.replies.append(reply)
            except (OSError, dc.ProtocolError):
                pass

    def uids(self):
        with self.lock:
            return [r.uid for r in self.replies]

    def close(self):
        self._stop.set()
        try:
            self.sock.close()
        except OSError:
            pass
        self.thread.join(2)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


# ---------------------------------------------------------------- protocol driver

class ProtoDriver:
    """A tiny dispy 4.5 client built on dispy_common (no asyncoro)."""

    def __init__(self, node_port, secret='', timeout=5.0):
        self.addr = ('127.0.0.1', node_port)
        self.secret = secret
        self.timeout = timeout
        self.node_auth = None
        self.sign = None

    def request(self, data, auth=None, answer=True, ack_after=False):
        """One TCP request: auth, frame ``data``; returns the answer frame
        (None if the node closed without answering)."""
        auth = auth or self.node_auth or b'0' * dc.AUTH_LEN
        with socket.create_connection(self.addr, timeout=self.timeout) as sock:
            sock.settimeout(self.timeout)
            sock.sendall(auth)
            dc.send_msg(sock, data)
            if not answer:
                return None
            try:
                msg = dc.recv_msg(sock, None, time.monotonic() + self.timeout)
            except dc.ProtocolError:
                return None
            if ack_after:
                dc.send_msg(sock, b'ACK')
            return msg

    def ping(self, port):
        pong = dc.loads_plain(self.request(b'PING:' + dc.dumps_plain({
            'version': dc.PROTOCOL_VERSION, 'sign': 'feedc0de', 'port': port,
            'ip_addrs': ['127.0.0.1']})))
        self.sign = pong['sign']
        self.node_auth = dc.auth_code(self.secret, pong['sign'])
        return pong

    def compute(self, compute_id, auth, port, code, name, dest_path=None):
        comp = dc.Compute(type=dc.Compute.func_type, name=name, id=compute_id, code=code,
                          dest_path=dest_path, xfer_files=[], reentrant=False, setup=None,
                          cleanup=True, scheduler_ip_addr='127.0.0.1', scheduler_port=port,
                          auth=auth, job_result_port=port, pulse_interval=None)
        return self.request(b'COMPUTE:' + dc.dumps(comp))

    def job(self, compute_id, uid, args=(), kwargs=None):
        job = dc.DispyJobRecord(uid=uid, hash='h%x' % uid, compute_id=compute_id,
                                args=dc.dumps_plain(tuple(args)),
                                kwargs=dc.dumps_plain(dict(kwargs or {})),
                                xfer_files=[], code='')
        return self.request(b'JOB:' + dc.dumps(job))

    def resend(self, compute_id, auth, node_auth=None):
        msg = self.request(b'RESEND_JOB_RESULTS:' + dc.dumps_plain(
            {'compute_id': compute_id, 'auth': auth}), auth=node_auth)
        return dc.loads_plain(msg) if msg is not None else None

    def pending(self, compute_id, auth, node_auth=None):
        msg = self.request(b'PENDING_JOBS:' + dc.dumps_plain(
            {'compute_id': compute_id, 'auth': auth}), auth=node_auth)
        return dc.loads_plain(msg) if msg is not None else None

    def retrieve(self, compute_id, auth, uid, node_auth=None):
        """RETRIEVE_JOB: the stored reply (a dc.JobReply) or None; ACKs it."""
        msg = self.request(b'RETRIEVE_JOB:' + dc.dumps_plain(
            {'compute_id': compute_id, 'auth': auth, 'uid': uid, 'hash': 'h%x' % uid}),
            auth=node_auth, ack_after=True)
        return dc.loads_records(msg) if msg is not None else None

    def close(self, compute_id, auth, node_auth=None, terminate_pending=False):
        self.request(b'CLOSE:' + dc.dumps_plain(
            {'compute_id': compute_id, 'auth': auth, 'terminate_pending': terminate_pending}),
            auth=node_auth, answer=False)


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
