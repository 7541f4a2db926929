#!/usr/bin/env python3
"""dispynode: a compute node for dispy 4.5 clients, on the standard library.

A drop-in replacement for the node of dispy 4.5.5 (whose asyncoro base no
longer runs on Python 3.7+).  Unmodified legacy clients (``JobCluster``,
``SharedJobCluster`` via ``dispyscheduler``, ``dispy.recover_jobs``) use it.

Protocol (TCP: 40 bytes of auth, then one framed request per connection;
see dispy_common for framing and records)::

    client                                   node
      UDP PING {version, sign, port, ip_addrs} -->
      <-- TCP PONG {ip_addr, port, sign, name, cpus, auth}   (to the client)
      COMPUTE _Compute --> ACK | Busy | NAK ...
      FILEXFER _XferFile --> ACK (have it) | NAK, <raw bytes> --> ACK | NAK
      SETUP compute_id --> ACK | traceback text
      JOB _DispyJob_ --> ACK | NAK ...
      <-- JOB_REPLY _JobReply  --> ACK          (node connects to client)
      TERMINATE_JOB, CLOSE, RESEND_JOB_RESULTS, PENDING_JOBS,
      RETRIEVE_JOB, JOBS: see the handlers below
      UDP PULSE  <-->  (node: every pulse interval; client echoes)

Threads and processes::

    main thread ........ waits for SIGINT/SIGTERM, then Node.close()
    tcp-server ......... socketserver accept loop; hands sockets to reception
    reception .......... one selector loop: TLS handshake, auth, first frame
                         of every connection (idle peers cost no thread)
    request threads .... one per complete request, at most --max_connections
    udp-listener ....... PING and PULSE datagrams
    timer .............. pulses, zombie detection, retries of stored results
    courier-<addr> ..... one lane per client address: JOB_REPLY delivery,
                         storing what cannot be delivered
    worker-<id> reader . one per computation: results from its worker

    node (threads) --socketpair--> worker process (one per computation,
        single-threaded, started ahead of need, then moved into the
        computation directory): runs the code and setup once, then forks
        one child per job, each in its own process group
    job child --pipe: length + pickled _JobReply--> worker --socketpair-->
        node --TCP JOB_REPLY (same bytes)--> client

The node never forks itself and never unpickles user objects: a job pickles
its own ``_JobReply`` (protocol 4) and the node forwards those bytes.  Data
from unauthenticated peers is decoded by a loader that accepts plain data
only.  Undeliverable results are stored atomically under
``--dest_path_prefix`` and survive restarts of the client and of the node.
"""

import argparse
import collections
import fcntl
import io
import ipaddress
import logging
import os
import pickle
import queue
import re
import resource
import selectors
import shutil
import signal
import socket
import socketserver
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback

import dispy_common as dc
from dispy_common import DispyJob, ProtocolError

__version__ = '1.0.0'

logger = logging.getLogger('dispynode')

# ---------------------------------------------------------------- constants

DEFAULT_NODE_PORT = 51348
DEFAULT_SCHEDULER_PORT = 51347
DEFAULT_MAX_FILE_SIZE = '10m'
DEFAULT_MSG_TIMEOUT = 5.0
DEFAULT_ZOMBIE_MINUTES = 60.0
DEFAULT_PULSE_SECONDS = 600.0
MAX_CONNECTIONS = 64          # concurrent TCP requests; the excess is refused
UDP_MAX = 8192                # longer datagrams are ignored
UNAUTH_FRAME_LIMIT = 65536    # largest request read from an unauthenticated peer
MAX_PENDING = 4096            # connections still sending their request
CHUNK = 1024 * 1024           # file streaming block
TASK_THREADS = 8              # background task pool: threads, queued tasks
TASK_QUEUE = 256
REPLY_PREFIX = '_dispy_job_reply_'
LANE_IDLE_SECONDS = 30.0      # a courier lane's thread ends after this idle time
RETRY_SECONDS = 10.0          # stored results of a live client are retried this often
KILL_GRACE = 0.5              # SIGTERM -> SIGKILL for a cancelled job
CLEANUP_TIMEOUT = 30.0        # for a computation's cleanup function
SETUP_TIMEOUT = 3600.0
INTERNAL_FRAME_LIMIT = 2 ** 32 - 1
_HEX_RE = re.compile(r'^[0-9a-fA-F]{1,64}$')


# ---------------------------------------------------------------- pure helpers

def is_ipv4(text):
    try:
        ipaddress.IPv4Address(text)
    except (ValueError, TypeError):
        return False
    return True


def brief(value):
    """A short, safe rendering of a client-supplied value for logs and
    refusals: its own text for small ints and strings, else its type
    (the repr of a deeply nested object could recurse without end)."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) < 10 ** 30:
        return str(value)
    if isinstance(value, str) and len(value) <= 80:
        return repr(value)
    return '<%s>' % type(value).__name__


def valid_port(value):
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value < 65536


def confined_join(base, relative):
    """Join a client-supplied relative path under ``base``; None if it is
    absolute, has '..' parts, or is otherwise unsafe."""
    if not isinstance(relative, str) or not relative.strip() or '\0' in relative:
        return None
    relative = relative.strip().replace('\\', '/')
    if relative.startswith('/') or re.match(r'^[A-Za-z]:', relative):
        return None
    parts = [p for p in relative.split('/') if p not in ('', '.')]
    if not parts or any(p == '..' for p in parts):
        return None
    return os.path.join(base, *parts)


def safe_basename(name, sep='/'):
    """Base name of a client file name, or None if it is unusable."""
    if not isinstance(name, str):
        return None
    name = name.replace(sep if isinstance(sep, str) and sep else '/', '/')
    base = name.replace('\\', '/').rsplit('/', 1)[-1]
    if base in ('', '.', '..') or '\0' in base or base.startswith(REPLY_PREFIX):
        return None
    return base


def atomic_write(path, data):
    """Write ``data`` to ``path`` so a crash leaves the old or the new file."""
    directory = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(prefix='.tmp-', dir=directory)
    try:
        with os.fdopen(fd, 'wb') as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:  # whatever failed: no temp file left behind, then re-raise
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(directory)


def fsync_dir(directory):
    try:
        dfd = os.open(directory, os.O_RDONLY | getattr(os, 'O_DIRECTORY', 0))
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


def _ioctl_ipv4(ifname, request):
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        packed = struct.pack('256s', ifname.encode()[:15])
        return socket.inet_ntoa(fcntl.ioctl(sock.fileno(), request, packed)[20:24])
    except OSError:
        return None
    finally:
        sock.close()


_SIOCGIFADDR, _SIOCGIFBRDADDR = 0x8915, 0x8919


def interface_addresses():
    """{interface name: IPv4 address} for interfaces that are up."""
    found = {}
    for _, name in socket.if_nameindex():
        addr = _ioctl_ipv4(name, _SIOCGIFADDR)
        if addr:
            found[name] = addr
    return found


def default_route_interface():
    """Name of the interface holding the IPv4 default route, if any."""
    try:
        with open('/proc/net/route') as fh:
            next(fh)
            for line in fh:
                fields = line.split()
                if len(fields) > 2 and fields[1] == '00000000':
                    return fields[0]
    except (OSError, StopIteration):
        pass
    return None


def primary_ipv4():
    """The machine's primary IPv4 address: the one on the default-route
    interface, else the first non-loopback one, else 127.0.0.1.  Unlike
    gethostbyname(gethostname()) this never yields Debian's 127.0.1.1."""
    addrs = interface_addresses()
    iface = default_route_interface()
    if iface and iface in addrs:
        return addrs[iface]
    for addr in addrs.values():
        if not addr.startswith('127.'):
            return addr
    return '127.0.0.1'


def broadcast_address(ip_addr):
    """Directed broadcast address of the interface holding ``ip_addr``."""
    if ip_addr.startswith('127.'):
        return '127.255.255.255'
    for name, addr in interface_addresses().items():
        if addr == ip_addr:
            brd = _ioctl_ipv4(name, _SIOCGIFBRDADDR)
            if brd and brd != '0.0.0.0':
                return brd
    return '<broadcast>'


def descendants(pid):
    """PIDs of all descendants of ``pid`` (psutil if present, else /proc)."""
    try:
        import psutil
        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except ImportError:
        pass
    except Exception:  # psutil.NoSuchProcess and friends
        return []
    children = collections.defaultdict(list)
    for entry in os.listdir('/proc'):
        if not entry.isdigit():
            continue
        try:
            with open('/proc/%s/stat' % entry, 'rb') as fh:
                data = fh.read()
        except OSError:
            continue
        ppid = int(data[data.rfind(b')') + 2:].split()[1])
        children[ppid].append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), ()):
            found.append(child)
            todo.append(child)
    return found


def kill_tree(pid, sig):
    """Signal ``pid``'s process group and every descendant (some may have
    left the group with setsid)."""
    targets = descendants(pid)
    try:
        os.killpg(pid, sig)
    except OSError:
        pass
    for target in [pid] + targets:
        try:
            os.kill(target, sig)
        except OSError:
            pass


# ---------------------------------------------------------------- thread pools, counters, logs

class TaskPool:
    """A named, capped pool of helper threads with a bounded queue.

    Like execnet's ``WorkerPool``: threads start only when no idle one is
    waiting, never more than ``max_threads``; an idle thread ends after
    ``idle_seconds``.  ``submit`` refuses (returns False) when the pool is
    closing, its queue is full, or a task with the same ``key`` is already
    queued or running, so work triggered from outside can be deduplicated
    and can never grow threads or memory without bound.
    """

    def __init__(self, name, max_threads, max_queued, idle_seconds=10.0):
        self.name, self.max_threads, self.max_queued = name, max_threads, max_queued
        self.idle_seconds = idle_seconds
        self.cond = threading.Condition(threading.Lock())
        self.tasks = collections.deque()
        self.keys = set()
        self.threads = set()
        self.idle = 0
        self.closed = False
        self._serial = 0

    def submit(self, func, *args, key=None):
        with self.cond:
            if self.closed or len(self.tasks) >= self.max_queued \
                    or (key is not None and key in self.keys):
                return False
            self.tasks.append((func, args, key))
            if key is not None:
                self.keys.add(key)
            if self.idle > len(self.tasks) - 1 or len(self.threads) >= self.max_threads:
                self.cond.notify()
                return True
            self._serial += 1
            thread = threading.Thread(target=self._run, daemon=True,
                                      name='%s-%d' % (self.name, self._serial))
            self.threads.add(thread)
        thread.start()
        return True

    def _run(self):
        me = threading.current_thread()
        while True:
            with self.cond:
                while not self.tasks and not self.closed:
                    self.idle += 1
                    woken = self.cond.wait(self.idle_seconds)
                    self.idle -= 1
                    if not woken and not self.tasks:
                        break
                if not self.tasks:
                    self.threads.discard(me)
                    return
                func, args, key = self.tasks.popleft()
            try:
                func(*args)
            except Exception:  # a task logs and ends; the pool goes on
                logger.exception('%s: %s failed', self.name, getattr(func, '__name__', func))
            finally:
                if key is not None:
                    with self.cond:
                        self.keys.discard(key)

    def close(self, timeout):
        """Refuse new tasks, let queued ones finish (bounded by ``timeout``)."""
        with self.cond:
            self.closed = True
            self.cond.notify_all()
            threads = list(self.threads)
        deadline = time.monotonic() + timeout
        for thread in threads:
            if thread is not threading.current_thread():
                thread.join(max(0.0, deadline - time.monotonic()))

    def thread_count(self):
        with self.cond:
            return len(self.threads)


class Counters:
    """Monotonic event counters (refusals, drops, bytes, jobs by outcome),
    read by the status query and the metrics endpoint."""

    def __init__(self):
        self.lock = threading.Lock()
        self.values = collections.Counter()

    def add(self, name, amount=1):
        with self.lock:
            self.values[name] += amount

    def snapshot(self):
        with self.lock:
            return dict(self.values)


