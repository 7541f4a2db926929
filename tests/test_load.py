"""Load and stability: connection floods, slow-loris peers, many tiny jobs.

The node serves at most --max_connections (default 64) requests at once and
refuses the excess by closing.  A legacy client whose JOB request is
refused reschedules the job (dispy 4.5.5 ``_Cluster.run_job``: any exception
but EnvironmentError appends it to the queue again); a refused COMPUTE is
fatal for that client (``setup_node`` drops the node), so the flood tests
check that the real client still completes every job.
"""

import random
import selectors
import socket
import struct
import threading
import time

import pytest

from dispy_common import DispyJob

from legacy import CLIENTS, free_port, run_client, wait_for

pytestmark = [pytest.mark.interop, pytest.mark.slow]

FINISHED = DispyJob.Finished


def threads_of(pid):
    try:
        with open('/proc/%d/status' % pid) as fh:
            for line in fh:
                if line.startswith('Threads:'):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_kb(pid):
    with open('/proc/%d/status' % pid) as fh:
        for line in fh:
            if line.startswith('VmRSS:'):
                return int(line.split()[1])
    return 0


class Flood:
    """Keeps ``count`` connections to the node open from one thread: a third
    idle, a third sending random garbage, a third sending a partial frame.
    When the node closes one (refused over the cap, or dropped at
    msg_timeout), it is reopened after ``pause`` seconds while ``sustain``."""

    def __init__(self, port, count=200, sustain=True, pause=0.05):
        self.port, self.count, self.sustain, self.pause = port, count, sustain, pause
        self.sel = selectors.DefaultSelector()
        self.stop = threading.Event()
        self.opened = self.closed_by_node = self.peak = 0
        self.rnd = random.Random(7)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.pending = []       # (time, kind) to reopen

    def start(self):
        for i in range(self.count):
            self._open(i % 3)
        self.thread.start()
        return self

    def _open(self, kind):
        s = socket.socket()
        s.setblocking(True)
        s.settimeout(5)
        try:
            s.connect(('127.0.0.1', self.port))
            if kind == 1:
                s.sendall(bytes(self.rnd.getrandbits(8) for _ in range(self.rnd.randint(1, 600))))
            elif kind == 2:
                s.sendall(b'a' * 40 + struct.pack('>L', 5000) + b'JOB:' + b'x' * 100)
        except OSError:
            s.close()
            self.pending.append((time.monotonic() + self.pause, kind))
            return
        s.setblocking(False)
        self.sel.register(s, selectors.EVENT_READ, kind)
        self.opened += 1
        self.peak = max(self.peak, len(self.sel.get_map()))

    def _run(self):
        while not self.stop.is_set():
            for key, _ in self.sel.select(0.05):
                try:
                    data = key.fileobj.recv(4096)
                except OSError:
                    data = b''
                if not data:
                    self.sel.unregister(key.fileobj)
                    key.fileobj.close()
                    self.closed_by_node += 1
                    if self.sustain:
                        self.pending.append((time.monotonic() + self.pause, key.data))
            now = time.monotonic()
            due = [p for p in self.pending if p[0] <= now]
            self.pending = [p for p in self.pending if p[0] > now]
            for _, kind in due:
                if not self.stop.is_set():
                    self._open(kind)

    def close(self):
        self.stop.set()
        self.thread.join(10)
        for key in list(self.sel.get_map().values()):
            key.fileobj.close()
        self.sel.close()


def _check_load_result(res, node, njobs):
    msg = res.describe()[-6000:] + '\n--- node log ---\n' + node.log()[-6000:]
    assert res.data is not None and 'error' not in res.data, msg
    assert not res.data.get('watchdog') and not res.data.get('gave_up'), msg
    assert res.data['all_final'], msg
    results = res.data['results']
    assert len(results) == njobs
    bad = [r for r in results if r[1] != FINISHED or r[2] != r[0] * 2 + 1]
    assert bad == [], ('%d jobs wrong, e.g. %s; %s' % (len(bad), bad[:5], res.data['bad'][:2])
                       + msg)
    assert res.data.get('closed'), msg


def _run_load_client(node, tmp_path, njobs, name, timeout=150, wait=120, give_up=60):
    d = tmp_path / name
    d.mkdir()
    return run_client(CLIENTS / 'load_jobs.py', node.port, free_port(), 'jobs=%d' % njobs,
                      'wait=%s' % wait, 'give_up=%s' % give_up, timeout=timeout, cwd=d)


def _lane_allowance(clients):
    """The node's courier keeps one thread per client reply address alive
    for LANE_IDLE_SECONDS after its last delivery (by design); those are
    allowed above the baseline, one per client that ran recently."""
    import sys
    from legacy import REPO
    sys.path.insert(0, str(REPO))
    try:
        import dispynode
    finally:
        sys.path.remove(str(REPO))
    return clients if getattr(dispynode, 'LANE_IDLE_SECONDS', 0) else 0


def _settle_threads(pid, baseline, timeout, clients=0):
    allowed = baseline + _lane_allowance(clients)
    return wait_for(lambda: (threads_of(pid) or 0) <= allowed, timeout, 0.1)