class LogLimiter:
    """At most one log line per kind of event per ``interval`` seconds; the
    events suppressed meanwhile are summarised in the next line (or by
    ``flush``, which the timer calls), never logged one by one."""

    def __init__(self, interval=60.0):
        self.interval = interval
        self.lock = threading.Lock()
        self.windows = {}        # kind -> [window start, suppressed count]

    def log(self, kind, level, msg, *args):
        now = time.monotonic()
        with self.lock:
            window = self.windows.get(kind)
            if window is not None and now - window[0] < self.interval:
                window[1] += 1
                return
            suppressed = window[1] if window else 0
            self.windows[kind] = [now, 0]
        if suppressed:
            msg += ' (and %d more like this in the last %ds)' % (suppressed, self.interval)
        logger.log(level, msg, *args)

    def flush(self):
        now = time.monotonic()
        with self.lock:
            due = [(kind, w[1]) for kind, w in self.windows.items()
                   if w[1] and now - w[0] >= self.interval]
            for kind, _ in due:
                self.windows[kind] = [now, 0]
        for kind, count in due:
            logger.warning('%s: %d more in the last %ds', kind, count, self.interval)


# ---------------------------------------------------------------- state

class Computation:
    """The node's view of one computation.  Changed only by NodeState
    methods (under its lock) and, before registration, by the handler
    that builds it."""

    def __init__(self, compute, dest_path, sign):
        self.id = compute.id
        self.auth = compute.auth
        self.name = compute.name
        self.type = compute.type
        self.scheduler_ip = compute.scheduler_ip_addr
        self.scheduler_port = compute.scheduler_port
        self.result_port = compute.job_result_port
        self.dest_path = dest_path
        self.keep_files = compute.cleanup is False
        self.has_cleanup = isinstance(compute.cleanup, dc.Function)
        self.pulse_interval = compute.pulse_interval
        self.sign = sign
        self.program = None
        if compute.type == dc.Compute.prog_type:
            self.program = os.path.join(dest_path, safe_basename(compute.name) or 'program')
        self.xfer_names = [safe_basename(xf.name, xf.sep) for xf in compute.xfer_files]
        self.last_pulse = time.monotonic()
        self.zombie = False
        self.timed_out = False     # a zombie because the client fell silent
        self.retiring = False
        self.running = set()       # uids of running jobs
        self.stored = set()        # uids with a stored, undelivered reply
        self.file_uses = collections.Counter()
        self.worker = None

    @property
    def reply_addr(self):
        return (self.scheduler_ip, self.result_port)

    def record(self):
        """Plain data written to the store (never the secret)."""
        return {'id': self.id, 'auth': self.auth, 'name': self.name, 'type': self.type,
                'scheduler_ip': self.scheduler_ip, 'scheduler_port': self.scheduler_port,
                'result_port': self.result_port, 'dest_path': self.dest_path,
                'keep_files': self.keep_files, 'sign': self.sign}

    @classmethod
    def from_record(cls, rec):
        comp = cls.__new__(cls)
        comp.__init__(dc.Compute(id=rec['id'], auth=rec['auth'], name=rec['name'],
                                 type=rec['type'], scheduler_ip_addr=rec['scheduler_ip'],
                                 scheduler_port=rec['scheduler_port'],
                                 job_result_port=rec['result_port'],
                                 cleanup=not rec['keep_files'], xfer_files=[]),
                      rec['dest_path'], rec['sign'])
        comp.zombie = comp.retiring = True
        return comp


class JobEntry:
    __slots__ = ('uid', 'hash', 'compute_id', 'files', 'start', 'unacknowledged')

    def __init__(self, uid, job_hash, compute_id, files):
        self.uid, self.hash, self.compute_id, self.files = uid, job_hash, compute_id, files
        self.start = time.time()
        # The client never got our ACK: it will run the job elsewhere, and
        # a reply from here would only be stored for nobody.
        self.unacknowledged = False


class NodeState:
    """All mutable node state, guarded by one lock.  No I/O happens while
    the lock is held; methods return what the caller must then do."""

    def __init__(self, cpus):
        self.lock = threading.Lock()
        self.cpus = cpus
        self.avail_cpus = cpus
        self.scheduler = None        # (ip, port) of the one client served
        self.active = {}             # compute id -> Computation
        self.detached = {}           # closed or restored, with stored results
        self.jobs = {}               # uid -> JobEntry

    def is_free(self):
        with self.lock:
            return self.scheduler is None and self.avail_cpus == self.cpus

    def busy_cpus(self):
        with self.lock:
            return self.cpus - self.avail_cpus

    def claim(self, comp):
        """Register a new computation; returns None or a refusal."""
        with self.lock:
            if self.scheduler not in (None, (comp.scheduler_ip, comp.scheduler_port)):
                return b'Busy'
            if comp.id in self.active:
                return b'NAK (computation %s already exists)' % str(comp.id).encode()
            self.scheduler = (comp.scheduler_ip, comp.scheduler_port)
            self.active[comp.id] = comp
            return None

    def unclaim(self, comp):
        with self.lock:
            if self.active.get(comp.id) is comp:
                del self.active[comp.id]
            if not self.active:
                self.scheduler = None

    def find(self, compute_id, auth=None, include_detached=False):
        if not isinstance(compute_id, int):
            return None
        with self.lock:
            comp = self.active.get(compute_id)
            if comp is None and include_detached:
                comp = self.detached.get(compute_id)
        if comp is not None and auth is not None and comp.auth != auth:
            return None
        return comp

    def start_job(self, comp, entry):
        with self.lock:
            if self.avail_cpus <= 0:
                return b'NAK (all cpus busy)'
            if self.active.get(comp.id) is not comp or comp.zombie:
                return b'NAK (invalid computation %s)' % str(comp.id).encode()
            if entry.uid in self.jobs:
                return b'NAK (duplicate job %s)' % str(entry.uid).encode()
            self.avail_cpus -= 1
            self.jobs[entry.uid] = entry
            comp.running.add(entry.uid)
            for name in entry.files:
                comp.file_uses[name] += 1
            return None

    def finish_job(self, uid):
        """Free the job's CPU.  Returns (entry, comp, files to delete)."""
        with self.lock:
            entry = self.jobs.pop(uid, None)
            if entry is None:
                return None, None, []
            self.avail_cpus += 1
            comp = self.active.get(entry.compute_id) or self.detached.get(entry.compute_id)
            unused = []
            if comp is not None:
                comp.running.discard(uid)
                for name in entry.files:
                    comp.file_uses[name] -= 1
                    if comp.file_uses[name] <= 0 and name not in comp.xfer_names:
                        del comp.file_uses[name]
                        unused.append(name)
                if comp.keep_files:
                    unused = []
            return entry, comp, unused

    def jobs_of(self, compute_id):
        with self.lock:
            return [e for e in self.jobs.values() if e.compute_id == compute_id]

    def touch(self, scheduler_ip, port=None):
        """Refresh the active computations of the client at
        ``scheduler_ip`` (matched by address alone, as the original does);
        returns them, plus the detached ones of that exact client when its
        ``port`` is known."""
        now = time.monotonic()
        with self.lock:
            comps = [c for c in self.active.values() if c.scheduler_ip == scheduler_ip]
            for comp in comps:
                comp.last_pulse = now
            if port is not None:
                comps += [c for c in self.detached.values()
                          if (c.scheduler_ip, c.scheduler_port) == (scheduler_ip, port)]
            return comps

    def mark_zombie(self, comp):
        with self.lock:
            comp.zombie = True

    def begin_retire(self, comp):
        """True once, when ``comp`` is a zombie with no running job."""
        with self.lock:
            if comp.retiring or not comp.zombie or comp.running:
                return False
            comp.retiring = True
            return True

    def detach(self, comp, keep):
        """Drop ``comp`` from the active set (keeping it for its stored
        results if ``keep``).  Returns True if the node became free."""
        with self.lock:
            if self.active.get(comp.id) is comp:
                del self.active[comp.id]
            if keep:
                self.detached[comp.id] = comp
            else:
                self.detached.pop(comp.id, None)
            was_busy = self.scheduler is not None
            if not self.active:
                self.scheduler = None
            return was_busy and self.scheduler is None

    def add_stored(self, comp, uid):
        """Note a stored reply; a computation already retired stays
        reachable for recovery as a detached one."""
        with self.lock:
            comp.stored.add(uid)
            if self.active.get(comp.id) is not comp:
                self.detached[comp.id] = comp

    def is_detached(self, comp):
        with self.lock:
            return self.detached.get(comp.id) is comp

    def drop_stored(self, comp, uid):
        """Forget a delivered result.  True if ``comp`` is now finished
        with: detached and holding nothing more."""
        with self.lock:
            comp.stored.discard(uid)
            return (not comp.stored and self.detached.get(comp.id) is comp)

    def zombies(self, interval):
        now = time.monotonic()
        with self.lock:
            found = [c for c in self.active.values()
                     if not c.zombie and now - c.last_pulse > interval]
            for comp in found:
                comp.zombie = comp.timed_out = True
            return found

    def snapshot(self):
        with self.lock:
            return list(self.active.values()), list(self.detached.values())


# ---------------------------------------------------------------- result store

class ResultStore:
    """Computation records and undelivered replies on disk.

    ``<prefix>/<compute_id>_<auth>``: a computation's record (plain data).
    ``<dest_path>/_dispy_job_reply_<uid>``: ``{'uid','hash','reply'}`` where
    ``reply`` is the job's pickled ``_JobReply``, forwarded as is.
    Every write is atomic; unreadable files are moved aside, not fatal.
    """

    def __init__(self, prefix):
        self.prefix = prefix

    def record_path(self, compute_id, auth):
        if not isinstance(compute_id, int) or not isinstance(auth, str) \
                or not _HEX_RE.match(auth):
            return None
        return os.path.join(self.prefix, '%d_%s' % (compute_id, auth))

    def save_computation(self, comp):
        atomic_write(self.record_path(comp.id, comp.auth), dc.dumps_plain(comp.record()))

    def remove_computation(self, comp):
        path = self.record_path(comp.id, comp.auth)
        try:
            os.unlink(path)
            fsync_dir(self.prefix)
        except OSError:
            pass

    def reply_path(self, comp, uid):
        return os.path.join(comp.dest_path, '%s%d' % (REPLY_PREFIX, uid))

    def save_reply(self, comp, uid, job_hash, reply):
        os.makedirs(comp.dest_path, exist_ok=True)
        atomic_write(self.reply_path(comp, uid),
                     dc.dumps_plain({'uid': uid, 'hash': job_hash, 'reply': reply}))

    def load_reply(self, comp, uid):
        path = self.reply_path(comp, uid)
        try:
            with open(path, 'rb') as fh:
                rec = dc.loads_plain(fh.read())
            if not isinstance(rec, dict) or rec.get('uid') != uid \
                    or not isinstance(rec.get('reply'), bytes):
                raise ProtocolError('malformed reply record')
            return rec
        except FileNotFoundError:
            return None
        except (OSError, ProtocolError) as exc:
            self.quarantine(path, exc)
            return None

    def remove_reply(self, comp, uid):
        try:
            os.unlink(self.reply_path(comp, uid))
        except FileNotFoundError:
            pass

    def stored_uids(self, comp):
        try:
            names = os.listdir(comp.dest_path)
        except OSError:
            return set()
        return {int(n[len(REPLY_PREFIX):]) for n in names
                if n.startswith(REPLY_PREFIX) and n[len(REPLY_PREFIX):].isdigit()}

    def quarantine(self, path, why):
        aside = '%s.corrupt-%d' % (path, int(time.time()))
        logger.warning('moving unreadable store file %s aside to %s (%s)', path, aside, why)
        try:
            os.replace(path, aside)
        except OSError as exc:
            logger.warning('could not move %s aside: %s', path, exc)

    def restore(self):
        """Computation records left by an earlier run, as Computations."""
        found = []
        for name in sorted(os.listdir(self.prefix)):
            path = os.path.join(self.prefix, name)
            if name.startswith('.tmp-'):
                os.unlink(path)     # a write that a crash interrupted
                continue
            if not re.match(r'^\d+_[0-9a-fA-F]+$', name) or not os.path.isfile(path):
                continue
            try:
                with open(path, 'rb') as fh:
                    comp = Computation.from_record(dc.loads_plain(fh.read()))
                if not comp.dest_path.startswith(self.prefix + os.sep):
                    raise ProtocolError('record points outside the prefix')
            except (OSError, ProtocolError, KeyError, TypeError, AttributeError) as exc:
                self.quarantine(path, exc)
                continue
            for stray in _stray_temp_files(comp.dest_path):
                os.unlink(stray)
            comp.stored = self.stored_uids(comp)
            found.append(comp)
        return found


def _stray_temp_files(directory):
    try:
        return [os.path.join(directory, n) for n in os.listdir(directory)
                if n.startswith('.tmp-')]
    except OSError:
        return []


# ---------------------------------------------------------------- file streaming
# Bulk bytes between a socket and a file, with no per-block Python work
# beyond the system calls: splice() socket -> pipe -> file on Linux (the
# kernel moves the pages; no copy into Python); file -> socket and TLS
# sockets (OpenSSL holds the decrypted data, so no splice) use one reused
# buffer (readinto / recv_into).

import errno as _errno     # noqa: E402 (both already loaded by the imports above)
import select as _select   # noqa: E402

_SPLICE = getattr(os, 'splice', None) if sys.platform.startswith('linux') else None
# splice() refusing this socket or file (not an I/O error): copy instead
_NO_SPLICE = {_errno.EINVAL, _errno.ENOSYS, _errno.EOPNOTSUPP, _errno.ESPIPE}
_F_SETPIPE_SZ = 1031            # fcntl.F_SETPIPE_SZ (named in Python >= 3.10 only)


def _is_tls(sock):
    ssl = sys.modules.get('ssl')    # not loaded: no TLS socket either
    return ssl is not None and isinstance(sock, ssl.SSLSocket)


def _write_all(fd, view):
    while view:
        view = view[os.write(fd, view):]


def recv_to_file(sock, fd, size, timeout):
    """Copy exactly ``size`` bytes from ``sock`` to the file ``fd``; a wait
    longer than ``timeout`` for the next bytes ends the transfer.  Returns
    (bytes copied, the error that ended it early or None); a closed stream
    ends it without an error."""
    if size <= 0:
        return 0, None
    sock.settimeout(timeout)
    got = 0
    if _SPLICE is not None and not _is_tls(sock):
        got, err, fallback = _splice_to_file(sock, fd, size, timeout)
        if not fallback:
            return got, err
    return _copy_to_file(sock, fd, size, timeout, got)


def _copy_to_file(sock, fd, size, timeout, got):
    buf = bytearray(min(CHUNK, max(size - got, 1)))
    view = memoryview(buf)
    try:
        while got < size:
            n = sock.recv_into(view[:min(len(buf), size - got)])
            if not n:
                break
            _write_all(fd, view[:n])
            got += n
    except OSError as exc:
        return got, exc
    return got, None


def _splice_to_file(sock, fd, size, timeout):
    """(copied, error, fallback): fallback when splice can't serve this
    socket or file; the bytes already copied stay copied."""
    got = 0
    pr, pw = os.pipe()
    try:
        try:
            fcntl.fcntl(pw, _F_SETPIPE_SZ, CHUNK)
        except OSError:
            pass    # the default 64 kB pipe works, in smaller steps
        sfd = sock.fileno()
        poller = _select.poll()
        poller.register(sfd, _select.POLLIN)
        nonblock = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
        while got < size:
            try:
                n = _SPLICE(sfd, pw, min(CHUNK, size - got), flags=nonblock)
            except BlockingIOError:
                if not poller.poll(None if timeout is None else timeout * 1000.0):
                    return got, socket.timeout('timed out'), False
                continue
            except OSError as exc:
                if got == 0 and exc.errno in _NO_SPLICE:
                    return 0, None, True
                return got, exc, False
            if not n:
                return got, None, False     # the peer closed early
            left = n
            while left:
                try:
                    left -= _SPLICE(pr, fd, left, flags=os.SPLICE_F_MOVE)
                except OSError as exc:
                    if exc.errno not in _NO_SPLICE:
                        return got + n - left, exc, False
                    # a file system without splice: empty the pipe by hand
                    while left:
                        block = os.read(pr, left)
                        _write_all(fd, memoryview(block))
                        left -= len(block)
                    return got + n, None, True
            got += n
        return got, None, False
    finally:
        os.close(pr)
        os.close(pw)


def send_from_file(sock, fh, size):
    """Send the first ``size`` bytes of the open file ``fh`` over ``sock``
    (timeouts as set on it).  Returns the count sent; a shorter file sends
    less.  Raises OSError.

    Not sendfile(): it halves the sender's CPU, but the legacy client then
    received about 25% slower (bench/run.py, A/B of 15 transfers each), and
    the user waits for the client."""
    buf = bytearray(min(CHUNK, max(size, 1)))
    view = memoryview(buf)
    sent = 0
    while sent < size:
        n = fh.readinto(view[:min(len(buf), size - sent)])
        if not n:
            break
        sock.sendall(view[:n])
        sent += n
    return sent


# ---------------------------------------------------------------- workers
# Everything in this section runs in worker processes and their job
# children, never in the node process.

class _JobContext:
    """What dispy_provisional_result / dispy_send_file need in a job."""
    reply = None
    reply_addr = None
    certfile = None
    compute_id = None
    msg_timeout = DEFAULT_MSG_TIMEOUT
    max_file_size = 0


_JOB = _JobContext()


def _job_connect(timeout):
    ctx = dc.client_tls_context(_JOB.certfile) if _JOB.certfile else None
    return dc.connect(_JOB.reply_addr, timeout, ctx)


def dispy_provisional_result(result, timeout=None):
    """Send ``result`` to the client as a provisional result of this job.
    Returns 0 when the client acknowledged it, -1 otherwise."""
    reply = _JOB.reply
    saved = (reply.status, reply.result, reply.end_time)
    reply.status, reply.result, reply.end_time = \
        DispyJob.ProvisionalResult, result, time.time()
    try:
        data = b'JOB_REPLY:' + dc.dumps(reply)
        with _job_connect(timeout or _JOB.msg_timeout) as sock:
            dc.send_msg(sock, data)
            return 0 if dc.recv_msg(sock, 1024) == b'ACK' else -1
    except (OSError, ProtocolError, pickle.PicklingError):
        return -1
    finally:
        reply.status, reply.result, reply.end_time = saved


def dispy_send_file(path, timeout=None):
    """Send the file at ``path`` to the client, which saves it under the same
    relative path.  Returns 0 on success, -1 when the file is too large or
    the transfer failed."""
    try:
        path = os.path.expanduser(path)
        stat_buf = os.stat(path)
    except (OSError, TypeError):
        return -1
    if _JOB.max_file_size and stat_buf.st_size > _JOB.max_file_size:
        return -1
    name = os.path.splitdrive(path)[1].lstrip(os.sep)
    xf = dc.XferFile(name=name, stat_buf=stat_buf, compute_id=_JOB.compute_id, sep=os.sep)
    try:
        with _job_connect(timeout or _JOB.msg_timeout) as sock, open(path, 'rb') as fh:
            dc.send_msg(sock, b'FILEXFER:' + dc.dumps(xf))
            dc.send_msg(sock, dc.dumps(_JOB.reply))
            if dc.recv_msg(sock, 1024) != b'ACK':
                return -1
            sent = send_from_file(sock, fh, stat_buf.st_size)
            if sent != stat_buf.st_size:
                return -1
            return 0 if dc.recv_msg(sock, 1024) == b'ACK' else -1
    except (OSError, ProtocolError):
        return -1


_REPLY_LEN = struct.Struct('>Q')   # job process -> worker: length, then the reply


class _WorkerJob:
    __slots__ = ('uid', 'hash', 'pid', 'fd', 'chunks', 'got', 'size', 'replied', 'start',
                 'kill_at', 'terminated')

    def __init__(self, uid, job_hash, pid, fd, start):
        self.uid, self.hash, self.pid, self.fd, self.start = uid, job_hash, pid, fd, start
        self.chunks = []
        self.got = 0
        self.size = None         # header + reply, once the header is in
        self.replied = False
        self.kill_at = None
        self.terminated = False