@pytest.mark.parametrize('mode', ['burst', 'sustained', 'after-setup'])
def test_flood_during_client(mode, node_factory, legacy_python, tmp_path):
    """200 concurrent connections (idle, garbage, partial frames) while the
    legacy client runs 200 jobs.  'burst': opened once as the client
    starts; 'sustained': each one the node closes is reopened for the whole
    run; 'after-setup': sustained, but started only once the client's
    computation is registered (so only JOB and result traffic meets it).
    Every job must be correct, and the node's thread count must return to
    its baseline (plus the courier's idle lane thread for this client)
    within 5 s after the flood ends."""
    node = node_factory(args=('--msg_timeout', '2'))
    time.sleep(0.5)
    baseline = threads_of(node.pid)
    out = {}
    flood = None
    if mode != 'after-setup':
        flood = Flood(node.port, 200, sustain=(mode == 'sustained')).start()
        assert flood.peak >= 60, flood.peak
    try:
        client = threading.Thread(target=lambda: out.update(res=_run_load_client(
            node, tmp_path, 200, 'client', timeout=150, wait=110, give_up=25)),
            daemon=True)
        client.start()
        if mode == 'after-setup':
            assert wait_for(lambda: ') from 127.0.0.1:' in node.log(), 30), node.log()[-3000:]
            flood = Flood(node.port, 200, sustain=True).start()
        client.join(160)
    finally:
        if flood is not None:
            flood.close()
    settled = _settle_threads(node.pid, baseline, 5.0, clients=1)
    threads_after = threads_of(node.pid)
    refused = node.log().count('too many connections')
    print('\nflood(%s): opened %d, closed by node %d, node refusals logged %d, peak %d'
          % (mode, flood.opened, flood.closed_by_node, refused, flood.peak))
    assert 'res' in out, 'client thread did not finish'
    _check_load_result(out['res'], node, 200)
    assert settled, 'threads %s, baseline %s, 5 s after the flood' % (threads_after, baseline)
    assert node.alive(), node.log()[-5000:]


def test_slow_loris_dropped(node_factory, tmp_path):
    """Peers trickling one byte per second (in the auth prefix, in the length,
    in the payload) are dropped at --msg_timeout 2 even though each byte
    arrives within any per-recv timeout; the node keeps serving PINGs."""
    node = node_factory(args=('--msg_timeout', '2'))
    time.sleep(0.3)
    baseline = threads_of(node.pid)
    payload = b'PING:' + b'\x80\x04}\x94.'
    streams = [b'a' * 40 + struct.pack('>L', len(payload)) + payload,   # auth
               b'b' * 39,                                               # near end of auth
               b'c' * 40 + b'\x00\x00\x00\x10' + b'x' * 16]             # payload
    starts = [0, 38, 44]
    socks = []
    for stream, start in zip(streams * 4, starts * 4):
        s = socket.create_connection(('127.0.0.1', node.port), timeout=5)
        s.sendall(stream[:start])
        socks.append([s, stream, start, None])
    t0 = time.monotonic()
    while time.monotonic() - t0 < 8 and any(e[3] is None for e in socks):
        for entry in socks:
            s, stream, pos, dropped = entry
            if dropped is not None:
                continue
            try:
                if pos < len(stream):
                    s.send(stream[pos:pos + 1])
                    entry[2] = pos + 1
                s.settimeout(0.001)
                try:
                    if s.recv(100) == b'':
                        entry[3] = time.monotonic() - t0
                except socket.timeout:
                    pass
            except OSError:
                entry[3] = time.monotonic() - t0
        time.sleep(1.0)
    for s, _, _, _ in socks:
        s.close()
    drops = [e[3] for e in socks]
    assert all(d is not None for d in drops), drops
    assert max(drops) < 4.5, drops     # 2 s after the start, plus 1 s trickle steps
    assert node.alive()
    assert _settle_threads(node.pid, baseline, 3.0), (threads_of(node.pid), baseline)


def test_unauthenticated_big_frames_allocate_nothing(node_factory):
    """Peers that send a wrong auth and then announce a frame of nearly
    MAX_FRAME (256 MiB) bytes, and idle: the node must not allocate memory
    for frames it has not received (or from unauthenticated peers at all).
    Six such peers must not grow its RSS by more than 64 MiB."""
    node = node_factory(args=('--msg_timeout', '3'))
    time.sleep(0.3)
    before = rss_kb(node.pid)
    socks = []
    try:
        for _ in range(6):
            s = socket.create_connection(('127.0.0.1', node.port), timeout=5)
            s.sendall(b'x' * 40 + struct.pack('>L', 256 * 1024 * 1024 - 16) + b'PING:')
            socks.append(s)
        time.sleep(1.0)
        during = rss_kb(node.pid)
    finally:
        for s in socks:
            s.close()
    assert node.alive()
    grown = (during - before) // 1024
    assert grown < 64, ('RSS grew by %d MiB for 6 idle unauthenticated peers (%d kB -> %d kB)'
                        % (grown, before, during))


def test_stability_5x1000(node_factory, legacy_python, tmp_path):
    """5 runs of 1,000 tiny jobs with the real client against one node
    (each run bounded to 120 s; a hang fails): every result correct, the
    node alive and back to its baseline thread count after each run."""
    node = node_factory()
    time.sleep(0.5)
    baseline = threads_of(node.pid)
    times = []
    for run in range(5):
        t0 = time.monotonic()
        res = _run_load_client(node, tmp_path, 1000, 'run%d' % run, timeout=120, wait=105)
        times.append(round(time.monotonic() - t0, 1))
        _check_load_result(res, node, 1000)
        assert node.alive(), node.log()[-5000:]
        assert _settle_threads(node.pid, baseline, 5.0, clients=run + 1), (
            run, threads_of(node.pid), baseline)
    print('\nstability: run times %s s' % times)