class Worker:
    """The single-threaded per-computation process.

    It owns the computation's namespace: the code is compiled and run once,
    setup runs once, and each job is a fork of this process, so jobs see
    setup's globals (and objects such as a shared multiprocessing Value),
    while their own changes die with them.
    """

    def __init__(self, chan):
        self.chan = chan
        self.sel = selectors.DefaultSelector()
        # pid -> _WorkerJob.  Not by uid: the legacy client's uids are id()s of
        # its job objects, reused as soon as a result is in, while the job's
        # process may still be exiting.
        self.jobs = {}
        self.cfg = None
        self.ns = None
        self.compute = None     # the fully loaded _Compute, for setup/cleanup
        self.running = True
        self.orphaned = False   # the node's end of the channel is gone

    # -- plumbing
    def send(self, msg):
        if self.orphaned:
            return      # the node is gone: nobody to tell
        try:
            dc.send_msg(self.chan, dc.dumps_plain(msg))
        except OSError:
            self._orphan()

    def _orphan(self):
        """The node died: end every job, then exit."""
        self.orphaned = True
        self.running = False
        for job in self.jobs.values():
            kill_tree(job.pid, signal.SIGKILL)

    def serve(self):
        try:
            tag, self.cfg = dc.loads_plain(dc.recv_msg(self.chan, INTERNAL_FRAME_LIMIT))
        except (ProtocolError, OSError):
            return      # a spare worker the node no longer needs
        _JOB.reply_addr = tuple(self.cfg['reply_addr'])
        _JOB.certfile = self.cfg['certfile']
        _JOB.compute_id = self.cfg['compute_id']
        _JOB.msg_timeout = self.cfg['msg_timeout']
        _JOB.max_file_size = self.cfg['max_file_size']
        # A single-threaded process: changing directory is safe here.
        os.chdir(self.cfg['cwd'])
        sys.path.insert(0, self.cfg['cwd'])
        self.sel.register(self.chan, selectors.EVENT_READ, None)
        while self.running or self.jobs:
            timeout = self._next_deadline()
            for key, _ in self.sel.select(timeout):
                if key.data is None:
                    self._read_command()
                else:
                    self._read_result(key.data)
            self._enforce_kills()
        self.sel.close()

    def _next_deadline(self):
        deadlines = [j.kill_at for j in self.jobs.values() if j.kill_at]
        return max(0.0, min(deadlines) - time.monotonic()) if deadlines else None

    def _read_command(self):
        try:
            msg = dc.loads_plain(dc.recv_msg(self.chan, INTERNAL_FRAME_LIMIT))
        except (ProtocolError, OSError):
            self.sel.unregister(self.chan)
            self._orphan()
            return
        getattr(self, '_cmd_' + msg[0])(*msg[1:])

    # -- commands from the node
    def _load_namespace(self):
        if self.ns is not None:
            return
        import types
        module = types.ModuleType('__main__')
        self.ns = module.__dict__
        self.ns['dispy_provisional_result'] = dispy_provisional_result
        self.ns['dispy_send_file'] = dispy_send_file
        self.ns['DispyJob'] = DispyJob
        # Classes sent as dependencies pickle as __main__.<name> on both ends.
        sys.modules['__main__'] = module
        if self.cfg['code']:
            exec(compile(self.cfg['code'], '<dispy computation>', 'exec'), self.ns)
        self.compute = dc.loads_full(self.cfg['compute_bytes'], self.ns)

    def _cmd_setup(self):
        try:
            self._load_namespace()
            func = self.compute.setup
            result = self.ns[func.name](*(func.args or ()), **(func.kwargs or {}))
            if result != 0:
                raise RuntimeError('setup function %s returned %r, not 0' % (func.name, result))
        except BaseException:  # user code may raise anything, even SystemExit
            self.send(('setup', False, traceback.format_exc()))
        else:
            self.send(('setup', True, ''))

    def _cmd_job(self, uid, job_hash, args, kwargs, code):
        try:
            self._load_namespace()
        except BaseException:  # user code may raise anything
            self._finish(uid, job_hash, time.time(), None, traceback.format_exc())
            return
        rfd, wfd = os.pipe()
        start = time.time()
        pid = os.fork()
        if pid == 0:
            os.close(rfd)
            self._job_child(uid, job_hash, args, kwargs, code, wfd, start)
        os.close(wfd)
        try:
            os.setpgid(pid, pid)
        except OSError:
            pass
        job = _WorkerJob(uid, job_hash, pid, rfd, start)
        self.jobs[pid] = job
        self.sel.register(rfd, selectors.EVENT_READ, job)

    def _cmd_terminate(self, uid):
        job = next((j for j in self.jobs.values() if j.uid == uid and not j.replied), None)
        if job is None or job.terminated:
            return
        job.terminated = True
        job.kill_at = time.monotonic() + KILL_GRACE
        kill_tree(job.pid, signal.SIGTERM)

    def _cmd_close(self, run_cleanup):
        text = ''
        # Load the computation (user objects) only when there is a cleanup to run.
        if run_cleanup and self.cfg['has_cleanup']:
            try:
                self._load_namespace()      # cleanup runs even if no job ran here
                cleanup = self.compute.cleanup
                if isinstance(cleanup, dc.Function):
                    self.ns[cleanup.name](*(cleanup.args or ()), **(cleanup.kwargs or {}))
            except BaseException:  # user code may raise anything
                text = traceback.format_exc()
        self.send(('closed', text))
        self.running = False
        self.sel.unregister(self.chan)

    # -- job processes
    def _job_child(self, uid, job_hash, args, kwargs, code, wfd, start):
        """Runs in the forked child; never returns."""
        status = 1
        try:
            os.setpgid(0, 0)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            self.sel.close()
            self.chan.close()
            data = self._run_job(uid, job_hash, args, kwargs, code, start)
            # Length first, so the worker can forward the reply without
            # waiting for this process to finish exiting.
            view = memoryview(_REPLY_LEN.pack(len(data)) + data)
            while view:
                view = view[os.write(wfd, view):]
            status = 0
        except BaseException:  # the child must reach os._exit whatever happens
            pass
        finally:
            os._exit(status)

    def _run_job(self, uid, job_hash, args, kwargs, code, start):
        reply = dc.JobReply(uid=uid, hash=job_hash, ip_addr=self.cfg['ip_addr'],
                            status=DispyJob.Running, start_time=start)
        _JOB.reply = reply
        is_prog = self.cfg['type'] == dc.Compute.prog_type
        out, err = io.StringIO(), io.StringIO()
        if not is_prog:
            sys.stdout, sys.stderr = out, err
        try:
            if code:
                exec(compile(code, '<dispy job depends>', 'exec'), self.ns)
            args = dc.loads_full(args, self.ns) if args else ()
            kwargs = dc.loads_full(kwargs, self.ns) if kwargs else {}
            if is_prog:
                reply.result, reply.stdout, reply.stderr = self._run_program(args)
            else:
                reply.result = self.ns[self.cfg['name']](*args, **kwargs)
            reply.status = DispyJob.Finished
        except BaseException:  # user code may raise anything
            reply.status = DispyJob.Terminated
            reply.exception = traceback.format_exc()
        if not is_prog:
            sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
            reply.stdout, reply.stderr = out.getvalue(), err.getvalue()
        reply.end_time = time.time()
        try:
            return dc.dumps(reply)
        except Exception:  # an unpicklable result must still produce a reply
            reply.result = None
            reply.status = DispyJob.Terminated
            reply.exception = 'result could not be pickled:\n' + traceback.format_exc()
            return dc.dumps(reply)

    def _run_program(self, args):
        program = self.cfg['program']
        cmd = [program] + [str(a) for a in args]
        if program.endswith('.py'):
            cmd.insert(0, sys.executable)
        elif not os.access(program, os.X_OK) and os.path.isfile(program):
            raise PermissionError('program %r is not executable' % program)
        env = dict(os.environ)
        env['PATH'] = os.getcwd() + os.pathsep + env.get('PATH', '')
        try:
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  cwd=os.getcwd(), env=env)
        except FileNotFoundError:
            raise FileNotFoundError('program %r was not found on the node' % program)
        return proc.returncode, proc.stdout, proc.stderr

    def _read_result(self, job):
        block = os.read(job.fd, CHUNK)
        if block:
            job.chunks.append(block)
            job.got += len(block)
            if job.size is None and job.got >= _REPLY_LEN.size:
                head = b''.join(job.chunks)
                job.chunks = [head]
                job.size = _REPLY_LEN.size + _REPLY_LEN.unpack_from(head)[0]
            if job.size is not None and job.got == job.size and not job.replied:
                job.replied = True
                self.send(('done', job.uid, b''.join(job.chunks)[_REPLY_LEN.size:]))
                job.chunks = []
            return
        self.sel.unregister(job.fd)
        os.close(job.fd)
        _, status = os.waitpid(job.pid, 0)
        del self.jobs[job.pid]
        if job.terminated:
            kill_tree(job.pid, signal.SIGKILL)  # whatever of its group survived SIGTERM
        if job.replied:
            return
        if job.terminated:
            why = 'job terminated on request'
        elif os.WIFSIGNALED(status):
            why = 'job process was killed by signal %d' % os.WTERMSIG(status)
        else:
            why = 'job process exited with status %d without a result' % (status >> 8)
        self._finish(job.uid, job.hash, job.start, None, why)

    def _finish(self, uid, job_hash, start, result, exception):
        reply = dc.JobReply(uid=uid, hash=job_hash, ip_addr=self.cfg['ip_addr'],
                            status=DispyJob.Terminated, result=result,
                            exception=exception, start_time=start, end_time=time.time())
        self.send(('done', uid, dc.dumps(reply)))

    def _enforce_kills(self):
        now = time.monotonic()
        for job in self.jobs.values():
            if job.kill_at and now >= job.kill_at:
                kill_tree(job.pid, signal.SIGKILL)
                job.kill_at = None


def worker_main(fd):
    """Entry point of a worker process (see WorkerHandle for how it starts)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the node decides when we stop
    chan = socket.socket(fileno=fd)
    try:
        Worker(chan).serve()
    finally:
        chan.close()
    os._exit(0)


# ---------------------------------------------------------------- worker handle

class WorkerHandle:
    """The node's end of one worker process.  Workers are started ahead of
    need (Node keeps a spare), because a fresh interpreter takes tens of
    milliseconds to start; ``attach`` gives one its computation."""

    def __init__(self, node):
        self.node = node
        self.comp = None
        self.replies = queue.Queue()        # setup/closed answers
        self.send_lock = threading.Lock()
        self.alive = True
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.chan = ours
        # Import the module (from its cached bytecode) rather than run the
        # file as a script, which would compile it anew in every worker.
        here = os.path.dirname(os.path.abspath(__file__))
        cmd = [sys.executable, '-c', 'import sys; sys.path.insert(0, %r); '
               'import dispynode; dispynode.worker_main(%d)' % (here, theirs.fileno())]
        try:
            self.proc = subprocess.Popen(cmd, cwd=node.config.dest_path_prefix,
                                         pass_fds=(theirs.fileno(),),
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        except OSError:
            ours.close()
            raise
        finally:
            theirs.close()

    def usable(self):
        return self.proc.poll() is None

    def attach(self, comp, compute_bytes, code):
        """Give this worker its computation (it moves into comp.dest_path)."""
        self.comp = comp
        cfg = self.node.config
        self.send(('init', {
            'compute_id': comp.id, 'name': comp.name, 'type': comp.type, 'code': code,
            'program': comp.program, 'compute_bytes': compute_bytes,
            'has_cleanup': comp.has_cleanup, 'cwd': comp.dest_path,
            'ip_addr': cfg.ext_ip_addr, 'reply_addr': list(comp.reply_addr),
            'certfile': cfg.certfile, 'msg_timeout': cfg.msg_timeout,
            'max_file_size': cfg.max_file_size}))
        self.reader = threading.Thread(target=self._read_loop, daemon=True,
                                       name='worker-%s' % comp.id)
        self.reader.start()

    def send(self, msg):
        data = dc.dumps_plain(msg)
        with self.send_lock:
            dc.send_msg(self.chan, data)

    def request(self, msg, timeout):
        """Send ``msg`` and wait for the worker's answer (or None)."""
        try:
            self.send(msg)
            return self.replies.get(timeout=timeout)
        except (OSError, queue.Empty):
            return None

    def _read_loop(self):
        while True:
            try:
                msg = dc.loads_plain(dc.recv_msg(self.chan, INTERNAL_FRAME_LIMIT))
            except (ProtocolError, OSError):
                break
            try:
                if msg[0] == 'done':
                    self.node.job_done(self.comp, msg[1], msg[2])
                elif msg[0] in ('setup', 'closed'):
                    self.replies.put(msg)
            except Exception:  # keep reading whatever one result did
                logger.exception('handling %r from the worker of %s failed', msg[0], self.comp.id)
        self.alive = False
        self.replies.put(None)
        self.node.worker_lost(self.comp)

    def stop(self, timeout=5.0):
        """Ask the worker to exit (its jobs die with it); kill it if needed."""
        try:
            self.chan.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            kill_tree(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.chan.close()


# ---------------------------------------------------------------- courier

class Delivery:
    __slots__ = ('comp', 'uid', 'hash', 'reply', 'resend')

    def __init__(self, comp, uid, job_hash, reply, resend):
        self.comp, self.uid, self.hash, self.reply, self.resend = \
            comp, uid, job_hash, reply, resend


class Courier:
    """Sends JOB_REPLY frames to clients.  Each reply address has its own
    lane (a queue and a thread that ends when idle), so replies to one
    client stay in order and a client that stalls delays only itself.  A
    reply that cannot be delivered is stored."""

    def __init__(self, node):
        self.node = node
        self.lock = threading.Lock()
        self.lanes = {}              # reply address -> (queue, thread)
        self.down = {}               # reply address -> when it last failed
        self.in_flight = set()       # (compute id, uid)
        self.closing = False

    def submit(self, delivery):
        key = (delivery.comp.id, delivery.uid)
        addr = delivery.comp.reply_addr
        with self.lock:
            closing = self.closing
            if key in self.in_flight or closing:
                lane = None
            else:
                self.in_flight.add(key)
                lane = self.lanes.get(addr)
                if lane is None:
                    lane = (queue.Queue(), threading.Thread(
                        target=self._lane, args=(addr,), daemon=True,
                        name='courier-%s:%s' % addr))
                    self.lanes[addr] = lane
                    lane[1].start()
                lane[0].put(delivery)   # under the lock: the lane cannot retire meanwhile
        if closing and not delivery.resend:
            self.node.reply_undelivered(delivery)

    def revive(self, addr):
        with self.lock:
            self.down.pop(addr, None)

    def _lane(self, addr):
        lane = self.lanes[addr][0]
        while True:
            try:
                item = lane.get(timeout=LANE_IDLE_SECONDS)
            except queue.Empty:
                with self.lock:
                    if lane.empty():
                        del self.lanes[addr]
                        return
                continue
            if item is None:
                return
            try:
                self._deliver(item)
            except Exception:  # one bad delivery must not stop the lane
                logger.exception('delivering the reply of job %s failed', item.uid)
            finally:
                with self.lock:
                    self.in_flight.discard((item.comp.id, item.uid))

    def drain(self, timeout):
        """Finish the queued deliveries (bounded by ``timeout``); later
        replies go straight to the store."""
        with self.lock:
            self.closing = True
            lanes = list(self.lanes.values())
        deadline = time.monotonic() + timeout
        for lane, thread in lanes:
            lane.put(None)
        for lane, thread in lanes:
            thread.join(max(0.0, deadline - time.monotonic()))

    def _deliver(self, item):
        addr = item.comp.reply_addr
        with self.lock:
            failed = self.down.get(addr)
            # Right after a failure, new replies go straight to the store
            # rather than each waiting out a timeout; retries resume later.
            skip = (not item.resend and failed is not None
                    and time.monotonic() - failed < RETRY_SECONDS)
        ok = False if skip else self._send(addr, item.reply)
        if ok:
            self.node.reply_delivered(item)
            return
        if not skip:
            with self.lock:
                self.down[addr] = time.monotonic()
            logger.warning('could not deliver the reply of job %s to %s:%s%s', item.uid,
                           addr[0], addr[1], '' if item.resend else '; storing it')
        if not item.resend:
            self.node.reply_undelivered(item)

    def _send(self, addr, reply):
        cfg = self.node.config
        try:
            with dc.connect(addr, cfg.msg_timeout, self.node.tls_client) as sock:
                sock.settimeout(cfg.msg_timeout)
                dc.send_msg(sock, b'JOB_REPLY:' + reply)
                return dc.recv_msg(sock, 1024) == b'ACK'
        except (OSError, ProtocolError) as exc:
            logger.debug('sending to %s:%s failed: %s', addr[0], addr[1], exc)
            return False


# ---------------------------------------------------------------- TCP handlers

HANDLERS = {}


def handles(tag, recovery=False):
    """Register a RequestHandler method for ``tag``.  ``recovery`` handlers
    also accept the auth of an earlier run of this node (see Node)."""
    def register(func):
        HANDLERS[tag] = (func, recovery)
        return func
    return register


class RequestHandler(socketserver.BaseRequestHandler):
    """One TCP request, whose auth prefix and frame the Reception has
    already read: dispatch by tag to a ``_handle_<message>`` method."""

    def setup(self):
        self.node = self.server.node
        self.cfg = self.node.config
        self.peer = self.client_address[0]

    def handle(self):
        self.sock = self.request.sock
        self.sock.settimeout(self.cfg.msg_timeout)
        auth, msg = self.request.auth, self.request.msg
        tag, payload = dc.split_tag(msg)
        self.payload = payload
        handler, recovery = HANDLERS.get(tag, (None, False))
        if handler is None:
            logger.warning('refusing unknown request %r from %s', msg[:16], self.peer)
            self.reply(b'NAK (invalid command: %s)' % msg[:16])
            return
        if tag != b'PING':
            if not self.node.auth_ok(auth, recovery):
                logger.warning('ignoring %s from %s: invalid authentication',
                               tag.decode(), self.peer)
                return
            # RESEND_JOB_RESULTS counts stored results before resending them.
            self.node.sign_of_life(self.peer, resend=(tag != b'RESEND_JOB_RESULTS'))
        try:
            # PING may come from anyone, so it gets the plain-data loader.
            body = dc.loads_plain(payload) if tag == b'PING' else dc.loads_records(payload)
        except ProtocolError as exc:
            logger.debug('undecodable %s from %s: %s', tag.decode(), self.peer, exc)
            self.reply(b'NAK (invalid request)')
            return
        try:
            handler(self, body)
        except (OSError, ProtocolError) as exc:
            logger.debug('%s from %s ended early: %s', tag.decode(), self.peer, exc)

    def reply(self, data):
        try:
            dc.send_msg(self.sock, data)
            return True
        except OSError:
            return False

    # -- discovery
    @handles(b'PING')
    def _handle_ping(self, info):
        pong = self.node.pong_for(info, self.peer)
        if pong is None:
            return
        self.reply(dc.dumps_plain(pong))
        self.node.spawn(self.node.send_pongs, info, self.peer)

    # -- computation lifecycle
    @handles(b'COMPUTE')
    def _handle_compute(self, compute):
        refusal = self.node.validate_compute(compute)
        if refusal:
            logger.warning('refusing computation from %s: %s', self.peer, refusal.decode())
            self.reply(refusal)
            return
        comp, refusal = self.node.add_computation(compute, self.payload)
        if refusal:
            self.reply(refusal)
            return
        if not self.reply(b'ACK'):
            self.node.drop_computation(comp)

    @handles(b'FILEXFER')
    def _handle_filexfer(self, xf):
        comp, target, refusal = self.node.file_target(xf, self.peer)
        if refusal:
            self.reply(refusal)
            return
        if self.node.have_file(target, xf.stat_buf):
            self.reply(b'ACK')
            return
        self.reply(b'NAK')
        self.reply(self.node.receive_file(self.sock, comp, target, xf))

    @handles(b'SETUP')
    def _handle_setup(self, compute_id):
        comp = self.node.state.find(compute_id)
        if comp is None or comp.scheduler_ip != self.peer or comp.worker is None:
            self.reply(b'NAK (invalid computation %s)' % brief(compute_id).encode())
            return
        self.reply(self.node.run_setup(comp))

    @handles(b'JOB')
    def _handle_job(self, job):
        comp, entry, refusal = self.node.admit_job(job, self.peer)
        if refusal:
            logger.warning('refusing job from %s: %s', self.peer, refusal.decode())
            self.reply(refusal)
            return
        # Hand the job to the worker before the ACK, so a TERMINATE_JOB or
        # CLOSE the client sends right after it finds the job there.
        self.node.launch_job(comp, job)
        if not self.reply(b'ACK'):
            entry.unacknowledged = True
            self.node.terminate_job(comp, entry.uid)

    @handles(b'TERMINATE_JOB')
    def _handle_terminate_job(self, job):
        comp = self.node.state.find(getattr(job, 'compute_id', None))
        if comp is None or comp.scheduler_ip != self.peer:
            logger.debug('ignoring TERMINATE_JOB from %s', self.peer)
            return
        self.node.terminate_job(comp, getattr(job, 'uid', None))

    @handles(b'CLOSE', recovery=True)
    def _handle_close(self, info):
        if not isinstance(info, dict):
            return
        comp = self.node.state.find(info.get('compute_id'), info.get('auth'),
                                    include_detached=True)
        if comp is None:
            logger.warning('CLOSE for unknown computation %s', brief(info.get('compute_id')))
            return
        self.node.close_computation(comp, bool(info.get('terminate_pending')))

    # -- results and recovery
    @handles(b'RESEND_JOB_RESULTS', recovery=True)
    def _handle_resend_job_results(self, info):
        comp = self.node.lookup(info)
        if comp is None:
            self.reply(dc.dumps_plain(0))
            return
        count = len(comp.stored) + len(comp.running)
        self.reply(dc.dumps_plain(count))
        self.node.resend(comp)

    @handles(b'PENDING_JOBS', recovery=True)
    def _handle_pending_jobs(self, info):
        comp = self.node.lookup(info)
        reply = {'done': [], 'pending': 0}
        if comp is not None:
            reply = {'done': sorted(comp.stored)[:50], 'pending': len(comp.running)}
        self.reply(dc.dumps_plain(reply))

    @handles(b'RETRIEVE_JOB', recovery=True)
    def _handle_retrieve_job(self, info):
        comp = self.node.lookup(info)
        uid = info.get('uid') if isinstance(info, dict) else None
        rec = self.node.store.load_reply(comp, uid) if comp and isinstance(uid, int) else None
        if rec is None or rec['hash'] != info.get('hash'):  # info is a dict when rec is set
            self.reply(dc.dumps(None))
            return
        if self.reply(rec['reply']) and dc.recv_msg(self.sock, 1024) == b'ACK':
            self.node.reply_delivered(Delivery(comp, uid, rec['hash'], None, True))

    @handles(b'JOBS')
    def _handle_jobs(self, info):
        comp = self.node.lookup(info)
        jobs = self.node.state.jobs_of(comp.id) if comp else []
        self.reply(dc.dumps_plain([{'uid': e.uid, 'hash': e.hash, 'start_time': e.start}
                                   for e in jobs]))


# ---------------------------------------------------------------- servers

class Request:
    """A connection whose auth prefix and first frame have arrived."""
    __slots__ = ('sock', 'auth', 'msg')

    def __init__(self, sock, auth, msg):
        self.sock, self.auth, self.msg = sock, auth, msg


class _Arrival:
    """A connection still sending its auth prefix and frame."""
    __slots__ = ('sock', 'addr', 'deadline', 'handshaking', 'stage', 'need', 'buf', 'auth',
                 'limit')

    def __init__(self, sock, addr, deadline, tls):
        self.sock, self.addr, self.deadline, self.handshaking = sock, addr, deadline, tls
        self.stage, self.need, self.buf = 'auth', dc.AUTH_LEN, bytearray()
        self.auth = b''
        self.limit = UNAUTH_FRAME_LIMIT


class Reception(threading.Thread):
    """Reads every new connection's TLS handshake, auth prefix and frame in
    one selector loop.  Idle or trickling peers cost a descriptor here, not
    a handler thread, and are dropped at their ``--msg_timeout`` deadline;
    only complete requests reach the handler threads."""

    def __init__(self, server):
        super().__init__(name='reception', daemon=True)
        self.server = server
        self.node = server.node
        self.sel = selectors.DefaultSelector()
        self.wake_r, self.wake_w = socket.socketpair()
        self.wake_r.setblocking(False)
        self.sel.register(self.wake_r, selectors.EVENT_READ, None)
        self.lock = threading.Lock()
        self.incoming = []
        self.count = 0               # arrivals pending (for the cap)
        self.want_read, self.want_write = (BlockingIOError,), ()
        if self.node.tls_server is not None:
            import ssl  # only a TLS node pays for the module
            self.want_read = (ssl.SSLWantReadError, BlockingIOError)
            self.want_write = (ssl.SSLWantWriteError,)
        # Stay well inside the descriptor limit, or accept() would fail
        # (and the accept loop spin) before the cap ever refused anyone.
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        self.max_pending = MAX_PENDING if soft == resource.RLIM_INFINITY \
            else max(32, min(MAX_PENDING, soft - 256))
        self.stopped = False

    def add(self, sock, addr):
        with self.lock:
            if self.stopped or self.count >= self.max_pending:
                refused = True
            else:
                refused = False
                self.count += 1
                self.incoming.append((sock, addr))
        if refused:
            logger.warning('too many pending connections; refusing %s', addr[0])
            _close(sock)
            return
        self.wake_w.send(b'x')

    def stop(self):
        with self.lock:
            self.stopped = True
        self.wake_w.send(b'x')

    def run(self):
        while True:
            with self.lock:
                if self.stopped:
                    break
            try:
                self._cycle()
            except Exception:  # the reception must keep serving
                logger.exception('reception loop failed')
        for key in list(self.sel.get_map().values()):
            if key.data is not None:
                _close(key.data.sock)
        self.sel.close()

    def _cycle(self):
        arrivals = [k.data for k in self.sel.get_map().values() if k.data is not None]
        now = time.monotonic()
        timeout = min([a.deadline for a in arrivals], default=now + 1.0) - now
        for key, _ in self.sel.select(max(0.0, timeout)):
            if key.data is None:
                self._accept_incoming()
            else:
                self._advance(key.data)
        now = time.monotonic()
        for arrival in arrivals:
            if arrival.deadline <= now and arrival.sock.fileno() >= 0 \
                    and arrival.sock in self.sel.get_map():
                logger.debug('dropping %s: request not complete within %ss',
                             arrival.addr[0], self.node.config.msg_timeout)
                self._drop(arrival)

    def _accept_incoming(self):
        try:
            self.wake_r.recv(4096)
        except BlockingIOError:
            pass
        with self.lock:
            incoming, self.incoming = self.incoming, []
        deadline = time.monotonic() + self.node.config.msg_timeout
        for sock, addr in incoming:
            try:
                sock.setblocking(False)
                tls = self.node.tls_server
                if tls is not None:
                    sock = tls.wrap_socket(sock, server_side=True,
                                           do_handshake_on_connect=False)
                arrival = _Arrival(sock, addr, deadline, tls is not None)
                self.sel.register(sock, selectors.EVENT_READ, arrival)
            except OSError as exc:
                logger.debug('dropping %s: %s', addr[0], exc)
                self._forget(sock)
                continue
            self._advance(arrival)

    def _advance(self, a):
        """Read as far as the data allows; hand over a complete request."""
        try:
            if a.handshaking:
                a.sock.do_handshake()
                a.handshaking = False
            while True:
                chunk = a.sock.recv(min(a.need - len(a.buf), CHUNK))
                if not chunk:
                    raise ProtocolError('closed after %d bytes' % len(a.buf))
                a.buf += chunk
                if len(a.buf) == a.need and self._next_stage(a):
                    return
        except self.want_write:
            self.sel.modify(a.sock, selectors.EVENT_WRITE, a)
        except self.want_read:
            self.sel.modify(a.sock, selectors.EVENT_READ, a)
        except (OSError, ProtocolError) as exc:
            logger.debug('dropping request from %s: %s', a.addr[0], exc)
            self._drop(a)

    def _next_stage(self, a):
        """Move past a completed stage; True once the request is whole."""
        data, a.buf = bytes(a.buf), bytearray()
        if a.stage == 'auth':
            a.auth = data
            # Before authentication only a PING makes sense: keep it small.
            if self.node.auth_ok(data, True):
                a.limit = dc.MAX_FRAME
            a.stage, a.need = 'length', 4
            return False
        if a.stage == 'length':
            (size,) = struct.unpack('>L', data)
            if size > a.limit:
                raise ProtocolError('frame of %d bytes exceeds the limit of %d'
                                    % (size, a.limit))
            if size:
                a.stage, a.need = 'body', size
                return False
            data = b''
        self.sel.unregister(a.sock)
        self._forget(None)
        a.sock.setblocking(True)
        self.server.start_handler(Request(a.sock, a.auth, data), a.addr)
        return True

    def _drop(self, a):
        try:
            self.sel.unregister(a.sock)
        except (KeyError, ValueError):
            pass
        self._forget(a.sock)

    def _forget(self, sock):
        with self.lock:
            self.count -= 1
        if sock is not None:
            _close(sock)


def _close(sock):
    try:
        sock.close()
    except OSError:
        pass


class TCPServer(socketserver.ThreadingMixIn, socketserver.TCPServer):
    """The listening socket: accepted connections go to the Reception;
    complete requests run in handler threads, at most --max_connections
    at once (the excess is refused at once)."""
    daemon_threads = True
    allow_reuse_address = True
    block_on_close = False
    request_queue_size = 128

    def __init__(self, addr, node):
        self.node = node
        self.slots = threading.BoundedSemaphore(node.config.max_connections)
        super().__init__(addr, RequestHandler)
        self.reception = Reception(self)

    def process_request(self, request, client_address):
        self.reception.add(request, client_address)

    def start_handler(self, request, client_address):
        if not self.slots.acquire(blocking=False):
            logger.warning('too many requests at once; refusing %s', client_address[0])
            _close(request.sock)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()

    def shutdown_request(self, request):
        super().shutdown_request(request.sock if isinstance(request, Request) else request)

    def handle_error(self, request, client_address):
        logger.exception('request from %s failed', client_address[0])


# ---------------------------------------------------------------- the node

class Node:
    """Owns the servers, threads, workers, state and store."""

    def __init__(self, config):
        self.config = config
        self.state = NodeState(config.cpus)
        self.sign = dc.new_sign()
        self.auth = dc.auth_code(config.secret, self.sign)
        self.old_auths = set()
        self.tls_server = self.tls_client = None
        if config.certfile:
            self.tls_server = dc.server_tls_context(config.certfile, config.keyfile)
            self.tls_client = dc.client_tls_context(config.certfile)
        self.store = ResultStore(config.dest_path_prefix)
        self.courier = Courier(self)
        # Background work (retirements, notifications, spare workers).
        self.tasks = TaskPool('task', TASK_THREADS, TASK_QUEUE)
        self.counters = Counters()
        self.logs = LogLimiter()
        self.stopping = threading.Event()
        self._closed = self._started = False
        self.spare = None                   # a started worker awaiting a computation
        self.spare_lock = threading.Lock()
        # Creating, pruning and storing into computation directories.
        self.dirs_lock = threading.Lock()
        self._close_lock = threading.Lock()
        self.tcp = TCPServer((config.ip_addr, config.node_port), self)
        self.port = self.tcp.server_address[1]
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind(('', self.port))
        self.udp.settimeout(0.5)
        self.broadcast = broadcast_address(config.ip_addr)
        self._restore()

    # -- start and stop
    def start(self):
        self._started = True
        self.tcp.reception.start()
        self.spawn(self._refill_spare)
        for target, name in ((self.tcp.serve_forever, 'tcp-server'),
                             (self._udp_loop, 'udp-listener'), (self._timer_loop, 'timer')):
            threading.Thread(target=target, name=name, daemon=True).start()
        logger.info('serving %d cpus at %s:%d (name %r)', self.config.cpus,
                    self.config.ext_ip_addr, self.port, self.config.name)
        self.announce()

    def close(self):
        """Stop serving: end running jobs, deliver or store their replies,
        tell schedulers we leave.  Safe to call more than once."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        self.stopping.set()
        if self._started:
            self.tcp.shutdown()
            self.tcp.reception.stop()
        self.tcp.server_close()
        active, _ = self.state.snapshot()
        for comp in active:
            self.state.mark_zombie(comp)
            for entry in self.state.jobs_of(comp.id):
                self.terminate_job(comp, entry.uid)
        deadline = time.monotonic() + 3.0
        while self.state.busy_cpus() and time.monotonic() < deadline:
            time.sleep(0.05)
        if self._started:
            self.courier.drain(3.0)
        for comp in active:
            if comp.worker is not None:
                comp.worker.stop(2.0)
            if comp.stored:
                self.store.save_computation(comp)
            else:
                self.store.remove_computation(comp)
                self._remove_computation_files(comp)
            self.send_terminated(comp)
        with self.spare_lock:
            spare, self.spare = self.spare, None
        if spare is not None:
            spare.stop(2.0)
        self.tasks.close(3.0)
        self.udp.close()
        logger.info('node at %s:%d stopped', self.config.ext_ip_addr, self.port)

    def spawn(self, func, *args, key=None):
        """Run ``func(*args)`` on the bounded task pool; False if refused."""
        if not self.tasks.submit(func, *args, key=key):
            self.logs.log('task refused', logging.WARNING,
                          'background task %s refused (pool closing or full)',
                          getattr(func, '__name__', func))
            return False
        return True

    def _restore(self):
        for comp in self.store.restore():
            if not comp.stored:
                self._remove_computation_files(comp)
                self.store.remove_computation(comp)
                continue
            self.state.detached[comp.id] = comp
            self.old_auths.add(dc.auth_code(self.config.secret, comp.sign))
            logger.info('restored %d stored result(s) of computation %s for %s',
                        len(comp.stored), comp.id, comp.scheduler_ip)

    def auth_ok(self, received, recovery=False):
        if dc.auth_matches(received, self.auth):
            return True
        return recovery and any(dc.auth_matches(received, a) for a in self.old_auths)

    # -- discovery
    def ping_info(self, scheduler_ip=None):
        return {'ip_addr': self.config.ext_ip_addr, 'port': self.port, 'sign': self.sign,
                'version': dc.PROTOCOL_VERSION, 'scheduler_ip_addr': scheduler_ip}

    def announce(self):
        """Broadcast that we are free (and tell --scheduler_node directly)."""
        if not self.state.is_free() or self.stopping.is_set():
            return
        data = b'PING:' + dc.dumps_plain(self.ping_info())
        self._udp_send(data, (self.broadcast, self.config.scheduler_port), broadcast=True)
        sched = self.config.scheduler_node
        if sched:
            info = self.ping_info(sched)
            self._udp_send(b'PING:' + dc.dumps_plain(info), (sched, self.config.scheduler_port))
            self.spawn(self._tcp_notify, (sched, self.config.scheduler_port),
                       b'PING:' + dc.dumps_plain(info))

    def _udp_send(self, data, addr, broadcast=False):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            if broadcast:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
            sock.sendto(data, addr)
        except OSError as exc:
            logger.debug('UDP to %s:%s failed: %s', addr[0], addr[1], exc)
        finally:
            sock.close()

    def _tcp_notify(self, addr, data):
        """Send one unauthenticated message to a client's TCP server."""
        try:
            with dc.connect(addr, self.config.msg_timeout, self.tls_client) as sock:
                dc.send_msg(sock, data)
        except OSError as exc:
            logger.debug('message to %s:%s failed: %s', addr[0], addr[1], exc)

    @staticmethod
    def _valid_ping(info):
        return (isinstance(info, dict) and info.get('version') == dc.PROTOCOL_VERSION
                and valid_port(info.get('port'))
                and isinstance(info.get('sign', ''), str) and len(info.get('sign', '')) <= 64
                and isinstance(info.get('ip_addrs', []), list))

    def pong_for(self, info, peer):
        if not self._valid_ping(info) or not isinstance(info.get('sign'), str):
            logger.debug('ignoring malformed PING from %s', peer)
            return None
        return {'ip_addr': self.config.ext_ip_addr, 'port': self.port, 'sign': self.sign,
                'version': dc.PROTOCOL_VERSION, 'name': self.config.name,
                'cpus': self.config.cpus, 'auth': dc.auth_code(self.config.secret, info['sign']),
                'scheduler_ip_addr': peer}

    def send_pongs(self, info, peer):
        """Answer a client's PING with PONG to each of its addresses."""
        if not self.state.is_free():
            logger.debug('busy; not answering PING from %s', peer)
            return
        addrs = [a for a in info.get('ip_addrs', [])[:8] if is_ipv4(a)] + [peer]
        # 0.0.0.0 is what a broadcast sent before the sender had an address
        # carries; a PONG there would register the client under it.
        for ip in dict.fromkeys(a for a in addrs if a != '0.0.0.0'):
            if info.get('sign'):
                pong = self.pong_for(info, ip)
                self._tcp_notify((ip, info['port']), b'PONG:' + dc.dumps_plain(pong))
            else:
                self._udp_send(b'PING:' + dc.dumps_plain(self.ping_info(ip)), (ip, info['port']))

    def _udp_loop(self):
        while not self.stopping.is_set():
            try:
                data, addr = self.udp.recvfrom(UDP_MAX + 1)
            except socket.timeout:
                continue
            except OSError:
                if self.stopping.is_set():
                    break
                continue
            try:
                self._udp_datagram(data, addr)
            except Exception:  # one bad datagram must not stop the listener
                logger.exception('UDP datagram from %s failed', addr[0])

    def _udp_datagram(self, data, addr):
        tag, payload = dc.split_tag(data)
        if tag not in (b'PING', b'PULSE') or len(data) > UDP_MAX:
            logger.debug('ignoring datagram from %s', addr[0])
            return
        try:
            info = dc.loads_plain(payload)
        except ProtocolError as exc:
            logger.debug('ignoring %s from %s: %s', tag.decode(), addr[0], exc)
            return
        if tag == b'PING':
            if self._valid_ping(info):
                self.spawn(self.send_pongs, info, addr[0])
            else:
                logger.debug('ignoring malformed PING from %s', addr[0])
        elif isinstance(info, dict) and is_ipv4(info.get('ip_addr')):
            port = info.get('port')
            self.sign_of_life(info['ip_addr'], port if valid_port(port) else None)

    def sign_of_life(self, scheduler_ip, port=None, resend=True):
        """A client was heard from: refresh its computations and retry
        whatever results we hold for it.  Without the client's port (a TCP
        request) only its active computations count: several clients may
        share an address, and an old one may be frozen."""
        for comp in self.state.touch(scheduler_ip, port):
            self.courier.revive(comp.reply_addr)
            if resend and comp.stored:
                self.resend(comp)

    # -- timer: pulses, zombies, resends
    def _timer_loop(self):
        last_pulse = last_retry = time.monotonic()
        while not self.stopping.wait(0.25):
            try:
                last_pulse = self._tick(last_pulse)
                self.logs.flush()
                if time.monotonic() - last_retry >= RETRY_SECONDS:
                    last_retry = time.monotonic()
                    self._retry_stored()
            except Exception:  # keep ticking
                logger.exception('timer tick failed')

    def _retry_stored(self):
        active, _ = self.state.snapshot()
        for comp in active:
            if comp.stored and not comp.zombie:
                self.resend(comp)

    def pulse_interval(self, active):
        intervals = [c.pulse_interval for c in active if c.pulse_interval]
        interval = min(intervals) if intervals else DEFAULT_PULSE_SECONDS
        if self.config.zombie_seconds:
            interval = min(interval, self.config.zombie_seconds / 5.0)
        return interval

    def _tick(self, last_pulse):
        now = time.monotonic()
        active, _ = self.state.snapshot()
        if active and now - last_pulse >= self.pulse_interval(active):
            last_pulse = now
            sched = self.state.scheduler
            if sched:
                info = {'ip_addr': self.config.ext_ip_addr, 'port': self.port,
                        'cpus': self.state.busy_cpus(), 'scheduler_ip_addr': sched[0]}
                self._udp_send(b'PULSE:' + dc.dumps_plain(info), sched)
        if self.config.zombie_seconds:
            for comp in self.state.zombies(self.config.zombie_seconds):
                logger.warning('computation %s of %s is a zombie', comp.id, comp.scheduler_ip)
                self.spawn(self.retire, comp)
        return last_pulse

    # -- computations
    def validate_compute(self, c):
        if not isinstance(c, dc.Compute):
            return b'NAK (invalid computation request)'
        checks = (
            (isinstance(c.id, int), 'id'), (c.type in (1, 2), 'type'),
            (isinstance(c.name, str) and c.name, 'name'),
            (isinstance(c.auth, str) and _HEX_RE.match(c.auth or ''), 'auth'),
            (is_ipv4(c.scheduler_ip_addr), 'scheduler address'),
            (valid_port(c.scheduler_port) and valid_port(c.job_result_port), 'port'),
            (isinstance(c.code, str), 'code'),
            (isinstance(c.xfer_files, list)
             and all(isinstance(x, dc.XferFile) and safe_basename(x.name, x.sep)
                     and isinstance(getattr(x.stat_buf, 'st_size', None), int)
                     for x in c.xfer_files), 'files'),
            (c.dest_path is None or isinstance(c.dest_path, str), 'dest_path'),
            (c.pulse_interval is None or isinstance(c.pulse_interval, (int, float)),
             'pulse_interval'))
        for ok, what in checks:
            if not ok:
                return b'NAK (invalid %s)' % what.encode()
        limit = self.config.max_file_size
        if limit and any(x.stat_buf.st_size > limit for x in c.xfer_files):
            return b'NAK (file too big)'
        if c.code:
            try:
                compile(c.code, '<dispy computation>', 'exec')
            except (SyntaxError, ValueError) as exc:
                return b'NAK (Compilation failed: %s)' % str(exc).encode()
        return None

    def computation_dir(self, compute):
        with self.dirs_lock:
            return self._make_computation_dir(compute)

    def _make_computation_dir(self, compute):
        base = os.path.join(self.config.dest_path_prefix, compute.scheduler_ip_addr)
        os.makedirs(base, mode=0o700, exist_ok=True)
        if compute.dest_path:
            path = confined_join(base, compute.dest_path)
            if path is None:
                return None
            os.makedirs(path, mode=0o700, exist_ok=True)
            if not os.path.realpath(path).startswith(os.path.realpath(base) + os.sep):
                return None
            return path
        stem = re.sub(r'[^A-Za-z0-9_.-]', '_', os.path.basename(compute.name))[:40]
        return tempfile.mkdtemp(prefix=stem + '_', dir=base)

    def add_computation(self, compute, raw):
        if not self.state.is_free() and self.state.scheduler != (
                compute.scheduler_ip_addr, compute.scheduler_port):
            return None, b'Busy'
        try:
            dest = self.computation_dir(compute)
        except OSError as exc:
            return None, b'NAK (could not create directory: %s)' % str(exc).encode()
        if dest is None:
            return None, b'NAK (Invalid dest_path)'
        comp = Computation(compute, dest, self.sign)
        refusal = self.state.claim(comp)
        if refusal:
            return None, refusal
        try:
            self.store.save_computation(comp)
            comp.worker = self.take_worker()
            comp.worker.attach(comp, raw, compute.code)
        except OSError as exc:
            logger.error('could not start computation %s: %s', comp.id, exc)
            self.drop_computation(comp)
            return None, b'NAK (could not start computation: %s)' % str(exc).encode()
        logger.info('computation %s (%s) from %s:%s in %s', comp.id, comp.name,
                    comp.scheduler_ip, comp.scheduler_port, dest)
        return comp, None

    def take_worker(self):
        """The spare worker if it is alive (else a new one); a new spare
        starts in the background."""
        with self.spare_lock:
            worker, self.spare = self.spare, None
        if worker is None or not worker.usable():
            worker = WorkerHandle(self)
        if not self.stopping.is_set():
            self.spawn(self._refill_spare)
        return worker

    def _refill_spare(self):
        worker = WorkerHandle(self)
        with self.spare_lock:
            if self.spare is None and not self.stopping.is_set():
                self.spare, worker = worker, None
        if worker is not None:
            worker.stop(2.0)

    def drop_computation(self, comp):
        """Undo add_computation (the client never got our ACK)."""
        self.state.unclaim(comp)
        if comp.worker is not None:
            comp.worker.stop(2.0)
        self.store.remove_computation(comp)
        self._remove_computation_files(comp)

    def lookup(self, info):
        if not isinstance(info, dict):
            return None
        return self.state.find(info.get('compute_id'), info.get('auth'), include_detached=True)

    def run_setup(self, comp):
        answer = comp.worker.request(('setup',), SETUP_TIMEOUT)
        if answer is not None and answer[1]:
            return b'ACK'
        text = answer[2] if answer else 'worker process died during setup'
        logger.warning('setup of computation %s failed:\n%s', comp.id, text)
        self.state.mark_zombie(comp)
        self.spawn(self.retire, comp, False)
        return text.encode('utf-8', 'replace')

    def close_computation(self, comp, terminate):
        self.state.mark_zombie(comp)
        if terminate:
            for entry in self.state.jobs_of(comp.id):
                self.terminate_job(comp, entry.uid)
        if self.state.is_detached(comp):
            self.resend(comp)
            if not comp.stored:
                self._forget(comp)
            return
        self.retire(comp)

    def retire(self, comp, run_cleanup=True):
        """End a zombie computation once its jobs are done: cleanup, files,
        record; free the node.  Runs once per computation."""
        if not self.state.begin_retire(comp):
            return
        if comp.worker is not None:
            answer = comp.worker.request(('close', run_cleanup), CLEANUP_TIMEOUT)
            if answer and answer[1]:
                logger.warning('cleanup of computation %s failed:\n%s', comp.id, answer[1])
            comp.worker.stop(5.0)
        self._remove_computation_files(comp)
        keep = bool(comp.stored)
        if keep:
            self.store.save_computation(comp)
        else:
            self.store.remove_computation(comp)
        if comp.timed_out:
            self.send_terminated(comp)
        logger.info('computation %s closed%s', comp.id,
                    ' (%d result(s) kept)' % len(comp.stored) if keep else '')
        if self.state.detach(comp, keep):
            self.announce()

    def _forget(self, comp):
        """A detached computation has nothing left to deliver."""
        self.state.detach(comp, False)
        self.store.remove_computation(comp)
        self._remove_computation_files(comp)

    def _remove_computation_files(self, comp):
        """Remove a computation's files and directory (unless the client
        asked to keep them with cleanup=False); stored replies stay."""
        base = os.path.realpath(self.config.dest_path_prefix) + os.sep
        path = os.path.realpath(comp.dest_path)
        if comp.keep_files or not path.startswith(base):
            return
        with self.dirs_lock:
            if not os.path.isdir(path):
                return
            for name in os.listdir(path):
                if name.startswith(REPLY_PREFIX):
                    continue
                full = os.path.join(path, name)
                if os.path.isdir(full) and not os.path.islink(full):
                    shutil.rmtree(full, ignore_errors=True)
                else:
                    try:
                        os.unlink(full)
                    except OSError as exc:
                        logger.warning('could not remove %s: %s', full, exc)
            try:
                os.rmdir(path)
            except OSError:
                return  # stored replies remain
            self._prune_empty_parents(path, base)

    @staticmethod
    def _prune_empty_parents(path, base):
        parent = os.path.dirname(path)
        while parent.startswith(base) and len(parent) > len(base):
            try:
                os.rmdir(parent)
            except OSError:
                break
            parent = os.path.dirname(parent)

    def send_terminated(self, comp):
        info = {'ip_addr': self.config.ext_ip_addr, 'port': self.port, 'sign': self.sign}
        self._tcp_notify((comp.scheduler_ip, comp.scheduler_port),
                         b'TERMINATED:' + dc.dumps_plain(info))

    # -- files
    def file_target(self, xf, peer):
        if not isinstance(xf, dc.XferFile) or not isinstance(
                getattr(xf.stat_buf, 'st_size', None), int):
            return None, None, b'NAK (invalid file transfer)'
        comp = self.state.find(xf.compute_id)
        name = safe_basename(xf.name, xf.sep)
        if comp is None or comp.zombie or comp.scheduler_ip != peer:
            return None, None, b'NAK (invalid computation)'
        if name is None:
            return None, None, b'NAK (invalid file name)'
        limit = self.config.max_file_size
        if limit and xf.stat_buf.st_size > limit:
            logger.warning('refusing %s: %d bytes is over the limit', name, xf.stat_buf.st_size)
            return None, None, b'NAK (file too big)'
        return comp, os.path.join(comp.dest_path, name), None

    @staticmethod
    def have_file(target, stat_buf):
        try:
            st = os.lstat(target)
        except OSError:
            return False
        return (stat.S_ISREG(st.st_mode) and st.st_size == stat_buf.st_size
                and abs(st.st_mtime - stat_buf.st_mtime) <= 1
                and stat.S_IMODE(st.st_mode) == _safe_mode(stat_buf.st_mode))

    def receive_file(self, sock, comp, target, xf):
        """Stream ``st_size`` bytes into ``target`` through a temp file, so
        a cut transfer never leaves a file that looks whole."""
        size = xf.stat_buf.st_size
        fd, tmp = tempfile.mkstemp(prefix='.tmp-', dir=comp.dest_path)
        got = 0
        try:
            with os.fdopen(fd, 'wb') as fh:
                got, err = recv_to_file(sock, fh.fileno(), size, self.config.msg_timeout)
                if err is not None:
                    raise err
                os.fchmod(fh.fileno(), _safe_mode(xf.stat_buf.st_mode, target == comp.program))
            if got < size:
                raise ProtocolError('read only %d of %d bytes' % (got, size))
            os.utime(tmp, (xf.stat_buf.st_atime, xf.stat_buf.st_mtime))
            os.replace(tmp, target)
        except (OSError, ProtocolError) as exc:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            logger.warning('transfer of %s failed: %s', target, exc)
            return b'NAK (read only %d bytes)' % got
        return b'ACK'

    # -- jobs
    def admit_job(self, job, peer):
        if not isinstance(job, dc.DispyJobRecord) or not isinstance(job.uid, int) \
                or not isinstance(job.hash, str) \
                or not isinstance(job.args, bytes) or not isinstance(job.kwargs, bytes) \
                or not isinstance(job.code or '', str) \
                or not isinstance(job.xfer_files or [], list):
            return None, None, b'NAK (invalid job)'
        comp = self.state.find(job.compute_id)
        if comp is None or comp.scheduler_ip != peer or comp.worker is None \
                or not comp.worker.alive:
            return None, None, b'NAK (invalid computation %s)' % brief(job.compute_id).encode()
        limit = self.config.max_file_size
        files = []
        for xf in job.xfer_files or []:
            name = isinstance(xf, dc.XferFile) and safe_basename(xf.name, xf.sep)
            if not name:
                return None, None, b'NAK (invalid file)'
            if limit and getattr(xf.stat_buf, 'st_size', 0) > limit:
                return None, None, b'NAK (file too big)'
            files.append(name)
        entry = JobEntry(job.uid, job.hash, comp.id, files)
        refusal = self.state.start_job(comp, entry)
        if refusal is None:
            comp.last_pulse = time.monotonic()
        return comp, entry, refusal

    def launch_job(self, comp, job):
        try:
            comp.worker.send(('job', job.uid, job.hash, job.args, job.kwargs, job.code or ''))
        except OSError:
            self.job_done(comp, job.uid, self._terminated_reply(
                comp, job.uid, job.hash, 'worker process of the computation is gone'))

    def terminate_job(self, comp, uid):
        if not any(e.uid == uid for e in self.state.jobs_of(comp.id)):
            logger.debug('TERMINATE_JOB for unknown job %s', brief(uid))
            return
        logger.info('terminating job %s of computation %s', uid, comp.id)
        try:
            comp.worker.send(('terminate', uid))
        except OSError:
            pass

    def _terminated_reply(self, comp, uid, job_hash, why):
        return dc.dumps(dc.JobReply(uid=uid, hash=job_hash, ip_addr=self.config.ext_ip_addr,
                                    status=DispyJob.Terminated, exception=why,
                                    start_time=time.time(), end_time=time.time()))

    def job_done(self, comp, uid, reply):
        """A worker finished job ``uid`` with ``reply`` (pickled bytes)."""
        entry, _, unused = self.state.finish_job(uid)
        if entry is None:
            return
        for name in unused:
            try:
                os.unlink(os.path.join(comp.dest_path, name))
            except OSError:
                pass
        if not entry.unacknowledged:
            self.courier.submit(Delivery(comp, uid, entry.hash, reply, False))
        if comp.zombie and not comp.running and not self.stopping.is_set():
            self.spawn(self.retire, comp)

    def worker_lost(self, comp):
        """The worker exited or died; its running jobs end as Terminated."""
        for entry in self.state.jobs_of(comp.id):
            self.job_done(comp, entry.uid, self._terminated_reply(
                comp, entry.uid, entry.hash, 'worker process of the computation died'))
        if not comp.retiring and not self.stopping.is_set():
            logger.warning('worker of computation %s exited', comp.id)

    # -- results
    def reply_delivered(self, item):
        comp = item.comp
        if item.resend or item.uid in comp.stored:
            # Forget it in memory first: once the file is gone, a RESEND count
            # must not include it (a crash in between only re-sends it).
            forget = self.state.drop_stored(comp, item.uid)
            self.store.remove_reply(comp, item.uid)
            if forget:
                self._forget(comp)

    def reply_undelivered(self, item):
        comp = item.comp
        try:
            with self.dirs_lock:    # retire() must not remove the directory meanwhile
                self.store.save_reply(comp, item.uid, item.hash, item.reply)
        except OSError as exc:
            logger.error('could not store the reply of job %s: %s', item.uid, exc)
            return
        self.state.add_stored(comp, item.uid)
        if comp.retiring:
            self.store.save_computation(comp)   # retire may have removed it

    def resend(self, comp):
        for uid in sorted(comp.stored)[:64]:
            rec = self.store.load_reply(comp, uid)
            if rec is None:
                if self.state.drop_stored(comp, uid):
                    self._forget(comp)
                continue
            self.courier.submit(Delivery(comp, uid, rec['hash'], rec['reply'], True))


def _safe_mode(mode, executable=False):
    """Permission bits kept from a client file: never setuid/setgid/sticky."""
    bits = stat.S_IMODE(mode) & 0o777
    return bits | 0o100 if executable else bits


# ---------------------------------------------------------------- main

def build_parser():
    p = argparse.ArgumentParser(
        prog='dispynode',
        description='Compute node for dispy 4.5 clients (stdlib port of dispynode 4.5.5).')
    p.add_argument('-c', '--cpus', type=int, default=0,
                   help='number of CPUs to use; negative leaves that many unused '
                        '(default: all)')
    p.add_argument('-d', '--debug', action='store_true', help='log debug messages')
    p.add_argument('-i', '--ip_addr', default=None,
                   help='IP address to serve on (default: primary IPv4 address)')
    p.add_argument('--ext_ip_addr', default=None,
                   help='address announced to clients (NAT gateway address)')
    p.add_argument('-p', '--node_port', type=int, default=DEFAULT_NODE_PORT,
                   help='TCP and UDP port (default %(default)s)')
    p.add_argument('--name', default='', help='node name shown to clients (default: hostname)')
    p.add_argument('--dest_path_prefix', default=None,
                   help='directory for files and stored results '
                        '(default: <tmp>/dispy/node)')
    p.add_argument('--scheduler_node', default=None,
                   help='name or address of a client or scheduler to announce to')
    p.add_argument('--scheduler_port', type=int, default=DEFAULT_SCHEDULER_PORT,
                   help='port clients/schedulers listen on (default %(default)s)')
    p.add_argument('--max_file_size', default=DEFAULT_MAX_FILE_SIZE,
                   help='largest file accepted, with k/m/g/t suffix; 0 = no limit '
                        '(default %(default)s)')
    p.add_argument('--zombie_interval', type=float, default=DEFAULT_ZOMBIE_MINUTES,
                   help='minutes of client silence before its computation is a zombie; '
                        '0 disables (default %(default)s)')
    p.add_argument('--msg_timeout', type=float, default=DEFAULT_MSG_TIMEOUT,
                   help='seconds allowed for each network message (default %(default)s)')
    p.add_argument('-s', '--secret', default=None,
                   help='shared secret (visible in ps: prefer --secret_file or '
                        '$DISPYNODE_SECRET)')
    p.add_argument('--secret_file', default=None, help='read the shared secret from this file')
    p.add_argument('--certfile', default=None, help='TLS certificate (PEM)')
    p.add_argument('--keyfile', default=None, help='TLS private key (PEM)')
    p.add_argument('--clean', action='store_true',
                   help='remove everything under --dest_path_prefix at start')
    p.add_argument('--max_connections', type=int, default=MAX_CONNECTIONS,
                   help='concurrent TCP requests served (default %(default)s)')
    p.add_argument('--version', action='version',
                   version='dispynode %s (dispy protocol %s)' % (__version__,
                                                               dc.PROTOCOL_VERSION))
    return p


def resolve_config(args):
    """Validate options; raise ValueError with a one-line message."""
    total = os.cpu_count() or 1
    if args.cpus > total or args.cpus <= -total:
        raise ValueError('--cpus must be between %d and %d' % (-total + 1, total))
    args.cpus = args.cpus if args.cpus > 0 else total + args.cpus
    try:
        args.max_file_size = dc.parse_size(args.max_file_size)
    except ValueError as exc:
        raise ValueError('--max_file_size: %s' % exc)
    if not 0 < args.node_port < 65536 or not 0 < args.scheduler_port < 65536:
        raise ValueError('ports must be between 1 and 65535')
    if args.msg_timeout <= 0:
        raise ValueError('--msg_timeout must be positive')
    if args.zombie_interval < 0:
        raise ValueError('--zombie_interval must be 0 (off) or positive')
    if args.max_connections < 1:
        raise ValueError('--max_connections must be at least 1')
    override = os.environ.get('DISPYNODE_ZOMBIE_SECONDS')
    args.zombie_seconds = float(override) if override else args.zombie_interval * 60
    args.secret = _read_secret(args)
    notes = []      # logged only once every option is valid
    if args.ip_addr:
        args.ip_addr = _resolve_local(args.ip_addr, '-i/--ip_addr')
    else:
        args.ip_addr = primary_ipv4()
        notes.append((logging.INFO, 'serving on %s (primary address; use -i to choose)'
                      % args.ip_addr))
        if args.ip_addr.startswith('127.'):
            notes.append((logging.WARNING, 'only a loopback address was found; other '
                          'machines cannot reach this node'))
    args.ext_ip_addr = _resolve(args.ext_ip_addr, '--ext_ip_addr') if args.ext_ip_addr \
        else args.ip_addr
    if args.scheduler_node:
        args.scheduler_node = _resolve(args.scheduler_node, '--scheduler_node')
    args.name = args.name or socket.gethostname()
    for opt in ('certfile', 'keyfile'):
        path = getattr(args, opt)
        if path:
            if not os.access(path, os.R_OK):
                raise ValueError('--%s %s: file is missing or unreadable' % (opt, path))
            setattr(args, opt, os.path.abspath(path))
    if args.keyfile and not args.certfile:
        raise ValueError('--keyfile needs --certfile')
    if args.certfile:
        try:
            dc.server_tls_context(args.certfile, args.keyfile)
        except OSError as exc:
            raise ValueError('TLS certificate/key not usable: %s' % exc)
    prefix = args.dest_path_prefix or os.path.join(tempfile.gettempdir(), 'dispy', 'node')
    args.dest_path_prefix = os.path.abspath(prefix.strip()).rstrip(os.sep)
    for level, note in notes:
        logger.log(level, note)
    return args


def _read_secret(args):
    # Workers and jobs inherit the environment; they have no use for the secret.
    env_secret = os.environ.pop('DISPYNODE_SECRET', '')
    if args.secret_file:
        try:
            with open(args.secret_file) as fh:
                return fh.read().strip()
        except OSError as exc:
            raise ValueError('--secret_file: %s' % exc.strerror)
    if args.secret is not None:
        return args.secret
    return env_secret


def _resolve(host, option):
    try:
        return socket.gethostbyname(host)
    except (OSError, UnicodeError):
        raise ValueError('%s %s: cannot resolve this address' % (option, host))


def _resolve_local(host, option):
    addr = _resolve(host, option)
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.bind((addr, 0))
    except OSError:
        raise ValueError('%s %s: not an address of this machine' % (option, host))
    finally:
        probe.close()
    return addr


def _raise_fd_limit():
    """Many idle peers should cost descriptors, not refusals."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 65536
    if soft != resource.RLIM_INFINITY and soft < min(target, 65536):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(target, 65536), hard))
        except (ValueError, OSError):
            pass


def prepare_prefix(cfg):
    if cfg.clean and os.path.isdir(cfg.dest_path_prefix):
        for name in os.listdir(cfg.dest_path_prefix):
            full = os.path.join(cfg.dest_path_prefix, name)
            if os.path.isdir(full) and not os.path.islink(full):
                shutil.rmtree(full, ignore_errors=True)
            else:
                os.unlink(full)
    os.makedirs(cfg.dest_path_prefix, mode=0o700, exist_ok=True)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    _raise_fd_limit()
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO,
                        format='%(asctime)s dispynode %(levelname)s %(message)s')
    try:
        cfg = resolve_config(args)
        prepare_prefix(cfg)
        node = Node(cfg)
    except ValueError as exc:
        parser.exit(2, 'dispynode: error: %s\n' % exc)
    except OSError as exc:
        parser.exit(2, 'dispynode: error: %s\n' % exc)
    stop = threading.Event()

    def on_signal(signum, frame):
        if stop.is_set():
            logger.warning('second signal: exiting now')
            os._exit(1)
        logger.info('signal %d: shutting down', signum)
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    node.start()
    while not stop.wait(1.0):
        pass
    node.close()
    return 0


if __name__ == '__main__':
    sys.exit(main())
