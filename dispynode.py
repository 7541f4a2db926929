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

Threads and processes (every thread is named and comes from a capped pool,
so the node never runs more than 8 + TASK_THREADS + PONG_THREADS +
METRICS_THREADS + --max_connections + MAX_LANES + MAX_COMPUTATIONS
threads: 116 by default; 8 fixed: main, console, tcp-server, reception,
udp-listener, timer, control, metrics)::

    thread               touches
    main ............... resolve_config (validation only), then Node(),
                         whose start_up does the side effects (secret and
                         environment, lookups, TLS files, prefix and its
                         lock, the jobs' cgroup with --job_memory); then
                         acts on the signals its handlers only queue: SIGHUP
                         reopens --log_file, SIGINT/SIGTERM (or Node.quit:
                         --serve, console quit, control stop, a finished
                         drain, dispynode_shutdown) end in Node.close(): evicts
                         all, settles each (ZOMBIE -> DETACHED or GONE)
    console ............ terminal commands (stdin a tty, no --daemon); the
                         same table of commands as the control socket
    tcp-server ......... socketserver accept loop; hands sockets to reception;
                         stops polling the listener for a back-off while
                         descriptors are short (EMFILE)
    reception .......... one selector loop: TLS handshake, auth and first
                         frame of every connection (idle peers cost no
                         thread); the request memory budget
    request-N .......... a pool of at most --max_connections threads, one
                         complete request each:
                         COMPUTE claims (NEW -> ACTIVE) and creates the
                         computation directory (Workspace); FILEXFER writes
                         into it; JOB sends to the worker; CLOSE: ACTIVE ->
                         ZOMBIE, or DETACHED -> GONE; recovery requests read
                         and remove stored replies (Workspace)
    udp-listener ....... PING and PULSE datagrams: decodes them (bounded) and
                         queues PONGs; refreshes computations (last_pulse)
    pong-N ............. at most PONG_THREADS: PONGs to unauthenticated pingers
    timer .............. pulses, zombie detection (ACTIVE -> ZOMBIE), retries
                         of stored results (bounded per reply) and of replies
                         held in memory (not storable), the PING inviting a
                         client back after its worker died, log summaries,
                         service window, --ping_interval, systemd STATUS=;
                         as PID 1, reaps the orphans it inherits (Children)
    task-N ............. at most TASK_THREADS: evictions and retirements
                         (ZOMBIE -> RETIRING -> DETACHED or GONE: the
                         worker's close, then Workspace files and record),
                         spare workers, notifications
    courier-<addr> ..... one lane per client address (at most MAX_LANES):
                         JOB_REPLY delivery; stores what cannot be delivered
                         (Workspace; GONE -> DETACHED) and removes what was
                         (DETACHED -> GONE when nothing is left); a refusal
                         concerns one reply, a failure the address
    worker-<id> ........ one per computation (at most MAX_COMPUTATIONS):
                         results from its worker, checked like a peer's
                         (frames within --max_request_size, held in the
                         request memory budget, whole by a deadline; a
                         faulty worker is killed); frees the job's CPU
                         (NodeState) and hands the reply to the courier;
                         when the worker dies (Node.worker_lost), ends its
                         jobs Terminated and starts a fresh worker, or
                         evicts a computation with setup (ACTIVE -> ZOMBIE)
    control ............ the local control socket <prefix>/.dispynode-control
                         (one connection at a time): status, and for root
                         or the node's user drain, pause, resume, cpus,
                         release, stop; holds the drain/stop connections
                         open until the process exits
    metrics ............ --metrics only: accepts and reads HTTP requests in
                         one selector loop (one deadline per request)
    metrics-N .......... at most METRICS_THREADS: answer complete requests
                         (/metrics, /healthz)

State and locks: NodeState (one lock) holds the computations, their
phases and jobs; every phase change is one of its methods, checked
against TRANSITIONS, returning a Change that names the I/O left to the
caller (record, files, announce, TERMINATED).  Workspace (its own lock)
owns everything under --dest_path_prefix and takes the record decisions
together with the transition that makes them, so no reply is stored
between a decision and its write.  Lock order: Workspace, then NodeState.
No socket, fork or worker request happens under either lock.  Processes::

    node (threads) --socketpair--> worker process (one per computation,
        single-threaded, started ahead of need with stdio on /dev/null and
        no other descriptor of the node's, not dumpable, then moved into the
        computation directory): runs the code and setup once, then forks
        one child per job, each in its own process group
    job child --pipe: length + pickled _JobReply--> worker --socketpair-->
        node --TCP JOB_REPLY (same bytes)--> client

Containment: the node (as root, in the thread that starts a worker) makes
the worker's cgroup v2 group with one job group per CPU
(make_worker_cgroup) and removes it, killing what is left, when the worker
stops; a job child joins a free job group before user code, and the worker
ends that group (cgroup.kill) once it has reaped the job's own process.
The job ends then, whoever still holds its pipe.  Without cgroups the
worker and each job child are child subreapers (see Worker._end_job).

The node never forks itself and never unpickles user objects: a job pickles
its own ``_JobReply`` (protocol 4; numpy 2 types under their numpy 1.x
names, for the 3.6 client) and the node forwards those bytes.  Data
from unauthenticated peers is decoded by a loader that accepts plain data
only.  Undeliverable results are stored atomically under
``--dest_path_prefix`` and survive restarts of the client and of the node.
"""

import sys

# First of all, in syntax that Python 3.6 and 3.7 still parse (the rest of
# this file and dispy_common too; tests/test_deploy.py checks): a node copied
# onto an old Python would otherwise seem to serve while every worker dies.
if sys.version_info < (3, 8):
    sys.stderr.write('dispynode: error: Python 3.8 or later is required (this is Python '
                     '%d.%d.%d: %s)\n' % (sys.version_info[:3] + (sys.executable,)))
    sys.exit(2)

import _random
import _signal
import _thread
import argparse
import base64
import collections
import contextlib
import enum
import fcntl
import io
import ipaddress
import itertools
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
import tempfile
import threading
import time
import traceback
import types
import weakref

import dispy_common as dc
from dispy_common import DispyJob, ProtocolError

__version__ = '1.0.0'

logger = logging.getLogger('dispynode')
_PROCESS_START = time.time()     # process_start_time_seconds where /proc cannot tell

# ---------------------------------------------------------------- printable logs
# Names a client chooses (computation name, dest_path, file names, job
# hashes) and texts its code makes (exceptions) reach log lines and the
# status table: control characters in them are escaped, so they can
# neither start a line that looks like the node's nor reach a terminal raw.

_CONTROL_RE = re.compile('[\x00-\x1f\x7f-\x9f\u2028\u2029]')
_ESCAPES = {'\n': '\\n', '\r': '\\r', '\t': '\\t'}


def _escape_char(match):
    char = match.group()
    return _ESCAPES.get(char) or ('\\x%02x' % ord(char) if ord(char) < 256
                                  else '\\u%04x' % ord(char))


def printable(text):
    """``text`` with its control characters (newline, ESC, DEL, C1,
    Unicode line separators) escaped as ``\\n``, ``\\x1b``, ..."""
    return _CONTROL_RE.sub(_escape_char, text)


class LogLines(str):
    """A multi-line text for a log record (a traceback of user code): its
    lines stay lines, indented under the record, each escaped."""


def _indented(text):
    return '\n'.join('    ' + printable(line) for line in str(text).rstrip('\n').split('\n'))


def _printable_arg(arg):
    if isinstance(arg, LogLines):
        return _indented(arg)
    if isinstance(arg, str):
        return printable(arg)
    if arg is None or isinstance(arg, (int, float)):
        return arg
    try:
        text = str(arg)         # an exception, a path: its text may hold a client's name
    except Exception:  # an object whose str fails is logged as it is
        return arg
    return printable(text) if _CONTROL_RE.search(text) else arg


class _PrintableRecords(logging.Filter):
    """Escapes the arguments of every record of the node's logger, and
    indents the lines of a logged traceback."""

    def filter(self, record):
        if isinstance(record.args, tuple) and record.args:
            record.args = tuple(_printable_arg(a) for a in record.args)
        if record.exc_info and not record.exc_text:
            record.exc_text = _indented(''.join(traceback.format_exception(*record.exc_info)))
        return True


logger.addFilter(_PrintableRecords())

# ---------------------------------------------------------------- constants

DEFAULT_NODE_PORT = 51348
DEFAULT_SCHEDULER_PORT = 51347
DEFAULT_MAX_FILE_SIZE = '10m'
DEFAULT_MAX_REQUEST = '1g'          # the original ran jobs with 300 MB of arguments
DEFAULT_REQUEST_MEMORY = '1g'
DEFAULT_MSG_TIMEOUT = 5.0
DEFAULT_ZOMBIE_MINUTES = 60.0
DEFAULT_PULSE_SECONDS = 600.0
MAX_CONNECTIONS = 64          # concurrent TCP requests; the excess is refused
UDP_MAX = 8192                # longer datagrams are ignored
UNAUTH_FRAME_LIMIT = 8192     # largest request read from an unauthenticated peer (a PING)
MAX_PENDING = 4096            # connections still sending their request
CHUNK = 1024 * 1024           # file streaming block
TASK_THREADS = 8              # background task pool: threads, queued tasks
TASK_QUEUE = 256
PONG_THREADS = 2              # pool answering unauthenticated PINGs
PONG_QUEUE = 4                # full: the oldest waiting PING is dropped
PONG_TARGETS = 2              # addresses one PING can make us connect to
PONG_CONNECT_TIMEOUT = 0.9    # below TCP's 1 s SYN retransmit: one SYN per target
PING_SOURCE_INTERVAL = 1.0    # one PONG round per (source, port, sign) per interval
PING_RATE, PING_BURST = 20.0, 40   # PONG rounds per second for all sources together
MAX_COMPUTATIONS = 16         # active computations (each holds a worker process)
MAX_LANES = 16                # courier lanes (threads) at once
MAX_WORKER_RESTARTS = 3       # fresh workers for a computation (without setup) whose worker died
MAX_XFER_FILES = 10000        # files one computation may announce
REPLY_PREFIX = '_dispy_job_reply_'
LANE_IDLE_SECONDS = 30.0      # a courier lane's thread ends after this idle time
RETRY_SECONDS = 10.0          # stored results of a live client are retried this often
MAX_REPLY_ATTEMPTS = 5        # unacknowledged sends of a reply before it is only kept
HELD_RETRY_SECONDS = 1.0      # replies that could not even be stored are retried this often
TICK_SECONDS = 0.25           # the timer's period (shorter for a zombie interval under 2.5 s)
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


def unicast_ipv4(text):
    """An IPv4 address a PONG may go to: not unspecified, broadcast or
    multicast."""
    try:
        addr = ipaddress.IPv4Address(text)
    except (ValueError, TypeError):
        return False
    return not (addr.is_unspecified or addr.is_multicast or addr.is_reserved
                or text == '255.255.255.255')


def brief(value):
    """A short, safe rendering of a client-supplied value for logs and
    refusals: its own text for small ints and strings, else its type
    (the repr of a deeply nested object could recurse without end)."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) < 10 ** 30:
        return str(value)
    if isinstance(value, str) and len(value) <= 80:
        return repr(value)
    return '<%s>' % type(value).__name__


def small_int(value):
    """An id as dispy makes them (``int(1000 * time)``, ``id(obj)``): a
    non-negative int below 2**64, never a bool or a 5,000-digit number."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2 ** 64


def valid_file_size(xf):
    """A file announcement (``XferFile``) with a sane ``st_size``."""
    size = getattr(getattr(xf, 'stat_buf', None), 'st_size', None)
    return (isinstance(xf, dc.XferFile) and isinstance(size, int)
            and not isinstance(size, bool) and 0 <= size < 2 ** 63)


def valid_xfer(xf):
    """A file announcement with a usable name and a sane size."""
    return valid_file_size(xf) and bool(safe_basename(xf.name, xf.sep))


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


def is_here(relative):
    """True for '.', './' and the like: no directory below the base."""
    relative = relative.strip().replace('\\', '/')
    return not relative.startswith('/') and all(p in ('', '.') for p in relative.split('/'))


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


def route_source(ip_addr):
    """The local address the kernel's route to ``ip_addr`` leaves from."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.connect((ip_addr, 9))      # no packet is sent
        return sock.getsockname()[0]
    except OSError:
        return None
    finally:
        sock.close()


def descendants(pid):
    """PIDs of all descendants of ``pid``: psutil if present, else /proc,
    else ps(1) (macOS, BSD); [] if none works, and kill_tree then signals
    the process group alone.  Never raises: a cancel must not take the
    computation's worker down.  DISPYNODE_NO_PROC=1 in the environment hides
    psutil and /proc (to try the fallbacks on Linux)."""
    no_proc = os.environ.get('DISPYNODE_NO_PROC') == '1'
    if not no_proc:
        try:
            import psutil
            return [p.pid for p in psutil.Process(pid).children(recursive=True)]
        except ImportError:
            pass
        except Exception:  # psutil.NoSuchProcess and friends
            return []
    pairs = None if no_proc else _proc_parents()
    if pairs is None:
        pairs = _ps_parents()
    children = collections.defaultdict(list)
    for child, parent in pairs or ():
        children[parent].append(child)
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), ()):
            found.append(child)
            todo.append(child)
    return found


def _proc_parents():
    """[(pid, ppid)] from /proc, or None without a usable /proc."""
    try:
        entries = os.listdir('/proc')
    except OSError:
        return None
    pairs = []
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open('/proc/%s/stat' % entry, 'rb') as fh:
                data = fh.read()
            pairs.append((int(entry), int(data[data.rfind(b')') + 2:].split()[1])))
        except (OSError, ValueError, IndexError):
            continue
    return pairs or None


def _ps_parents():
    """[(pid, ppid)] from ps(1) (POSIX options), or None."""
    try:
        out = subprocess.run(['ps', '-A', '-o', 'pid=', '-o', 'ppid='],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                             stdin=subprocess.DEVNULL, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    pairs = []
    for line in out.split(b'\n'):
        fields = line.split()
        if len(fields) == 2 and fields[0].isdigit() and fields[1].isdigit():
            pairs.append((int(fields[0]), int(fields[1])))
    return pairs or None


def session_groups(sid):
    """The process groups of the live processes in session ``sid`` (Linux
    /proc; empty elsewhere)."""
    groups = set()
    try:
        names = os.listdir('/proc')
    except OSError:
        return groups
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open('/proc/%s/stat' % name, 'rb') as fh:
                fields = fh.read().rsplit(b')', 1)[1].split()
        except (OSError, IndexError):
            continue
        # after the name: state, ppid, pgrp, session
        if len(fields) > 3 and int(fields[3]) == sid and fields[0] not in (b'Z', b'X'):
            groups.add(int(fields[2]))
    return groups


def kill_tree(pid, sig):
    """Signal ``pid``'s process group and every descendant (some may have
    left the group with setsid).  For SIGKILL the tree is first stopped
    (SIGSTOP, again until no new process appears), so that no process of it
    forks a child that the kill misses.  Returns the pids signalled (the
    caller may have to reap the ones that come back to it)."""
    targets = [pid] + descendants(pid)
    if sig == signal.SIGKILL:
        stopped = set()
        for _ in range(20):     # bounded: a fork bomb outruns no SIGSTOP for long
            fresh = [p for p in targets if p not in stopped]
            if not fresh:
                break
            for target in fresh:
                try:
                    os.kill(target, signal.SIGSTOP)
                except OSError:
                    pass
                stopped.add(target)
            targets = list(stopped | {pid} | set(descendants(pid)))
    try:
        os.killpg(pid, sig)
    except OSError:
        pass
    for target in targets:
        try:
            os.kill(target, sig)
        except OSError:
            pass
    return targets


def direct_children(pid):
    """PIDs whose parent is ``pid`` (/proc, else ps; [] if neither works)."""
    if os.environ.get('DISPYNODE_NO_PROC') != '1':
        try:
            import psutil
            return [p.pid for p in psutil.Process(pid).children()]
        except ImportError:
            pass
        except Exception:  # psutil.NoSuchProcess and friends
            return []
    pairs = None if os.environ.get('DISPYNODE_NO_PROC') == '1' else _proc_parents()
    if pairs is None:
        pairs = _ps_parents()
    return [child for child, parent in pairs or () if parent == pid]


PR_SET_DUMPABLE = 4
PR_SET_CHILD_SUBREAPER = 36
_PRCTL = []


def prctl(option, value):
    """prctl(2) through ctypes (Linux); False where it is not available or
    fails."""
    if not _PRCTL:
        try:
            import ctypes
            func = ctypes.CDLL(None, use_errno=True).prctl
            func.restype = ctypes.c_int
            func.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                             ctypes.c_ulong)
        except (ImportError, OSError, AttributeError):
            func = None
        _PRCTL.append(func)
    func = _PRCTL[0]
    return func is not None and func(option, value, 0, 0, 0) == 0


def end_own_children(timeout=2.0):
    """In a job process that is a child subreaper (no cgroup): kill and reap
    every process below it (everything the job started that outlived its
    parent came back to it).  A single waitpid when there is none."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except OSError:     # ChildProcessError: none is left
            return
        if pid:
            continue        # reaped one; look again
        for child in direct_children(os.getpid()):
            kill_tree(child, signal.SIGKILL)
        time.sleep(0.005)


class Children:
    """The node process's own children, so that a node that is PID 1 (a
    container without an init) can reap the orphans that reparent to it
    without taking the exit status of a worker, which its Popen waits for.
    Every child the node process starts goes through ``start``; ``reap``
    (the timer, PID 1 only) waits only for zombies that ``start`` did not
    make.  A start in progress (forked, pid not yet known) makes ``reap``
    skip its round, so a brand-new worker is never taken for an orphan."""

    def __init__(self):
        self.lock = threading.Lock()
        self.procs = weakref.WeakSet()      # Popen objects of our own children
        self.starting = 0                   # starts in progress
        self.started = 0                    # starts finished

    def start(self, *args, **kwargs):
        """subprocess.Popen(*args, **kwargs), as a known child."""
        with self.lock:
            self.starting += 1
        proc = None
        try:
            proc = subprocess.Popen(*args, **kwargs)    # (no lock held: it forks)
            return proc
        finally:
            with self.lock:
                self.starting -= 1
                self.started += 1
                if proc is not None:
                    self.procs.add(proc)

    def _known(self):
        """(pids of our children not yet waited for, start count), or None
        while a start is in progress."""
        with self.lock:
            if self.starting:
                return None
            return {p.pid for p in self.procs if p.returncode is None}, self.started

    def _unchanged(self, started):
        with self.lock:
            return not self.starting and self.started == started

    @staticmethod
    def _zombie_children(proc='/proc'):
        me = os.getpid()
        found = []
        try:
            names = os.listdir(proc)
        except OSError:
            return found
        for name in names:
            if not name.isdigit():
                continue
            try:
                with open(os.path.join(proc, name, 'stat'), 'rb') as fh:
                    fields = fh.read().rsplit(b')', 1)[1].split()
            except (OSError, IndexError):
                continue
            if fields[0] == b'Z' and int(fields[1]) == me:
                found.append(int(name))
        return found

    def reap(self, limit=1024):
        """Wait for (at most ``limit``) orphans that have exited; returns
        how many.  os.waitid with WNOWAIT peeks at a zombie without taking
        it; a zombie of our own (a worker its Popen has not waited for yet)
        hides the others from the peek, so then /proc names them."""
        reaped = 0
        while reaped < limit:
            try:
                info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                break
            known = self._known() if info is not None else None
            if known is None:
                break
            pids, started = known
            orphans = [info.si_pid] if info.si_pid not in pids else [
                pid for pid in self._zombie_children() if pid not in pids][:limit - reaped]
            if not orphans or not self._unchanged(started):
                break
            for pid in orphans:
                try:
                    _, status = os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    continue
                reaped += 1
                logger.debug('reaped orphan process %d (wait status %d)', pid, status)
            if info.si_pid in pids:
                break       # the scan found them all
        return reaped


CHILDREN = Children()


# ---------------------------------------------------------------- thread pools, counters, logs

class TaskPool:
    """A named, capped pool of helper threads with a bounded queue.

    Like execnet's ``WorkerPool``: threads start only when no idle one is
    waiting, never more than ``max_threads``; an idle thread ends after
    ``idle_seconds``.  ``submit`` refuses (returns False) when the pool is
    closing, its queue is full, or a task with the same ``key`` is already
    queued or running, so work triggered from outside can be deduplicated
    and can never grow threads or memory without bound.  With
    ``drop_oldest`` a full queue drops its oldest task instead: after a
    flood of unauthenticated requests the newest ones (a real client's)
    are served first.
    """

    def __init__(self, name, max_threads, max_queued, idle_seconds=10.0, drop_oldest=False):
        self.name, self.max_threads, self.max_queued = name, max_threads, max_queued
        self.idle_seconds = idle_seconds
        self.drop_oldest = drop_oldest
        lock = threading.Lock()
        self.cond = threading.Condition(lock)           # tasks queued, or closing
        self.started = threading.Condition(lock)        # a new thread has started
        self.tasks = collections.deque()
        self.keys = set()
        self.threads = set()
        self.starting = 0           # threads in self.threads whose start() runs
        self.idle = 0
        self.closed = False
        self._serial = 0

    def submit(self, func, *args, key=None):
        with self.cond:
            if self.closed or (key is not None and key in self.keys):
                return False
            if len(self.tasks) >= self.max_queued:
                if not self.drop_oldest:
                    return False
                dropped_key = self.tasks.popleft()[2]
                self.keys.discard(dropped_key)
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
            self.starting += 1
        ok = False
        try:
            thread.start()
            ok = True
        finally:
            with self.cond:
                self.starting -= 1
                if not ok:
                    self.threads.discard(thread)
                self.started.notify_all()
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
        deadline = time.monotonic() + timeout
        with self.cond:
            self.closed = True
            self.cond.notify_all()
            # A thread submit() has just made may not have started: join()
            # would raise.  Its start takes moments, not the timeout.
            self.started.wait_for(lambda: not self.starting, timeout)
            threads = list(self.threads)
        for thread in threads:
            # not alive: finished, or still starting past the timeout (it
            # runs what is queued, then ends); join() would raise on it
            if thread is not threading.current_thread() and thread.is_alive():
                thread.join(max(0.0, deadline - time.monotonic()))

    def thread_count(self):
        with self.cond:
            return len(self.threads)


class RateGate:
    """Admits an event from ``key`` at most once per ``interval`` seconds,
    and all events together at ``rate`` per second (bursts of ``burst``).
    Its memory is bounded: keys older than the interval are forgotten."""

    MAX_KEYS = 4096

    def __init__(self, interval, rate, burst):
        self.interval, self.rate, self.burst = interval, rate, burst
        self.lock = threading.Lock()
        self.last = collections.OrderedDict()    # key -> last admitted time
        self.tokens, self.filled = float(burst), time.monotonic()

    def allow(self, key):
        now = time.monotonic()
        with self.lock:
            while self.last and (now - next(iter(self.last.values())) >= self.interval
                                 or len(self.last) >= self.MAX_KEYS):
                self.last.popitem(last=False)
            if key in self.last:
                return False
            self.tokens = min(self.burst, self.tokens + (now - self.filled) * self.rate)
            self.filled = now
            if self.tokens < 1:
                return False
            self.tokens -= 1
            self.last[key] = now
            return True


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

class Phase(enum.Enum):
    """Where a computation is in its life; NodeState moves it, along
    TRANSITIONS only."""
    NEW = 'new'              # built from a COMPUTE, not yet claimed
    ACTIVE = 'active'        # takes files and jobs
    ZOMBIE = 'zombie'        # closed, silent or dropped: no new jobs; retires once they end
    RETIRING = 'retiring'    # retire() is ending its worker and removing its files
    DETACHED = 'detached'    # retired (or restored from disk) with stored results only
    GONE = 'gone'            # nothing left on the node


# The allowed phase changes; NodeState refuses any other.
TRANSITIONS = {
    Phase.NEW: {Phase.ACTIVE},                       # claim
    Phase.ACTIVE: {Phase.ZOMBIE,                     # CLOSE, silence, failed setup, evict
                   Phase.GONE},                      # unclaim: the COMPUTE failed after all
    Phase.ZOMBIE: {Phase.RETIRING,                   # no job left running
                   Phase.DETACHED, Phase.GONE},      # the node shuts down
    Phase.RETIRING: {Phase.DETACHED, Phase.GONE},    # results stored, or none
    Phase.DETACHED: {Phase.GONE},                    # last result delivered, or CLOSE
    Phase.GONE: {Phase.DETACHED},                    # a reply stored after retirement
}


class Do(enum.Enum):
    """The I/O a NodeState transition leaves to its caller (never done
    under the state lock)."""
    SAVE_RECORD = 'save the computation record'
    REMOVE_RECORD = 'remove the computation record'
    REMOVE_REPLY = 'remove the stored reply file'
    REMOVE_FILES = 'remove the transferred files'
    ANNOUNCE = 'the node became free: announce it'
    TERMINATED = 'send the client TERMINATED'
    LOG_DROP = 'log that the node drops it'


class Change:
    """What a NodeState transition did: false if it was refused; ``todo``
    holds Do steps for the caller, ``uids`` the jobs to kill."""
    __slots__ = ('ok', 'todo', 'uids')

    def __init__(self, ok=True, todo=(), uids=()):
        self.ok, self.todo, self.uids = ok, frozenset(todo), tuple(uids)

    def __bool__(self):
        return self.ok

    def __contains__(self, step):
        return step in self.todo

    def __repr__(self):
        return 'Change(%s, %s)' % (self.ok, sorted(d.name for d in self.todo))


REFUSED = Change(False)


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
        self.dir_id = None      # (st_dev, st_ino) of the directory the node made for it
        self.keep_files = compute.cleanup is False
        self.has_cleanup = isinstance(compute.cleanup, dc.Function)
        # Setup's state lives only in its worker: a computation with setup
        # ends when that worker dies; one without gets a fresh worker.
        self.has_setup = isinstance(getattr(compute, 'setup', None), dc.Function)
        self.compute_bytes = None  # the COMPUTE payload and code, for a replacement worker
        self.code = None
        self.worker_restarts = 0
        self.rejoin = False        # its worker died: the client is invited back once it retires
        self.worker_ready = threading.Event()  # clear while a dead worker is replaced
        self.worker_ready.set()
        self.pulse_interval = compute.pulse_interval
        self.sign = sign
        self.program = None
        if compute.type == dc.Compute.prog_type:
            self.program = os.path.join(dest_path, safe_basename(compute.name) or 'program')
        self.xfer_names = [safe_basename(xf.name, xf.sep) for xf in compute.xfer_files]
        # Everything sent to us for it (depends, the program, per-job files):
        # what close removes; files its jobs wrote stay, as on the original.
        self.transferred = set(n for n in self.xfer_names if n)
        if self.program:
            self.transferred.add(os.path.basename(self.program))
        self.last_pulse = time.monotonic()
        self.last_resend = float('-inf')
        self.phase = Phase.NEW
        # Why it became a zombie, when not by its client's CLOSE; either
        # makes retirement tell the client TERMINATED.
        self.timed_out = False     # the client fell silent
        self.evicted = None        # the node dropped it (see Node.evict)
        self.node_ip = None        # our address as this client knows it (Node.ip_of)
        self.dropped = set()       # uids killed by evict: their replies are not sent
        self.unacked = collections.Counter()  # uid -> sends the client did not ACK
        self.running = set()       # uids of running jobs
        self.stored = set()        # uids with a stored, undelivered reply
        self.file_uses = collections.Counter()
        self.worker = None
        self.outcomes = collections.Counter()   # job status name -> count
        self.started = time.time()

    @property
    def reply_addr(self):
        return (self.scheduler_ip, self.result_port)

    def record(self):
        """Plain data written to the store (never the secret)."""
        return {'id': self.id, 'auth': self.auth, 'name': self.name, 'type': self.type,
                'scheduler_ip': self.scheduler_ip, 'scheduler_port': self.scheduler_port,
                'result_port': self.result_port, 'dest_path': self.dest_path,
                'keep_files': self.keep_files, 'sign': self.sign,
                'transferred': sorted(self.transferred)}

    @classmethod
    def from_record(cls, rec):
        comp = cls.__new__(cls)
        comp.__init__(dc.Compute(id=rec['id'], auth=rec['auth'], name=rec['name'],
                                 type=rec['type'], scheduler_ip_addr=rec['scheduler_ip'],
                                 scheduler_port=rec['scheduler_port'],
                                 job_result_port=rec['result_port'],
                                 cleanup=not rec['keep_files'], xfer_files=[]),
                      rec['dest_path'], rec['sign'])
        comp.phase = Phase.DETACHED     # an earlier run's: only its stored results remain
        transferred = rec.get('transferred')    # absent from older records
        if isinstance(transferred, list):
            comp.transferred.update(n for n in transferred if safe_basename(n) == n)
        return comp


class JobEntry:
    __slots__ = ('uid', 'hash', 'compute_id', 'files', 'start', 'unacknowledged', 'answered')

    def __init__(self, uid, job_hash, compute_id, files):
        self.uid, self.hash, self.compute_id, self.files = uid, job_hash, compute_id, files
        self.start = time.time()
        # The client never got our ACK: it will run the job elsewhere, and
        # a reply from here would only be stored for nobody.
        self.unacknowledged = False
        # Set once the JOB request was answered (Node.admit_job makes it):
        # its reply must not reach the client before the ACK does.
        self.answered = None


class NodeState:
    """All mutable node state, guarded by one lock.  No I/O happens while
    the lock is held; methods return what the caller must then do.

    Every phase change of a computation is a method here (claim, unclaim,
    mark_zombie, zombies, evict, begin_retire, retire_detach, shut_down,
    adopt, add_stored, drop_stored, forget); each checks TRANSITIONS and
    returns a Change naming the I/O left to the caller.  ``active`` holds
    the ACTIVE, ZOMBIE and RETIRING computations, ``detached`` the
    DETACHED ones; ``_move`` keeps both in step with the phase."""

    def __init__(self, cpus):
        self.lock = threading.Lock()
        self.cpus = cpus
        self.avail_cpus = cpus
        self.scheduler = None        # (ip, port) of the one client served
        self.active = {}             # compute id -> Computation
        self.detached = {}           # closed or restored, with stored results
        self.jobs = {}               # uid -> JobEntry
        self.draining = False        # set by Node.drain: start_job refuses from then on

    def _move(self, comp, phase, *sources):
        """Move ``comp`` to ``phase`` if TRANSITIONS allows it and it is in
        one of ``sources`` (the phases the caller's transition starts from;
        any if none given), keeping ``active``, ``detached`` and
        ``scheduler`` in step (lock held).  False if refused."""
        if phase not in TRANSITIONS[comp.phase] or sources and comp.phase not in sources:
            logger.debug('computation %s: %s -> %s refused', comp.id, comp.phase.name,
                         phase.name)
            return False
        comp.phase = phase
        if phase is Phase.ACTIVE:
            self.active[comp.id] = comp
            self.scheduler = (comp.scheduler_ip, comp.scheduler_port)
        elif phase in (Phase.DETACHED, Phase.GONE):
            if self.active.get(comp.id) is comp:
                del self.active[comp.id]
            if phase is Phase.DETACHED:
                self.detached[comp.id] = comp
            elif self.detached.get(comp.id) is comp:
                del self.detached[comp.id]
            if not self.active:
                self.scheduler = None
        return True

    def is_free(self):
        with self.lock:
            return self.scheduler is None and self.avail_cpus == self.cpus

    def busy_cpus(self):
        with self.lock:
            return self.cpus - self.avail_cpus

    def phase_of(self, comp):
        with self.lock:
            return comp.phase

    # -- transitions
    def claim(self, comp):
        """NEW -> ACTIVE: register a new computation; returns None or a
        refusal."""
        with self.lock:
            if self.scheduler not in (None, (comp.scheduler_ip, comp.scheduler_port)):
                return b'Busy'
            if len(self.active) >= MAX_COMPUTATIONS:
                return b'NAK (too many computations: at most %d at once)' % MAX_COMPUTATIONS
            if comp.id in self.active or not self._move(comp, Phase.ACTIVE, Phase.NEW):
                return b'NAK (computation %s already exists)' % str(comp.id).encode()
            return None

    def unclaim(self, comp):
        """ACTIVE -> GONE: the COMPUTE failed after its claim (the client
        never got our ACK, so nobody is told)."""
        with self.lock:
            if not self._move(comp, Phase.GONE, Phase.ACTIVE):
                return REFUSED
            return Change(todo=(Do.REMOVE_RECORD, Do.REMOVE_FILES))

    def mark_zombie(self, comp):
        """ACTIVE -> ZOMBIE: its client closed it, or its setup failed."""
        with self.lock:
            if not self._move(comp, Phase.ZOMBIE, Phase.ACTIVE):
                return REFUSED
            return Change()

    def zombies(self, interval):
        """ACTIVE -> ZOMBIE for each computation whose client was silent for
        ``interval`` seconds; returns them (each once)."""
        now = time.monotonic()
        with self.lock:
            found = [c for c in self.active.values()
                     if c.phase is Phase.ACTIVE and now - c.last_pulse > interval]
            for comp in found:
                self._move(comp, Phase.ZOMBIE, Phase.ACTIVE)
                comp.timed_out = True
            return found

    def evict(self, comp, reason, kill_jobs):
        """ACTIVE or ZOMBIE -> ZOMBIE, dropped by the node for ``reason``
        (the first one given is kept).  ``uids``: the jobs to kill."""
        with self.lock:
            if comp.phase is not Phase.ZOMBIE and not self._move(comp, Phase.ZOMBIE,
                                                                 Phase.ACTIVE):
                return REFUSED
            todo = []
            if comp.evicted is None:
                comp.evicted = reason
                todo.append(Do.LOG_DROP)
            uids = sorted(comp.running) if kill_jobs else ()
            comp.dropped.update(uids)
            return Change(todo=todo, uids=uids)

    def begin_retire(self, comp):
        """ZOMBIE -> RETIRING, once, when no job of ``comp`` runs."""
        with self.lock:
            if comp.running or not self._move(comp, Phase.RETIRING, Phase.ZOMBIE):
                return REFUSED
            return Change(todo=(Do.REMOVE_FILES,))

    def retire_detach(self, comp):
        """RETIRING -> DETACHED if ``comp`` holds stored results, else GONE,
        decided under the lock (the caller holds Workspace.lock too, so no
        reply is stored between this decision and its record's write)."""
        with self.lock:
            keep, was_busy = bool(comp.stored), self.scheduler is not None
            if not self._move(comp, Phase.DETACHED if keep else Phase.GONE, Phase.RETIRING):
                return REFUSED
            todo = [Do.SAVE_RECORD if keep else Do.REMOVE_RECORD]
            if was_busy and self.scheduler is None:
                todo.append(Do.ANNOUNCE)
            if comp.timed_out or comp.evicted:
                todo.append(Do.TERMINATED)
            return Change(todo=todo)

    def shut_down(self, comp):
        """ZOMBIE (or RETIRING) -> DETACHED or GONE as the node stops: the
        record stays for stored results, else it and the files go."""
        with self.lock:
            keep = bool(comp.stored)
            if not self._move(comp, Phase.DETACHED if keep else Phase.GONE,
                              Phase.ZOMBIE, Phase.RETIRING):
                return REFUSED
            return Change(todo=(Do.SAVE_RECORD,) if keep else
                          (Do.REMOVE_RECORD, Do.REMOVE_FILES))

    def adopt(self, comp):
        """A computation restored from an earlier run's record: DETACHED
        from the start."""
        with self.lock:
            if comp.phase is not Phase.DETACHED or comp.id in self.detached:
                return REFUSED
            self.detached[comp.id] = comp
            return Change()

    def add_stored(self, comp, uid):
        """Note a stored reply.  A computation already retired (GONE) comes
        back as DETACHED, reachable for recovery; once retirement has begun
        its record must be (re)saved, as retire may have removed it."""
        with self.lock:
            comp.stored.add(uid)
            if comp.phase is Phase.GONE:
                self._move(comp, Phase.DETACHED, Phase.GONE)
            if comp.phase in (Phase.RETIRING, Phase.DETACHED):
                return Change(todo=(Do.SAVE_RECORD,))
            return Change()

    def drop_stored(self, comp, uid):
        """Forget a delivered result (before its file goes: a RESEND count
        must not include it).  DETACHED -> GONE when nothing is left."""
        with self.lock:
            todo = [Do.REMOVE_REPLY] if uid in comp.stored else []
            comp.stored.discard(uid)
            comp.unacked.pop(uid, None)
            if not comp.stored and comp.phase is Phase.DETACHED:
                self._move(comp, Phase.GONE, Phase.DETACHED)
                todo += [Do.REMOVE_RECORD, Do.REMOVE_FILES]
            return Change(todo=todo)

    def forget(self, comp):
        """DETACHED -> GONE if ``comp`` holds no stored result (its client
        closed it after recovering them)."""
        with self.lock:
            if comp.stored or not self._move(comp, Phase.GONE, Phase.DETACHED):
                return REFUSED
            return Change(todo=(Do.REMOVE_RECORD, Do.REMOVE_FILES))

    # -- questions about phases
    def is_detached(self, comp):
        with self.lock:
            return comp.phase is Phase.DETACHED and self.detached.get(comp.id) is comp

    def retire_due(self, comp):
        """True if ``comp`` is a zombie whose last job has ended."""
        with self.lock:
            return comp.phase is Phase.ZOMBIE and not comp.running

    def to_evict(self):
        """The computations a node-side drop still applies to."""
        with self.lock:
            return [c for c in self.active.values()
                    if c.evicted is None and c.phase in (Phase.ACTIVE, Phase.ZOMBIE)]

    def find(self, compute_id, auth=None, include_detached=False):
        if not isinstance(compute_id, int):
            return None
        with self.lock:
            comp = self.active.get(compute_id)
            if comp is None and include_detached:
                comp = self.detached.get(compute_id)
        if comp is not None and auth is not None and not (
                isinstance(auth, str) and isinstance(comp.auth, str)
                and dc.compare_digest(comp.auth.encode(), auth.encode('utf-8', 'replace'))):
            return None
        return comp

    # -- jobs and files
    def start_job(self, comp, entry):
        with self.lock:
            if self.draining:
                return b'NAK (node is draining)'
            if self.avail_cpus <= 0:
                return b'NAK (all cpus busy)'
            if self.active.get(comp.id) is not comp or comp.phase is not Phase.ACTIVE:
                return b'NAK (invalid computation %s)' % str(comp.id).encode()
            if entry.uid in self.jobs:
                return b'NAK (duplicate job %s)' % str(entry.uid).encode()
            self.avail_cpus -= 1
            self.jobs[entry.uid] = entry
            comp.running.add(entry.uid)
            comp.last_pulse = time.monotonic()     # a job is as good as a pulse
            for name in entry.files:
                comp.file_uses[name] += 1
            return None

    def finish_job(self, uid, compute_id=None):
        """Free the job's CPU (if it is a job of ``compute_id``, when given:
        a worker ends only its own computation's jobs).  Returns (entry,
        comp, files to delete)."""
        with self.lock:
            entry = self.jobs.get(uid)
            if entry is None or compute_id is not None and entry.compute_id != compute_id:
                return None, None, []
            del self.jobs[uid]
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

    def note_transfer(self, comp, name):
        with self.lock:
            comp.transferred.add(name)

    def transferred(self, comp):
        with self.lock:
            return sorted(comp.transferred)

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

    # -- stored results
    def is_stored(self, comp, uid):
        with self.lock:
            return uid in comp.stored

    def resend_due(self, comp, interval, active_only=False):
        """True (and the clock restarted) if ``comp`` holds stored results
        last resent at least ``interval`` seconds ago (and, if
        ``active_only``, is still ACTIVE)."""
        now = time.monotonic()
        with self.lock:
            if not comp.stored or now - comp.last_resend < interval \
                    or active_only and comp.phase is not Phase.ACTIVE:
                return False
            comp.last_resend = now
            return True

    def stored_uids(self, comp, limit=64, exhausted=True):
        """The first ``limit`` uids with stored replies; with ``exhausted``
        false, not those sent MAX_REPLY_ATTEMPTS times without an ACK."""
        with self.lock:
            uids = comp.stored if exhausted else [
                u for u in comp.stored if comp.unacked[u] < MAX_REPLY_ATTEMPTS]
            return sorted(uids)[:limit]

    def note_unacked(self, comp, uid, fresh=False):
        """Count a send of ``uid``'s reply that the client did not ACK
        (``fresh``: the first of a new reply, as the client reuses uids)."""
        with self.lock:
            comp.unacked[uid] = 1 if fresh else comp.unacked[uid] + 1
            return comp.unacked[uid]

    def progress(self, comp, limit=50):
        """(the first ``limit`` uids with stored results, how many are
        stored, how many jobs run), read together."""
        with self.lock:
            return sorted(comp.stored)[:limit], len(comp.stored), len(comp.running)

    def client(self):
        """(ip, port) of the client served, or None."""
        with self.lock:
            return self.scheduler

    def snapshot(self):
        with self.lock:
            return list(self.active.values()), list(self.detached.values())

    # -- observing (status, metrics, log lines)
    def note_outcome(self, comp, outcome):
        with self.lock:
            comp.outcomes[outcome] += 1

    def observe(self):
        """Plain data for the status query and the metrics endpoint."""
        now = time.time()
        names = {Phase.ACTIVE: 'running', Phase.ZOMBIE: 'closing', Phase.RETIRING: 'closing',
                 Phase.DETACHED: 'closed, results stored'}
        with self.lock:
            comps = []
            for comp in list(self.active.values()) + list(self.detached.values()):
                comps.append({'id': comp.id, 'name': comp.name,
                              'client': '%s:%s' % (comp.scheduler_ip, comp.scheduler_port),
                              'state': names.get(comp.phase, comp.phase.value),
                              'jobs_running': len(comp.running),
                              'jobs_done': sum(comp.outcomes.values()),
                              'jobs_by_outcome': dict(comp.outcomes),
                              'stored': len(comp.stored),
                              'seconds': round(now - comp.started, 3)})
            jobs = [{'uid': e.uid, 'computation': e.compute_id,
                     'seconds': round(now - e.start, 3)} for e in self.jobs.values()]
            return {'cpus': self.cpus, 'cpus_busy': self.cpus - self.avail_cpus,
                    'client': '%s:%s' % self.scheduler if self.scheduler else None,
                    'computations': comps, 'jobs_running': jobs,
                    'stored_results': sum(c['stored'] for c in comps)}


# ---------------------------------------------------------------- workspace

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_NOFOLLOW | os.O_CLOEXEC
STORE_DIR = '.replies'               # <prefix>/.replies/<id>_<auth>/_dispy_job_reply_<uid>
STORE_KEY = '.dispynode-store-key'   # <prefix>/.dispynode-store-key: the stored replies' MAC key
_MAC_TAG = b'dispynode stored reply v1'


def _close_fds(fds):
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def _names_at(dir_fd, prefix):
    """The names in the directory ``dir_fd`` that start with ``prefix``
    (a job may fill its directory: only the matches are kept)."""
    with os.scandir(dir_fd) as entries:
        return [e.name for e in entries if e.name.startswith(prefix)]


def _unlink_at(name, dir_fd):
    """Remove ``name`` (never a directory) from the directory ``dir_fd``:
    a symlink is removed itself, not followed."""
    try:
        if not stat.S_ISDIR(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode):
            os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass


def reply_mac(key, compute_id, auth, uid, job_hash, reply):
    """HMAC-SHA256 binding a stored reply to its computation (id and auth)
    and its job (uid, hash): a reply file moved to another computation or
    uid, or written by anyone without the node's key, does not verify."""
    import hmac
    parts = [_MAC_TAG, str(compute_id).encode(), str(auth).encode(), str(uid).encode(),
             str(job_hash).encode('utf-8', 'surrogatepass'), bytes(reply)]
    return hmac.new(key, b''.join(struct.pack('>Q', len(p)) + p for p in parts),
                    'sha256').digest()


class Workspace:
    """Everything the node keeps on disk under ``--dest_path_prefix``,
    with one lock for it.  The layout::

        <prefix>/<client ip>/<dest_path, or name_XXXXXXXX>/   a computation's
            directory: transferred files and the jobs' own files.  Every
            level above it is the node's (0711 with --job_user: the job
            user may pass, not list, rename or replace); the directory is
            the job user's (0700) while the computation runs, the node's
            (0700: closed) once it ended, and the job user's again when a
            computation of the same client address names it again
        <prefix>/.replies/<compute_id>_<auth>/_dispy_job_reply_<uid>   an
            undelivered reply (0700 / 0600, the node's: no job can reach
            it): {'uid', 'hash', 'compute_id', 'reply', 'mac'}, ``reply``
            the job's pickled _JobReply, ``mac`` reply_mac() with the key in
        <prefix>/.dispynode-store-key   (0600, made at the first stored reply)
        <prefix>/<compute_id>_<auth>          a computation's record (plain data)
        <any of these>.corrupt-<time>         an unreadable or forged file, moved aside

    (Replies of a node before this layout lie in the computation's
    directory; ``restore`` moves those it can trust into the store.)
    Root never follows a path that a job can change: inside the prefix
    every directory is opened one level at a time relative to the one
    above, with O_NOFOLLOW (``_walk``), and a computation's directory must
    be the very one the node made (st_dev, st_ino in ``comp.dir_id``);
    files in it are created, replaced and removed through that descriptor.

    Every write is atomic; unreadable files are moved aside, not fatal.
    ``lock`` serialises creating, pruning and storing into computation
    directories, and each record decision (settle, store_reply,
    drop_reply) with the NodeState transition that makes it: so a reply
    stored while retire decides about its record either comes before the
    decision (the record stays) or after it (and saves the record again).
    Lock order: Workspace.lock, then NodeState.lock, never the reverse.
    """

    def __init__(self, prefix, job_user=None):
        self.prefix = prefix
        self.job_user = job_user
        self.lock = threading.Lock()
        self.store = os.path.join(prefix, STORE_DIR)
        self._key = None
        # with --job_user: levels above computation directories are root's
        self.level_owner = (os.geteuid(), os.getegid()) if job_user else None
        self.level_mode = 0o711 if job_user else 0o700
        self.job_owner = (job_user.uid, job_user.gid) if job_user else None
        # whether another computation still works in comp's directory (Node
        # sets it: a dest_path named by two running computations stays open)
        self.shared = lambda comp: False

    # -- descriptor-relative directories
    def _parts(self, path):
        """``path`` as the levels below the prefix, or None if it is not
        strictly inside it."""
        if not isinstance(path, str) or not os.path.isabs(path):
            return None
        rel = os.path.relpath(path, self.prefix)
        parts = rel.split(os.sep)
        if any(p in ('', '.', '..') for p in parts):
            return None
        return parts

    def _walk(self, parts, create=False, exclusive=False, leaf_owner=None, leaf_mode=None):
        """Descriptors of the prefix and of each level of ``parts`` below it
        (the caller closes them: _close_fds), each opened relative to the
        one above with O_NOFOLLOW: a symlink anywhere is an OSError (ELOOP
        or ENOTDIR), never followed.  With ``create``, missing levels are
        made (``exclusive``: the last must be new), every level above the
        last becomes the node's with level_mode (one that a job user owned
        under an earlier version is taken back), and the last gets
        ``leaf_owner`` (uid, gid) and ``leaf_mode``."""
        fds = [os.open(self.prefix, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)]
        try:
            for i, part in enumerate(parts):
                last = i == len(parts) - 1
                if create:
                    try:
                        os.mkdir(part, 0o700, dir_fd=fds[-1])
                    except FileExistsError:
                        if exclusive and last:
                            raise
                fds.append(os.open(part, _DIR_FLAGS, dir_fd=fds[-1]))
                if create or last:
                    owner, mode = (leaf_owner, leaf_mode) if last else \
                        (self.level_owner, self.level_mode)
                    self._own(fds[-1], owner, mode)
        except BaseException:  # whatever failed: no descriptor leaks, then re-raise
            _close_fds(fds)
            raise
        return fds

    @staticmethod
    def _own(fd, owner, mode):
        st = os.fstat(fd)
        if owner is not None and (st.st_uid, st.st_gid) != owner:
            os.fchown(fd, *owner)
        if mode is not None and stat.S_IMODE(st.st_mode) != mode:
            os.fchmod(fd, mode)

    def _open_comp(self, comp, quiet=False):
        """Descriptors down to ``comp``'s directory (see _walk), or None if
        it is gone or is not the directory the node made for it."""
        parts = self._parts(comp.dest_path)
        if parts is None:
            return None
        try:
            fds = self._walk(parts)
        except FileNotFoundError:
            return None
        except OSError as exc:
            if not quiet:
                logger.warning('not using %s: %s (a symlink?)', comp.dest_path, exc)
            return None
        ident = getattr(comp, 'dir_id', None)
        st = os.fstat(fds[-1])
        if ident is not None and (st.st_dev, st.st_ino) != tuple(ident):
            _close_fds(fds)
            if not quiet:
                logger.warning('not using %s: it is not the directory made for computation '
                               '%s (it was replaced)', comp.dest_path, comp.id)
            return None
        return fds

    @contextlib.contextmanager
    def opened(self, comp):
        """The descriptor of ``comp``'s directory (None if unusable)."""
        fds = self._open_comp(comp)
        try:
            yield fds[-1] if fds else None
        finally:
            _close_fds(fds or ())

    # -- computation directories
    def make_computation_dir(self, compute):
        """``<prefix>/<client ip>/<dest_path or a new temp dir>``, created one
        level at a time without following a symlink anywhere (a job may have
        planted one), so nothing is ever created outside the prefix.
        Returns (path, (st_dev, st_ino)), or None for an unusable dest_path."""
        with self.lock:
            ip = compute.scheduler_ip_addr
            try:
                here = bool(compute.dest_path) and is_here(compute.dest_path)
                if here and not self.job_user:
                    # '.': the client's own level, as on the original
                    path = os.path.join(self.prefix, ip)
                    fds = self._walk([ip], True, False, self.level_owner, self.level_mode)
                elif compute.dest_path and not here:
                    path = confined_join(os.path.join(self.prefix, ip), compute.dest_path)
                    parts = self._parts(path) if path else None
                    if parts is None:
                        return None
                    fds = self._walk(parts, True, False, self.job_owner, 0o700)
                else:
                    # no dest_path, or '.' with --job_user, where the client's
                    # level is the node's (it holds the client's other
                    # computations): a new private directory, so the jobs run
                    # (a refusal would leave them Created at the 4.5.5 client)
                    if here:
                        logger.info("dest_path '.' of computation %s runs in a directory of "
                                    "its own under --job_user", compute.id)
                    stem = re.sub(r'[^A-Za-z0-9_.-]', '_', os.path.basename(compute.name))[:40]
                    for _ in range(100):
                        name = '%s_%s' % (stem, base64.b32encode(os.urandom(5)).decode().lower())
                        try:
                            fds = self._walk([ip, name], True, True, self.job_owner, 0o700)
                            break
                        except FileExistsError:
                            continue
                    else:
                        raise FileExistsError('no free directory name for %s' % stem)
                    path = os.path.join(self.prefix, ip, name)
            except OSError as exc:
                if exc.errno in (_errno.ELOOP, _errno.ENOTDIR):
                    logger.warning('refusing dest_path %s: %s (a symlink?)',
                                   compute.dest_path, exc)
                    return None
                raise
            try:
                st = os.fstat(fds[-1])
            finally:
                _close_fds(fds)
            return path, (st.st_dev, st.st_ino)

    def close_dir(self, comp):
        """With --job_user, a computation that ended gives its directory
        back to the node (0700), so no later job reads what it left; a
        computation that names the same directory again reopens it."""
        if not self.job_user or self.shared(comp):
            return
        fds = self._open_comp(comp, quiet=True)
        if fds:
            try:
                self._own(fds[-1], self.level_owner, 0o700)
            except OSError as exc:
                logger.warning('could not close %s: %s', comp.dest_path, exc)
            finally:
                _close_fds(fds)

    def remove_files(self, comp, names):
        """Remove what was transferred for a computation (``names``:
        depends, the program, per-job files; their bytecode) and our temp
        files, unless the client asked to keep them with cleanup=False.
        Files its jobs wrote stay, as on the original, in a named or a
        default directory alike.  The directory goes once empty, and so do
        its empty parents below the prefix.  All through descriptors: a
        planted ``__pycache__`` symlink is not followed."""
        if comp.keep_files:
            return
        with self.lock:
            fds = self._open_comp(comp)
            if not fds:
                return
            try:
                self._remove_in(fds[-1], names)
                parts = self._parts(comp.dest_path)
                for level in range(len(parts) - 1, -1, -1):
                    try:
                        os.rmdir(parts[level], dir_fd=fds[level])
                    except OSError:
                        break   # not empty: the jobs' files remain
            finally:
                _close_fds(fds)

    @staticmethod
    def _remove_in(dfd, names):
        victims = list(names)
        stems = []
        for name in names:
            stem, ext = os.path.splitext(name)
            if ext == '.py':
                victims.append(name + 'c')
                stems.append(stem + '.')
        victims.extend(_names_at(dfd, '.tmp-'))
        for name in victims:
            try:
                _unlink_at(name, dfd)
            except OSError as exc:
                logger.warning('could not remove %s: %s', name, exc)
        if not stems:
            return
        try:
            cfd = os.open('__pycache__', _DIR_FLAGS, dir_fd=dfd)
        except OSError:
            return      # none, or not a real directory (a planted symlink): left alone
        try:
            for name in _names_at(cfd, ''):
                if name.endswith('.pyc') and any(name.startswith(s) for s in stems):
                    try:
                        _unlink_at(name, cfd)
                    except OSError as exc:
                        logger.warning('could not remove __pycache__/%s: %s', name, exc)
        finally:
            os.close(cfd)
        try:
            os.rmdir('__pycache__', dir_fd=dfd)
        except OSError:
            pass

    def remove_job_files(self, comp, names):
        """Remove per-job files no running job of ``comp`` uses any more
        (NodeState.finish_job names them).  Without the lock: each is one
        unlink of a name only this computation's jobs use, and the lock
        may be held by a store's fsync."""
        if not names:
            return
        fds = self._open_comp(comp)
        if not fds:
            return
        try:
            for name in names:
                try:
                    _unlink_at(name, fds[-1])
                except OSError:
                    pass
        finally:
            _close_fds(fds)

    # -- records and replies, with the transitions that decide about them
    def settle(self, comp, transition):
        """Run the NodeState ``transition`` on ``comp`` and save or remove
        its record as the returned Change says, under the lock; a
        computation that ended closes its directory (close_dir)."""
        with self.lock:
            change = transition(comp)
            self._write_record(comp, change)
            if change and comp.phase in (Phase.DETACHED, Phase.GONE):
                self.close_dir(comp)
        return change

    def store_reply(self, comp, uid, job_hash, reply, note):
        """Store an undelivered reply, then ``note`` it (NodeState.add_stored)
        and (re)save the record if the Change asks, under the lock.  Raises
        OSError if the reply could not be written (then nothing is noted)."""
        with self.lock:
            self.save_reply(comp, uid, job_hash, reply)
            change = note(comp, uid)
            self._write_record(comp, change)
        return change

    def drop_reply(self, comp, uid, note):
        """A reply was delivered: ``note`` forgets it (NodeState.drop_stored)
        before its file goes (a crash in between only sends it again); the
        record goes too if the Change says so."""
        with self.lock:
            change = note(comp, uid)
            if Do.REMOVE_REPLY in change:
                self.remove_reply(comp, uid)
            self._write_record(comp, change)
        return change

    def _write_record(self, comp, change):
        if Do.SAVE_RECORD in change:
            self.save_computation(comp)
        elif Do.REMOVE_RECORD in change:
            self.remove_computation(comp)

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
        try:
            os.rmdir(self.store_path(comp))     # its stored replies are all gone
        except OSError:
            pass

    # The store is the node's alone (0700 directories under the prefix,
    # which no job can write), so plain paths are safe there.
    def store_path(self, comp):
        return os.path.join(self.store, '%d_%s' % (comp.id, comp.auth))

    def reply_path(self, comp, uid):
        return os.path.join(self.store_path(comp), '%s%d' % (REPLY_PREFIX, uid))

    def store_key(self):
        """The key of the stored replies' MACs: 32 random bytes in a 0600
        file of the node's, made (atomically) when first needed."""
        if self._key is not None:
            return self._key
        path = os.path.join(self.prefix, STORE_KEY)
        try:
            fd = os.open(path, os.O_RDONLY | _FILE_FLAGS)
        except FileNotFoundError:
            fd = None
        if fd is not None:
            try:
                st = os.fstat(fd)
                key = os.read(fd, 64)
            finally:
                os.close(fd)
            if stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid() \
                    and not st.st_mode & 0o077 and len(key) == 32:
                self._key = key
                return key
            self.quarantine(path, 'not a 32-byte 0600 file of the node\'s')
        key = os.urandom(32)
        fd, tmp = tempfile.mkstemp(prefix='.tmp-', dir=self.prefix)
        try:
            with os.fdopen(fd, 'wb') as fh:
                fh.write(key)
                fh.flush()
                os.fsync(fh.fileno())
            try:
                os.link(tmp, path)      # never over a key another start made meanwhile
            except FileExistsError:
                self._key = None
                return self.store_key()
        finally:
            os.unlink(tmp)
        fsync_dir(self.prefix)
        self._key = key
        return key

    def save_reply(self, comp, uid, job_hash, reply):
        directory = self.store_path(comp)
        for level in (self.store, directory):
            try:
                os.mkdir(level, 0o700)
            except FileExistsError:
                continue
            fsync_dir(os.path.dirname(level))   # the new directory survives a crash too
        rec = {'uid': uid, 'hash': job_hash, 'compute_id': comp.id, 'reply': reply,
               'mac': reply_mac(self.store_key(), comp.id, comp.auth, uid, job_hash, reply)}
        atomic_write(self.reply_path(comp, uid), dc.dumps_plain(rec))

    def load_reply(self, comp, uid):
        """The stored reply {'uid', 'hash', 'reply'} of job ``uid``, or
        None; a file that does not load, or whose MAC does not bind it to
        this computation and uid (moved or forged), is quarantined."""
        import hmac
        path = self.reply_path(comp, uid)
        try:
            with open(path, 'rb') as fh:
                rec = dc.loads_plain(fh.read())
            if not isinstance(rec, dict) or rec.get('uid') != uid \
                    or not isinstance(rec.get('reply'), bytes) \
                    or not isinstance(rec.get('hash'), str) \
                    or not isinstance(rec.get('mac'), bytes):
                raise ProtocolError('malformed reply record')
            mac = reply_mac(self.store_key(), comp.id, comp.auth, uid, rec['hash'],
                            rec['reply'])
            if rec.get('compute_id') != comp.id or not hmac.compare_digest(mac, rec['mac']):
                raise ProtocolError('its MAC does not match computation %s, job %s: moved '
                                    'or forged' % (comp.id, uid))
            return {'uid': uid, 'hash': rec['hash'], 'reply': rec['reply']}
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
            names = os.listdir(self.store_path(comp))
        except OSError:
            return set()
        return {int(n[len(REPLY_PREFIX):]) for n in names
                if n.startswith(REPLY_PREFIX) and n[len(REPLY_PREFIX):].isdigit()}

    def quarantine(self, path, why, dir_fd=None):
        aside = '%s.corrupt-%d' % (path, int(time.time()))
        logger.warning('moving unreadable store file %s aside to %s (%s)', path, aside, why)
        try:
            os.replace(path, aside, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except OSError as exc:
            logger.warning('could not move %s aside: %s', path, exc)

    def _migrate(self, comp, dfd):
        """Move replies that a node before the store kept in ``comp``'s
        directory into the store.  Only a file the node wrote can be
        trusted there: a regular 0600 file of the node's with one link,
        whose uid matches its name; anything else is moved aside."""
        for name in _names_at(dfd, REPLY_PREFIX):
            if not name[len(REPLY_PREFIX):].isdigit():
                continue
            uid = int(name[len(REPLY_PREFIX):])
            try:
                fd = os.open(name, os.O_RDONLY | _FILE_FLAGS | os.O_NONBLOCK, dir_fd=dfd)
                try:
                    st = os.fstat(fd)
                    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() \
                            or st.st_nlink != 1 or st.st_mode & 0o077:
                        raise ProtocolError('not a file the node wrote')
                    with os.fdopen(os.dup(fd), 'rb') as fh:
                        rec = dc.loads_plain(fh.read())
                finally:
                    os.close(fd)
                if not isinstance(rec, dict) or rec.get('uid') != uid \
                        or not isinstance(rec.get('reply'), bytes) \
                        or not isinstance(rec.get('hash'), str):
                    raise ProtocolError('malformed reply record')
            except (OSError, ProtocolError) as exc:
                self.quarantine(name, exc, dfd)
                continue
            self.save_reply(comp, uid, rec['hash'], rec['reply'])
            os.unlink(name, dir_fd=dfd)
            logger.info('moved the stored reply of job %d of computation %s into the store',
                        uid, comp.id)

    def restore(self):
        """Computation records left by an earlier run, as DETACHED
        Computations with their stored uids; a record with nothing stored
        is removed, with its transferred files."""
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
                if self._parts(comp.dest_path) is None:
                    raise ProtocolError('record points outside the prefix')
            except (OSError, ProtocolError, KeyError, TypeError, AttributeError) as exc:
                self.quarantine(path, exc)
                continue
            self.close_dir(comp)
            with self.opened(comp) as dfd:
                if dfd is not None:
                    for stray in _names_at(dfd, '.tmp-'):
                        _unlink_at(stray, dfd)
                    self._migrate(comp, dfd)
            for stray in _stray_temp_files(self.store_path(comp)):
                os.unlink(stray)
            comp.stored = self.stored_uids(comp)
            if comp.stored:
                found.append(comp)
            else:
                self.remove_files(comp, sorted(comp.transferred))
                self.remove_computation(comp)
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

# Modules and builtins a job's result may name that Python 3.6 (the legacy
# client) lacks: such a reply would fail to load there, and the client would
# show the job Running for ever.  Standard library additions since 3.6.
NEW_SINCE_36_MODULES = (
    '_abc', '_contextvars', '_interpreters', '_posixshmem', '_pydatetime', '_pylong',
    '_queue', '_sha2', '_statistics', '_tokenize', '_typing', '_uuid', '_zoneinfo',
    'contextvars', 'dataclasses', 'graphlib', 'tomllib', 'zoneinfo',
    'asyncio.exceptions', 'asyncio.mixins', 'asyncio.runners', 'asyncio.staggered',
    'asyncio.taskgroups', 'asyncio.threads', 'asyncio.timeouts', 'asyncio.trsock',
    'importlib.metadata', 'importlib.readers', 'importlib.resources',
    'importlib.simple', 'multiprocessing.resource_tracker',
    'multiprocessing.shared_memory', 'unittest.async_case')
NEW_SINCE_36_BUILTINS = (
    'BaseExceptionGroup', 'EncodingWarning', 'ExceptionGroup', 'PythonFinalizationError',
    '_IncompleteInputError', 'aiter', 'anext', 'breakpoint')
# numpy 2 names a 1.x reader lacks, once NUMPY_LEGACY_NAMES has renamed
# what 1.x has elsewhere (numpy 1.19.5 is the newest for Python 3.6).
NUMPY2_ONLY_MODULES = ('numpy._core', 'numpy.dtypes', 'numpy.exceptions')
# A protocol 4 pickle that refers to such a name spells it out once as a
# SHORT_BINUNICODE (0x8c, length, text) before it memoizes it, so one
# C-speed search rules out nearly every reply before any opcode is parsed
# (about 0.3 ms per MB of result; a result of many short strings costs more).
_NEW_SINCE_36_RE = re.compile(b'\\x8c.(?:%s)' % b'|'.join(
    re.escape(n.encode()) for n in NEW_SINCE_36_MODULES + NEW_SINCE_36_BUILTINS
    + NUMPY2_ONLY_MODULES), re.S)
_PICKLE_STRINGS = frozenset(('SHORT_BINUNICODE', 'BINUNICODE', 'BINUNICODE8', 'UNICODE',
                             'SHORT_BINSTRING', 'BINSTRING', 'STRING'))


def unloadable_on_36(data):
    """'module.name' of the first global in pickle ``data`` that Python 3.6
    cannot import, or None."""
    if not _NEW_SINCE_36_RE.search(data):
        return None
    import pickletools
    memo, recent = {}, [None, None]    # recent: the last two values pushed
    try:
        for op, arg, _ in pickletools.genops(data):
            name = op.name
            if name in _PICKLE_STRINGS:
                recent.append(arg)
            elif name in ('BINGET', 'LONG_BINGET', 'GET'):
                recent.append(memo.get(int(arg)))
            elif name == 'MEMOIZE':
                memo[len(memo)] = recent[-1]
                continue
            elif name in ('BINPUT', 'LONG_BINPUT', 'PUT'):
                memo[int(arg)] = recent[-1]
                continue
            elif name in ('STACK_GLOBAL', 'GLOBAL', 'INST'):
                module, qualname = (recent[-2], recent[-1]) if name == 'STACK_GLOBAL' \
                    else arg.split(' ', 1)
                if _new_since_36(module, qualname):
                    return '%s.%s' % (module, qualname)
                recent.append(None)
            elif name in ('FRAME', 'PROTO'):
                continue
            else:
                recent.append(None)
            del recent[:-2]
    except (ValueError, TypeError, AttributeError):
        return None     # not a pickle we can read: the client will say so
    return None


def _new_since_36(module, qualname):
    if not isinstance(module, str) or not isinstance(qualname, str):
        return False
    if module in ('builtins', '__builtin__'):
        return qualname.split('.')[0] in NEW_SINCE_36_BUILTINS
    return any(module == m or module.startswith(m + '.')
               for m in NEW_SINCE_36_MODULES + NUMPY2_ONLY_MODULES)


def _unloadable_reason(data):
    found = unloadable_on_36(data)
    if found is None:
        return None
    if found.startswith('numpy.'):
        return ('the result refers to %s, which numpy 1.x (the newest numpy for Python 3.6, '
                'the dispy 4.5 client) does not have, so the client could not load it' % found)
    return ('the result refers to %s, which Python 3.6 (the dispy 4.5 client) does not '
            'have, so the client could not load it' % found)


# numpy 2 moved numpy.core to numpy._core and pickles its arrays and
# scalars under the new name, which numpy 1.x cannot import: such a reply
# is pickled again with these names as 1.x spells them (module prefix ->
# 1.x module; names under numpy._core that 1.x never had are left, and
# unloadable_on_36 names them).
NUMPY_LEGACY_MODULES = (('numpy._core', 'numpy.core'), ('numpy.char', 'numpy.core.defchararray'),
                        ('numpy.rec', 'numpy.core.records'))
NUMPY_LEGACY_NAMES = {          # module.name -> the 1.x module, for single names
    'numpy.exceptions.%s' % n: 'numpy' for n in (
        'AxisError', 'ComplexWarning', 'ModuleDeprecationWarning', 'RankWarning',
        'TooHardError', 'VisibleDeprecationWarning')}
NUMPY2_NEW_NAMES = frozenset(('numpy._core._internal._convert_to_stringdtype_kwargs',))


class _ModuleRef:
    """Pickles as ``importlib.import_module(name)``: a module by the
    name the client knows it under."""
    __slots__ = ('name',)

    def __init__(self, name):
        self.name = name

    def __reduce__(self):
        import importlib
        return importlib.import_module, (self.name,)


class _Numpy1Pickler(pickle.Pickler):
    """Writes numpy 2's classes and functions by their numpy 1.x names."""

    def reducer_override(self, obj):
        if not isinstance(obj, (type, types.FunctionType, types.BuiltinFunctionType)):
            return NotImplemented
        module, name = getattr(obj, '__module__', None), getattr(obj, '__qualname__', None)
        if not isinstance(module, str) or not isinstance(name, str):
            return NotImplemented
        full = '%s.%s' % (module, name)
        legacy = NUMPY_LEGACY_NAMES.get(full)
        if legacy is None and full not in NUMPY2_NEW_NAMES:
            legacy = next((old + module[len(new):] for new, old in NUMPY_LEGACY_MODULES
                           if module == new or module.startswith(new + '.')), None)
        if legacy is None:
            return NotImplemented
        return getattr, (_ModuleRef(legacy), name)


def dumps_for_36(record):
    """A job's reply record pickled for the legacy client: through
    _Numpy1Pickler once the job process has numpy (one pass; the same
    bytes as dc.dumps where nothing is renamed)."""
    if 'numpy' not in sys.modules:
        return dc.dumps(record)
    return dc.dumps(record, _Numpy1Pickler)


def compile_legacy(code):
    """Compile client code as the original did (it names it '<string>'
    in tracebacks and warnings; scripts parse those)."""
    return compile(code, '<string>', 'exec')


LEGACY_CODE_NOTE = (
    '\ncode valid only on Python 3.6: it uses async or await as a name, which Python 3.7 '
    'and later reserve, so this node (Python %d.%d) cannot run it\n' % sys.version_info[:2])


def only_valid_on_36(code):
    """True if ``code`` fails to compile here only because it uses
    ``async`` or ``await`` as names, as Python 3.6 allowed."""
    import ast
    try:
        compile(code, '<string>', 'exec')
        return False
    except (SyntaxError, ValueError):
        pass
    try:
        ast.parse(code, feature_version=(3, 6))     # 3.8 to 3.12 know 3.6's grammar
        return True
    except (SyntaxError, ValueError, TypeError):
        pass
    # Python 3.13 does not: the names renamed (same length, so every token
    # keeps its place), async before def, for or with kept.
    import tokenize
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(code).readline))
    except (tokenize.TokenError, SyntaxError, ValueError):
        return False
    renamed = []
    for i, tok in enumerate(tokens):
        if tok.type == tokenize.NAME and tok.string in ('async', 'await'):
            after = next((t.string for t in tokens[i + 1:]
                          if t.type not in (tokenize.NL, tokenize.COMMENT)), '')
            if not (tok.string == 'async' and after in ('def', 'for', 'with')):
                tok = tok._replace(string='_' + tok.string[:4])
        renamed.append(tok)
    if renamed == tokens:
        return False
    try:
        compile(tokenize.untokenize(renamed), '<string>', 'exec')
    except (SyntaxError, ValueError):
        return False
    return True


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
    Returns 0 when the client acknowledged it, -1 otherwise (also when it
    cannot be pickled or loaded by the client; the job goes on)."""
    reply = _JOB.reply
    saved = (reply.status, reply.result, reply.end_time)
    reply.status, reply.result, reply.end_time = \
        DispyJob.ProvisionalResult, result, time.time()
    sendable = False
    try:
        try:
            data = dumps_for_36(reply)
        except Exception:  # unpicklable (TypeError, AttributeError, ...): -1, the job goes on
            return -1
        if unloadable_on_36(data):
            return -1
        # As on the original, the job's result is now this value until the
        # job returns: a job that raises later reports its last provisional
        # result.
        sendable = True
        data = b'JOB_REPLY:' + data
        with _job_connect(timeout or _JOB.msg_timeout) as sock:
            dc.send_msg(sock, data)
            return 0 if dc.recv_msg(sock, 1024) == b'ACK' else -1
    except (OSError, ProtocolError):
        return -1
    finally:
        reply.status, reply.end_time = saved[0], saved[2]
        if not sendable:
            reply.result = saved[1]


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
        head, reply = dc.dumps(xf), dumps_for_36(_JOB.reply)
    except Exception:  # whatever made them unpicklable
        return -1
    if unloadable_on_36(head) or unloadable_on_36(reply):
        return -1
    try:
        with _job_connect(timeout or _JOB.msg_timeout) as sock, open(path, 'rb') as fh:
            dc.send_msg(sock, b'FILEXFER:' + head)
            dc.send_msg(sock, reply)
            if dc.recv_msg(sock, 1024) != b'ACK':
                return -1
            sent = send_from_file(sock, fh, stat_buf.st_size)
            if sent != stat_buf.st_size:
                return -1
            return 0 if dc.recv_msg(sock, 1024) == b'ACK' else -1
    except (OSError, ProtocolError):
        return -1


# Job code on the 4.5.5 node saw every module its node process had imported
# (it put sys.modules into the job globals), and legacy job code uses them
# without importing them.  These are the public top-level names of that list
# (measured on the original under Python 3.6; asyncoro and dispy left out).
# Only standard library modules: none of the node's own state.
IMPLICIT_MODULES = (
    'abc', 'argparse', 'array', 'ast', 'atexit', 'base64', 'binascii', 'bisect',
    'builtins', 'bz2', 'codecs', 'collections', 'contextlib', 'copy', 'copyreg',
    'datetime', 'dis', 'encodings', 'enum', 'errno', 'fcntl', 'fnmatch', 'functools',
    'genericpath', 'gettext', 'glob', 'grp', 'hashlib', 'heapq', 'importlib', 'inspect',
    'io', 'ipaddress', 'itertools', 'keyword', 'linecache', 'locale', 'logging', 'lzma',
    'marshal', 'math', 'multiprocessing', 'numbers', 'opcode', 'operator', 'os',
    'pickle', 'pkgutil', 'platform', 'posix', 'posixpath', 'pwd', 'queue', 'random',
    're', 'reprlib', 'runpy', 'select', 'selectors', 'shelve', 'shutil', 'signal', 'site',
    'socket', 'sre_compile', 'sre_constants', 'sre_parse', 'ssl', 'stat', 'string',
    'stringprep', 'struct', 'subprocess', 'sys', 'sysconfig', 'tempfile', 'textwrap',
    'threading', 'time', 'token', 'tokenize', 'traceback', 'types', 'unicodedata',
    'warnings', 'weakref', 'zipimport', 'zlib')
# Submodules the original had loaded, so e.g. os.path or importlib.util work.
IMPLICIT_SUBMODULES = (
    'collections.abc', 'importlib.abc', 'importlib.machinery', 'importlib.util',
    'multiprocessing.connection', 'multiprocessing.context', 'multiprocessing.process',
    'multiprocessing.queues', 'multiprocessing.reduction', 'multiprocessing.synchronize',
    'multiprocessing.util', 'os.path')
_IMPLICIT = {}


def import_implicit_modules():
    """Import IMPLICIT_MODULES into _IMPLICIT (in a spare worker, before it
    has a computation, so jobs don't wait for it)."""
    import importlib
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')     # sre_* are deprecated aliases now
        for name in IMPLICIT_MODULES + IMPLICIT_SUBMODULES:
            try:
                module = importlib.import_module(name)
            except ImportError:     # a POSIX-only module elsewhere, or gone from Python
                continue
            if '.' not in name:
                _IMPLICIT[name] = module


# node -> worker frames: length (as dc.send_msg), then a pickle
_FRAME_LEN = struct.Struct('>L')
# job process -> worker: length, status, limit code (_LIMIT_NAMES), then the reply
_REPLY_LEN = struct.Struct('>QBB')


class _Forker:
    """Forks job processes for the (single-threaded) worker.

    ``os.fork`` runs the interpreter's at-fork callbacks in every child;
    those of threading, random and logging (all implicit modules) touch
    scattered objects and code, and each page touched after a fork is a
    fault or a copy: half the CPU of a tiny job's process.  While this is
    the worker's only thread and no code but the standard library's
    registered callbacks, libc's fork with the GIL held (ctypes.PyDLL)
    skips them, and the child does the one that matters itself: a fresh
    seed for ``random``.  Otherwise it is ``os.fork``.
    """

    def __init__(self):
        self.raw = None
        self.foreign = False    # someone registered at-fork callbacks after us
        try:
            import ctypes
            self.raw = ctypes.PyDLL(None).fork
            self.raw.restype = ctypes.c_int
            self.raw.argtypes = ()
        except (ImportError, OSError, AttributeError):     # no ctypes / no fork symbol
            self.raw = None
            return
        register = os.register_at_fork

        def register_at_fork(**callbacks):
            self.foreign = True
            return register(**callbacks)
        register_at_fork.__doc__ = register.__doc__
        os.register_at_fork = register_at_fork

    def fork(self):
        if self.raw is None or self.foreign or _thread._count():
            return os.fork()
        pid = self.raw()
        if pid < 0:
            return os.fork()    # let os.fork raise the error (or succeed after all)
        if pid == 0:
            # what random's at-fork callback does, minus the Python-level call
            inst = getattr(sys.modules.get('random'), '_inst', None)
            if inst is not None:
                _random.Random.seed(inst)
                inst.gauss_next = None
        return pid


class _WorkerJob:
    __slots__ = ('uid', 'hash', 'pid', 'fd', 'chunks', 'got', 'size', 'replied', 'start',
                 'kill_at', 'terminated', 'deadline', 'limit', 'status', 'limit_code',
                 'cgroup', 'eof', 'exit_status')

    def __init__(self, uid, job_hash, pid, fd, start):
        self.uid, self.hash, self.pid, self.fd, self.start = uid, job_hash, pid, fd, start
        self.chunks = []
        self.got = 0
        self.size = None         # header + reply, once the header is in
        self.replied = False
        self.kill_at = None
        self.terminated = False
        self.deadline = None     # --job_timeout, monotonic
        self.limit = None        # why a limit ended the job
        self.status = DispyJob.Terminated
        self.limit_code = 0
        self.cgroup = None       # its _JobSlot, or None (then it is a subreaper)
        self.eof = False         # its pipe is closed
        self.exit_status = None  # from waitpid, once reaped


class _JobSlot:
    """One of a worker's per-job cgroups, made by the node (see
    make_worker_cgroup): reused job after job, emptied by cgroup.kill."""
    __slots__ = ('path', 'procs', 'oom')

    def __init__(self, path):
        self.path = path
        self.procs = os.fsencode(os.path.join(path, 'cgroup.procs'))   # made before the fork
        self.oom = 0        # its memory.events oom_kill count when a job took it


class Worker:
    """The single-threaded per-computation process.

    It owns the computation's namespace: the code is compiled and run once,
    setup runs once, and each job is a fork of this process, so jobs see
    setup's globals (and objects such as a shared multiprocessing Value),
    while their own changes die with them.
    """

    def __init__(self, chan):
        self.chan = chan
        # poll, fd -> what it is (None: the node's channel, 'sigchld', or a
        # _WorkerJob): a bare poll object, as the selectors layer would add
        # a page or two touched per event, and each costs a copy while a job
        # process shares this one's memory.  It has no descriptor to close
        # in job processes either.
        self.poller = _select.poll()
        self.watched = {}
        # pid -> _WorkerJob.  Not by uid: the legacy client's uids are id()s of
        # its job objects, reused as soon as a result is in, while the job's
        # process may still be exiting.
        self.jobs = {}
        self.cfg = None
        self.ns = None
        self.compute = None     # the fully loaded _Compute, for setup/cleanup
        self.running = True
        self.orphaned = False   # the node's end of the channel is gone
        self.forker = _Forker()
        self.cgroup = None      # this worker's cgroup (node-made), or None
        self.free_slots = []    # _JobSlot not held by a running job
        self.own = set()        # no cgroup: children the worker itself started (setup)
        self.strays = {}        # no cgroup: killed leftovers to reap -> give-up time
        # Why the computation's code could not be loaded (a traceback), once
        # it failed: every job reports the same, not a half-run namespace.
        self.load_error = None
        self.legacy_code = False    # that code is valid only on Python 3.6

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
        self._kill_everything()

    def _kill_everything(self):
        """End every process of every job (the worker stops): the whole
        cgroup of this worker (itself last, as it exits anyway), or each
        job's tree and every leftover below this subreaper."""
        if self.cgroup:
            for job in self.jobs.values():
                if job.cgroup is not None:
                    _cgroup_kill(job.cgroup.path)
                else:
                    kill_tree(job.pid, signal.SIGKILL)
            return
        for job in self.jobs.values():
            kill_tree(job.pid, signal.SIGKILL)
        for child in direct_children(os.getpid()):
            kill_tree(child, signal.SIGKILL)

    def serve(self):
        try:
            tag, self.cfg = self._recv_command()
        except (ProtocolError, OSError):
            return      # a spare worker the node no longer needs
        _JOB.reply_addr = tuple(self.cfg['reply_addr'])
        _JOB.certfile = self.cfg['certfile']
        _JOB.compute_id = self.cfg['compute_id']
        _JOB.msg_timeout = self.cfg['msg_timeout']
        _JOB.max_file_size = self.cfg['max_file_size']
        self.cgroup = self.cfg.get('cgroup')
        if self.cgroup:
            self.free_slots = [_JobSlot(os.path.join(self.cgroup, 'job-%d' % n))
                               for n in range(self.cfg.get('cgroup_slots', 0))]
        else:
            # No cgroup: what a job leaves behind comes back here (and to the
            # job process itself while it lives, see _job_child).
            prctl(PR_SET_CHILD_SUBREAPER, 1)
        # A single-threaded process: changing directory is safe here.
        os.chdir(self.cfg['cwd'])
        sys.path.insert(0, self.cfg['cwd'])
        self._watch(self.chan.fileno(), None)
        # Job processes are reaped when SIGCHLD says so (waitpid WNOHANG),
        # never by a blocking wait: the handler only wakes the selector.
        self.wakeup_r, self.wakeup_w = os.pipe()
        os.set_blocking(self.wakeup_r, False)
        os.set_blocking(self.wakeup_w, False)
        signal.set_wakeup_fd(self.wakeup_w, warn_on_full_buffer=False)
        signal.signal(signal.SIGCHLD, lambda signum, frame: None)
        self._watch(self.wakeup_r, 'sigchld')
        watched = self.watched
        while self.running or self.jobs:
            timeout = self._next_deadline()
            events = self.poller.poll(None if timeout is None else int(timeout * 1000) + 1)
            # what each descriptor was when poll answered: handling one event
            # may close another's descriptor, and a new job may reuse it
            for fd, what in [(fd, watched.get(fd, ())) for fd, _ in events]:
                if watched.get(fd, ()) is not what:
                    continue
                if what is None:
                    self._read_command()
                elif what == 'sigchld':
                    self._reap()
                else:
                    self._read_result(what)
            self._enforce_kills()
        # The computation ends: nothing it started outlives this worker (with
        # a cgroup, the node kills this worker's group as well).
        if not self.cgroup:
            self._kill_everything()
        elif self.orphaned:
            _cgroup_kill(self.cgroup)   # no node to do it: this worker ends with it

    def _watch(self, fd, what):
        self.poller.register(fd, _select.POLLIN)
        self.watched[fd] = what

    def _unwatch(self, fd):
        self.poller.unregister(fd)
        del self.watched[fd]

    def _reap(self):
        """Collect every job process that has exited."""
        try:
            # one read unless it filled the buffer (a raised BlockingIOError
            # per wake-up is a traceback built for nothing)
            while len(os.read(self.wakeup_r, 4096)) == 4096:
                pass
        except BlockingIOError:
            pass
        # waitpid per job (WNOHANG), not waitpid(-1): a process that setup
        # started (a multiprocessing pool, say) is not ours to reap.
        for job in [j for j in self.jobs.values() if j.exit_status is None]:
            try:
                pid, status = os.waitpid(job.pid, os.WNOHANG)
            except ChildProcessError:
                pid, status = job.pid, 0
            if pid:
                # The job ends when its own process has: whatever a process
                # it started does with the reply pipe.
                job.exit_status = status
                self._end_job(job)
        now = time.monotonic()
        for pid, give_up in list(self.strays.items()):
            try:
                done = os.waitpid(pid, os.WNOHANG)[0] or now >= give_up
            except ChildProcessError:   # not (yet) reparented here, or gone
                done = now >= give_up or not os.path.exists('/proc/%d' % pid)
            if done:
                del self.strays[pid]

    def _next_deadline(self):
        deadlines = [j.kill_at for j in self.jobs.values() if j.kill_at]
        deadlines += [j.deadline for j in self.jobs.values() if j.deadline]
        if self.strays:
            deadlines.append(time.monotonic() + 0.1)
        return max(0.0, min(deadlines) - time.monotonic()) if deadlines else None

    def _recv_command(self):
        """One frame from the node (dc.send_msg framing).  Not dc.recv_msg
        and dc.loads_plain, which guard against untrusted peers: the other
        end of this socketpair is the node itself, so the frame is read into
        one buffer of the size it announces (recv_msg grows in chunks and
        joins them, a second copy of large job arguments) and unpickled with
        pickle.loads (the checked loader's Python layers cost page copies
        per job)."""
        (size,) = _FRAME_LEN.unpack(self._recv_exact(4))
        try:
            return pickle.loads(self._recv_exact(size))
        except (pickle.UnpicklingError, EOFError, ValueError) as exc:
            raise ProtocolError('bad command from the node: %s' % exc)

    def _recv_exact(self, size):
        buf = bytearray(size)
        view, got = memoryview(buf), 0
        while got < size:
            n = self.chan.recv_into(view[got:], size - got, socket.MSG_WAITALL)
            if not n:
                raise ProtocolError('the node closed the channel')
            got += n
        return buf

    def _read_command(self):
        try:
            msg = self._recv_command()
        except (ProtocolError, OSError):
            self._unwatch(self.chan.fileno())
            self._orphan()
            return
        getattr(self, '_cmd_' + msg[0])(*msg[1:])

    # -- commands from the node
    def _load_namespace(self):
        """Run the computation's code once; None, or (then and for every
        later call) the traceback of its failure."""
        if self.ns is not None or self.load_error is not None:
            return self.load_error
        module = types.ModuleType('__main__')
        ns = module.__dict__
        ns.update(_IMPLICIT)
        ns['dispy_provisional_result'] = dispy_provisional_result
        ns['dispy_send_file'] = dispy_send_file
        ns['DispyJob'] = DispyJob
        ns['dispynode_shutdown'] = self._shutdown_asked
        # Classes sent as dependencies pickle as __main__.<name> on both ends.
        sys.modules['__main__'] = module
        try:
            if self.cfg['code']:
                # '<string>', as the original names it in tracebacks and warnings
                exec(compile_legacy(self.cfg['code']), ns)
            self.compute = dc.loads_full(self.cfg['compute_bytes'], ns)
        except BaseException as exc:  # user code may raise anything
            self.load_error = traceback.format_exc()
            if isinstance(exc, SyntaxError) and only_valid_on_36(self.cfg['code']):
                self.legacy_code = True
                self.load_error += LEGACY_CODE_NOTE
            return self.load_error
        finally:
            self._note_own_children()
        self.ns = ns
        return None

    def _cmd_setup(self, rid):
        try:
            failed = self._load_namespace()
            if self.legacy_code:
                # Setup cannot run here; every job ends Terminated with the
                # reason rather than the client's jobs staying Created.
                self.send(('setup', rid, True, failed))
                return
            if failed:
                self.send(('setup', rid, False, failed))
                return
            func = self.compute.setup
            result = self.ns[func.name](*(func.args or ()), **(func.kwargs or {}))
            if result != 0:
                raise RuntimeError('setup function %s returned %r, not 0' % (func.name, result))
        except BaseException:  # user code may raise anything, even SystemExit
            self.send(('setup', rid, False, traceback.format_exc()))
        else:
            self.send(('setup', rid, True, ''))
        self._note_own_children()

    def _note_own_children(self):
        """No cgroup: the processes setup (or the computation's code) left
        running are this worker's own, not a job's leftovers."""
        if not self.cgroup:
            self.own = set(direct_children(os.getpid())) - set(self.jobs)

    def _cmd_job(self, uid, job_hash, args, kwargs, code):
        failed = self._load_namespace()
        if failed:
            self._finish(uid, job_hash, time.time(), None, failed)
            return
        rfd, wfd = os.pipe()
        os.set_blocking(rfd, False)
        start = time.time()
        # Everything but the pid is prepared before the fork: each page this
        # process writes while a job shares its memory costs a copy.
        job = _WorkerJob(uid, job_hash, None, rfd, start)
        job.cgroup = self._take_slot()
        if self.cfg.get('job_timeout'):
            job.deadline = time.monotonic() + self.cfg['job_timeout']
        self._watch(rfd, job)
        pid = self.forker.fork()
        if pid == 0:
            os.close(rfd)
            self._job_child(uid, job_hash, args, kwargs, code, wfd, start,
                            job.cgroup and job.cgroup.procs)
        os.close(wfd)
        try:
            os.setpgid(pid, pid)
        except OSError:
            pass
        job.pid = pid
        self.jobs[pid] = job

    def _cmd_terminate(self, uid):
        job = next((j for j in self.jobs.values() if j.uid == uid and not j.replied), None)
        if job is None or job.terminated:
            return
        job.terminated = True
        job.kill_at = time.monotonic() + KILL_GRACE
        kill_tree(job.pid, signal.SIGTERM)

    def _shutdown_asked(self):
        """``dispynode_shutdown()`` for a computation's cleanup (the node
        honours it only with --client_shutdown)."""
        self.shutdown_asked = True

    def _cmd_close(self, rid, run_cleanup):
        text = ''
        # Load the computation (user objects) only when there is a cleanup to run.
        if run_cleanup and self.cfg['has_cleanup']:
            try:
                failed = self._load_namespace()     # cleanup runs even if no job ran here
                if failed:
                    raise RuntimeError('the computation could not be loaded:\n' + failed)
                os.chdir(self.cfg['cwd'])   # wherever setup left this process
                cleanup = self.compute.cleanup
                if isinstance(cleanup, dc.Function):
                    self.ns[cleanup.name](*(cleanup.args or ()), **(cleanup.kwargs or {}))
            except BaseException:  # user code may raise anything
                text = traceback.format_exc()
        self.send(('closed', rid, text, getattr(self, 'shutdown_asked', False)))
        self.running = False
        self._unwatch(self.chan.fileno())

    # -- job processes
    def _job_child(self, uid, job_hash, args, kwargs, code, wfd, start, cgroup=None):
        """Runs in the forked child; never returns."""
        status = 1
        try:
            os.setpgid(0, 0)
            # _signal, not signal: its enum conversions touch pages for nothing
            for signum in (signal.SIGTERM, signal.SIGCHLD):
                _signal.signal(signum, _signal.SIG_DFL)
            # As on the original (a plain Python process): SIGINT and
            # _thread.interrupt_main() raise KeyboardInterrupt in the job.
            _signal.signal(signal.SIGINT, _signal.default_int_handler)
            _signal.set_wakeup_fd(-1)
            # the worker's descriptors, closed by number: this process never
            # uses their objects again and ends in os._exit
            for fd in (self.wakeup_r, self.wakeup_w, self.chan.detach()):
                os.close(fd)
            contained = self._apply_job_limits(cgroup)
            if not contained:
                # No cgroup: processes the job starts come back to this one
                # when their parent dies (setsid, double fork), and it ends
                # them all before it replies.
                prctl(PR_SET_CHILD_SUBREAPER, 1)
            # Every job starts in the computation's directory, wherever
            # setup (or the code) left this process, as on the original.
            try:
                os.chdir(self.cfg['cwd'])
            except OSError:
                pass        # gone: the job says so when it touches its files
            data = self._run_job(uid, job_hash, args, kwargs, code, start)
            if not contained:
                end_own_children()
            # Length first, so the worker can forward the reply without
            # waiting for this process to finish exiting.
            status = _JOB.reply.status      # user code could have set anything
            status = status if isinstance(status, int) and 0 <= status < 256 else 0
            view = memoryview(_REPLY_LEN.pack(len(data), status,
                                              getattr(_JOB, 'limit_code', 0)) + data)
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
                exec(compile_legacy(code), self.ns)
            args = dc.loads_full(args, self.ns) if args else ()
            kwargs = dc.loads_full(kwargs, self.ns) if kwargs else {}
            if is_prog:
                reply.result, reply.stdout, reply.stderr = self._run_program(args)
            else:
                reply.result = self.ns[self.cfg['name']](*args, **kwargs)
            reply.status = DispyJob.Finished
        except BaseException as exc:  # user code may raise anything
            reply.status = DispyJob.Terminated
            reply.exception = traceback.format_exc()
            if isinstance(exc, SyntaxError) and code and only_valid_on_36(code):
                reply.exception += LEGACY_CODE_NOTE
            if isinstance(exc, MemoryError) and self.cfg.get('job_memory'):
                reply.exception = self._memory_note(
                    'MemoryError in the job') + '\n' + reply.exception
                _JOB.limit_code = 1
        if not is_prog:
            sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
            reply.stdout, reply.stderr = out.getvalue(), err.getvalue()
        reply.end_time = time.time()
        try:
            data = dumps_for_36(reply)
        except Exception:  # an unpicklable result must still produce a reply
            reply.result = None
            reply.status = DispyJob.Terminated
            reply.exception = 'result could not be pickled:\n' + traceback.format_exc()
            return dc.dumps(reply)
        why = _unloadable_reason(data)
        if why is not None:
            reply.result = None
            reply.status = DispyJob.Terminated
            reply.exception = why
            data = dc.dumps(reply)
        return data

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

    def _read_result(self, job, drain=False):
        """Read what the job process sent on its pipe: the length-prefixed
        reply, forwarded as soon as it is complete.  EOF is never waited
        for (a process the job started may hold the pipe open for ever):
        the job ends when its own process is reaped (_end_job), which then
        takes what was sent (``drain``)."""
        for _ in range(64 if drain else 1):     # bounded: others may write too
            want = CHUNK if job.size is None else min(CHUNK, job.size - job.got)
            try:
                block = os.read(job.fd, want) if want > 0 else b''
            except BlockingIOError:
                return
            except OSError:
                block = b''
            if not block:
                break
            job.chunks.append(block)
            job.got += len(block)
            if job.size is None and job.got >= _REPLY_LEN.size:
                head = b''.join(job.chunks)
                job.chunks = [head]
                size, job.status, job.limit_code = _REPLY_LEN.unpack_from(head)
                job.size = _REPLY_LEN.size + size
                limit = self.cfg.get('max_reply')
                if limit and size > limit:
                    # the node would stop this worker for such a frame: the
                    # job ends instead (its writes fail once the pipe closes)
                    job.replied, job.chunks, block = True, [], None
                    self._finish(job.uid, job.hash, job.start, None,
                                 "the job's result of %d bytes is over the node's limit of "
                                 "%d bytes (--max_request_size)" % (size, limit),
                                 reason='result_too_large')
            if block is None:
                break       # refused: close the pipe
            if job.size is not None and job.got == job.size and not job.replied:
                job.replied = True
                self.send(('done', job.uid, b''.join(job.chunks)[_REPLY_LEN.size:],
                           job.status, _LIMIT_NAMES.get(job.limit_code)))
                job.chunks = []
                # Nothing more to read (whatever a process the job started
                # might still write): close now rather than wake for EOF.
                break
        else:
            return
        self._close_pipe(job)

    def _close_pipe(self, job):
        if not job.eof:
            job.eof = True
            self._unwatch(job.fd)
            os.close(job.fd)

    def _end_job(self, job):
        """The job's own process has been reaped: take what it sent, end
        every process it left (its cgroup, or the leftovers that came back
        to this subreaper), forget it, and reply for it if it did not."""
        status = job.exit_status
        if not job.eof:
            self._read_result(job, drain=True)
            self._close_pipe(job)
        del self.jobs[job.pid]
        oom_killed = self._release_slot(job)
        if job.cgroup is None:
            if job.terminated:
                try:    # its group, if any of it survived SIGTERM (not its pid: reaped)
                    os.killpg(job.pid, signal.SIGKILL)
                except OSError:
                    pass
            if not (job.replied and status == 0):
                # It died before it could end its children (killed, or
                # os._exit): they came back here.
                self._sweep_strays()
        if job.replied:
            return
        limit = None
        if job.limit:
            why, limit = job.limit, 'job_timeout'
            reason = limit
        elif job.terminated:
            why = None      # as the original: Terminated, no exception text
            reason = 'cancelled'
        elif oom_killed:
            why, limit = self._memory_note('the job was killed by the cgroup memory limit'), \
                'job_memory'
            reason = limit
        elif os.WIFSIGNALED(status):
            why = 'job process was killed by signal %d' % os.WTERMSIG(status)
            if self.cfg.get('job_memory'):
                why += ' (%s)' % self._memory_note('it may have run out of memory')
            reason = 'signal'
        else:
            why = 'job process exited with status %d without a result' % (status >> 8)
            reason = 'exited'
        self._finish(job.uid, job.hash, job.start, None, why, limit, reason)

    def _sweep_strays(self):
        """No cgroup: kill every child of this worker that is neither a
        running job's process nor one that setup started (they are what
        ended jobs left behind), and reap them as they come back."""
        keep = set(self.jobs) | self.own
        give_up = time.monotonic() + 10.0
        for child in direct_children(os.getpid()):
            if child not in keep:
                for pid in kill_tree(child, signal.SIGKILL):
                    self.strays[pid] = give_up

    def _finish(self, uid, job_hash, start, result, exception, limit=None, reason='exception'):
        reply = dc.JobReply(uid=uid, hash=job_hash, ip_addr=self.cfg['ip_addr'],
                            status=DispyJob.Terminated, result=result,
                            exception=exception, start_time=start, end_time=time.time())
        # reason: why the job ended without its own reply (JOB_END_REASONS)
        self.send(('done', uid, dc.dumps(reply), DispyJob.Terminated, limit, reason))

    def _enforce_kills(self):
        now = time.monotonic()
        for job in self.jobs.values():
            if job.kill_at and now >= job.kill_at:
                self._kill_job(job)
                job.kill_at = None
            if job.deadline and now >= job.deadline:
                # --job_timeout: end the job's whole tree like a TERMINATE_JOB.
                job.deadline = None
                if not job.replied and not job.terminated:
                    job.limit = ('job exceeded --job_timeout %gs (ran %.1fs); its process '
                                 'tree was killed' % (self.cfg['job_timeout'],
                                                      time.time() - job.start))
                    job.terminated = True
                    job.kill_at = now + KILL_GRACE
                    kill_tree(job.pid, signal.SIGTERM)
        if self.strays:
            self._reap()

    def _kill_job(self, job):
        """SIGKILL for every process of a job: its cgroup, else its tree."""
        if job.cgroup is None:
            kill_tree(job.pid, signal.SIGKILL)
            return
        _cgroup_kill(job.cgroup.path)
        for kill in (os.killpg, os.kill):   # in case it could not join its cgroup
            try:
                kill(job.pid, signal.SIGKILL)
            except OSError:
                pass

    # -- per-job limits (see the observing section)
    def _memory_note(self, what):
        return '%s: --job_memory %s limits each job\'s address space to %d bytes' % (
            what, self.cfg.get('job_memory_text') or self.cfg['job_memory'],
            self.cfg['job_memory'])

    def _take_slot(self):
        """A free job cgroup of this worker (None without, or if all are in
        use: then the job is contained as a subreaper)."""
        if not self.free_slots:
            return None
        # First in, first out: every group is taken in turn, and emptied
        # first (a job user may move its processes into an idle group).
        slot = self.free_slots.pop(0)
        _cgroup_kill(slot.path)
        if self.cfg.get('cgroup_memory'):
            slot.oom = self._oom_kills(slot)
        return slot

    @staticmethod
    def _oom_kills(slot):
        try:
            with open(os.path.join(slot.path, 'memory.events')) as fh:
                for line in fh:
                    if line.startswith('oom_kill '):
                        return int(line.split()[1])
        except (OSError, ValueError, IndexError):
            pass
        return 0

    def _apply_job_limits(self, cgroup):
        """In the job child, before user code: join the job's cgroup (True
        if it did), cap its address space (inherited by everything it
        starts)."""
        joined = False
        if cgroup:      # the group's cgroup.procs; plain system calls: few pages touched
            try:
                fd = os.open(cgroup, os.O_WRONLY)
                try:
                    joined = os.write(fd, b'0') == 1        # 0: this process
                finally:
                    os.close(fd)
            except OSError:
                pass
        limit = self.cfg.get('job_memory')
        if limit:
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        return joined

    def _release_slot(self, job):
        """Kill what is left in an ended job's cgroup and free it for the
        next job; True if its OOM killer fired during the job."""
        slot = job.cgroup
        if slot is None:
            return False
        _cgroup_kill(slot.path)
        oom = bool(self.cfg.get('cgroup_memory')) and self._oom_kills(slot) > slot.oom
        self.free_slots.append(slot)
        if not self.cfg.get('cgroup_memory'):
            # Nothing but this worker's own leaf holds processes in its group
            # itself; a job that moved one there left it behind.  (With the
            # memory controller the group can hold none.)
            try:
                fd = os.open(os.path.join(self.cgroup, 'cgroup.procs'), os.O_RDONLY)
                try:
                    left = os.read(fd, 65536).split()
                finally:
                    os.close(fd)
            except OSError:
                left = ()
            for pid in left:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (OSError, ValueError):
                    pass
        return oom


def _cgroup_kill(path):
    """SIGKILL every process in the cgroup ``path`` and below (cgroup.kill,
    Linux 5.14+), else each pid listed in its cgroup.procs."""
    try:
        fd = os.open(os.path.join(path, 'cgroup.kill'), os.O_WRONLY)   # never made here
        try:
            os.write(fd, b'1')
        finally:
            os.close(fd)
        return
    except OSError:
        pass
    for _ in range(10):
        try:
            with open(os.path.join(path, 'cgroup.procs')) as fh:
                pids = [int(p) for p in fh.read().split()]
        except (OSError, ValueError):
            return
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


def worker_main(fd):
    """Entry point of a worker process (see WorkerHandle for how it starts)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the node decides when we stop
    # Not dumpable: another process of the job user (a job of another
    # computation) can neither ptrace this worker nor open its
    # /proc/<pid>/mem, so a spare worker stays untouched until it is used.
    # Job processes inherit it (a program they exec becomes dumpable again).
    prctl(PR_SET_DUMPABLE, 0)
    chan = socket.socket(fileno=fd)
    import_implicit_modules()
    try:
        Worker(chan).serve()
    finally:
        chan.close()
    os._exit(0)


# ---------------------------------------------------------------- worker handle

_HERE = os.path.abspath(__file__)


def worker_command(statement, job_user=None, drop=False):
    """A Python command line that loads this very file (whatever it is
    named: a renamed copy works) as module ``node`` and runs ``statement``.
    It loads the file's cached bytecode, rather than running it as a
    script, which would compile it anew in every worker.  With a
    ``job_user``, without the user site (``-s``): a job may write the job
    user's ~/.local, and a .pth file there would run in every later
    worker, the next client's included.  With ``drop`` (a worker: the
    node starts it as root) it becomes the job user before it reads
    anything: a process that drops from root is not dumpable, whereas one
    started as the job user is dumpable (its /proc/<pid>/mem open to every
    job) until worker_main clears that."""
    directory, filename = os.path.split(_HERE)
    loader = ('import sys, importlib.util as u; sys.path.insert(0, %r); '
              's = u.spec_from_file_location("dispynode_worker", %r); '
              'node = u.module_from_spec(s); s.loader.exec_module(node); '
              % (directory, _HERE))
    if job_user and drop:
        loader = ('import os; os.setgroups([]); os.setgid(%d); os.setuid(%d); '
                  % (job_user.gid, job_user.uid)) + loader
    return [sys.executable] + (['-s'] if job_user else []) + ['-c', loader + statement]


class WorkerFault(Exception):
    """A worker broke the rules of its channel: it is stopped as faulty."""


WORKER_FRAME_RATE = 16 * 1024 * 1024    # bytes/s: a worker frame's body must keep this pace
_LIMIT_NAME_RE = re.compile(r'^[a-z][a-z_]{0,31}$')


def _name_or_none(value):
    return value is None or isinstance(value, str) and bool(_LIMIT_NAME_RE.match(value))


# tag -> (fields required, checks of the fields after the tag; the last
# ones optional) for Worker.send's messages
WORKER_MESSAGES = {
    # uid, reply, status, limit name[, reason (JOB_END_REASONS)]
    'done': (4, (small_int, lambda v: isinstance(v, bytes),
                 lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 256,
                 _name_or_none, _name_or_none)),
    'setup': (3, (small_int, lambda v: isinstance(v, bool), lambda v: isinstance(v, str))),
    'closed': (3, (small_int, lambda v: isinstance(v, str), lambda v: isinstance(v, bool))),
}


def worker_frame_limit(cfg):
    """The largest frame the node reads from a worker (a job's reply and
    a little framing): --max_request_size, as for a client's request."""
    return min(cfg.max_request_size, cfg.max_request_memory, INTERNAL_FRAME_LIMIT)


class WorkerHandle:
    """The node's end of one worker process.  Workers are started ahead of
    need (Node keeps a spare), because a fresh interpreter takes tens of
    milliseconds to start; ``attach`` gives one its computation."""

    def __init__(self, node):
        self.node = node
        self.comp = None
        # Requests awaiting the worker's answer, matched by id (a late
        # answer to a setup that timed out is never taken for a close's).
        self.waiting = {}                   # request id -> [Event, answer]
        self.request_ids = itertools.count(1)
        self.waiting_lock = threading.Lock()
        self.send_lock = threading.Lock()
        self.alive = True
        self.cut_short = set()   # tags of the requests its death left unanswered
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.chan = ours
        cmd = worker_command('node.worker_main(%d)' % theirs.fileno(),
                             node.config.job_user, drop=True)
        try:
            self.proc = CHILDREN.start(cmd, cwd=node.config.dest_path_prefix,
                                         env=job_environment(node.config),
                                         pass_fds=(theirs.fileno(),), close_fds=True,
                                         # nothing of the node's: not its terminal,
                                         # not its log
                                         stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL, start_new_session=True)
        except OSError:
            ours.close()
            raise
        finally:
            theirs.close()
        cfg = node.config
        self.cgroup = None
        self.cgroup_memory = getattr(cfg, 'job_memory', 0) if getattr(cfg, 'job_cgroup', None) \
            else 0
        if getattr(cfg, 'proc_cgroup', None):
            self.cgroup = make_worker_cgroup(
                cfg.proc_cgroup, self.proc.pid, max(cfg.cpus, os.cpu_count() or 1),
                self.cgroup_memory, cfg.job_user.uid if cfg.job_user else None)

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
            'ip_addr': self.node.ip_of(comp), 'reply_addr': list(comp.reply_addr),
            'certfile': cfg.certfile, 'msg_timeout': cfg.msg_timeout,
            'max_file_size': cfg.max_file_size, 'max_reply': max(1, worker_frame_limit(cfg) - 1024),
            **job_limits(cfg),
            'cgroup': self.cgroup, 'cgroup_memory': bool(self.cgroup and self.cgroup_memory),
            'cgroup_slots': max(cfg.cpus, os.cpu_count() or 1) if self.cgroup else 0}))
        self.reader = threading.Thread(target=self._read_loop, daemon=True,
                                       name='worker-%s' % comp.id)
        self.reader.start()

    def send(self, msg):
        data = dc.dumps_plain(msg)
        with self.send_lock:
            dc.send_msg(self.chan, data)

    def request(self, msg, timeout):
        """Send ``msg`` (tagged with a new request id) and wait for the
        worker's answer to that id: ``(tag, *fields)``, or None when the
        worker is gone or the time is up."""
        waiter = [threading.Event(), None, msg[0]]
        with self.waiting_lock:
            rid = next(self.request_ids)
            self.waiting[rid] = waiter
        try:
            self.send((msg[0], rid) + tuple(msg[1:]))
            waiter[0].wait(timeout)
        except OSError:
            pass
        finally:
            with self.waiting_lock:
                self.waiting.pop(rid, None)
        return waiter[1]

    def _answer(self, msg):
        with self.waiting_lock:
            waiter = self.waiting.get(msg[1])
        if waiter is None:
            logger.debug('late %s answer from the worker of %s', msg[0], self.comp.id)
            return
        waiter[1] = (msg[0],) + tuple(msg[2:])
        waiter[0].set()

    def _read_loop(self):
        fault = None
        while True:
            try:
                msg = self._recv_frame()
                if msg is None:
                    break       # the worker exited (or was stopped)
                msg = self._checked(dc.loads_plain(msg))
            except WorkerFault as exc:
                fault = str(exc)
                break
            except ProtocolError as exc:
                fault = 'a malformed message (%s)' % exc
                break
            except OSError:
                break
            try:
                if msg[0] == 'done':
                    self.node.job_done(self.comp, msg[1], msg[2], *msg[3:6])
                elif msg[0] in ('setup', 'closed'):
                    self._answer(msg)
            except Exception:  # keep reading whatever one result did
                logger.exception('handling %r from the worker of %s failed', msg[0], self.comp.id)
        if fault is not None:
            # The worker runs the computation's own code: a worker that breaks
            # the channel's rules is faulty, and is ended, never trusted.
            logger.warning('worker of computation %s (pid %d) sent %s: stopping it as faulty',
                           self.comp.id, self.proc.pid, fault)
            if self.cgroup:
                _cgroup_kill(self.cgroup)       # its jobs, wherever they went
            kill_tree(self.proc.pid, signal.SIGKILL)
            try:
                self.chan.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.fault = fault
        if self.comp.worker is self:
            self.comp.worker_ready.clear()      # admit_job waits for Node.worker_lost
        self.alive = False
        with self.waiting_lock:
            waiters = list(self.waiting.values())
        # what the node was waiting for when it died: a setup or close that
        # gets no answer ends the computation there (Node.worker_lost)
        self.cut_short = {waiter[2] for waiter in waiters}
        for waiter in waiters:      # the worker is gone: nobody will answer
            waiter[0].set()
        self.node.worker_lost(self.comp)

    def exit_reason(self):
        """Why the worker's channel closed, for its jobs' replies and the
        log (waits briefly for its exit status; kills it if it lingers)."""
        try:
            code = self.proc.wait(1.0)
        except subprocess.TimeoutExpired:
            kill_tree(self.proc.pid, signal.SIGKILL)
            code = self.proc.wait()
        if getattr(self, 'fault', None):
            return 'worker %d stopped as faulty: it sent %s' % (self.proc.pid, self.fault)
        if code < 0:
            return 'worker %d killed by signal %d' % (self.proc.pid, -code)
        return 'worker %d exited with status %d' % (self.proc.pid, code)

    def kill_orphans(self):
        """Kill what the dead worker left: its job processes (each leads a
        process group in the worker's session) would run on unseen, their
        results lost with the worker.  Its cgroup holds all of them, those
        that left its session too; it goes with them (a replaced worker's
        handle is never stopped)."""
        if self.cgroup and not remove_cgroup(self.cgroup):
            logger.warning('processes of a dead worker outlive SIGKILL in %s', self.cgroup)
        for pgid in session_groups(self.proc.pid):
            # the job process (its group's leader) is a subreaper: what left
            # its session by setsid is below it, and kill_tree finds it
            kill_tree(pgid, signal.SIGKILL)

    def _recv_frame(self):
        """One frame from the worker, or None at its end.  The length comes
        whenever the worker has something to say; the body is bounded: at
        most worker_frame_limit() bytes, held in the --max_request_memory
        budget (shared with the requests being received; the frame waits
        in the kernel until there is room), and whole by a deadline."""
        head = bytearray(4)
        got = 0
        while got < 4:
            n = self.chan.recv_into(memoryview(head)[got:], 4 - got)
            if not n:
                if got:
                    raise WorkerFault('a cut frame header')
                return None
            got += n
        (size,) = _FRAME_LEN.unpack(head)
        limit = worker_frame_limit(self.node.config)
        if size > limit:
            raise WorkerFault('a frame of %d bytes (over the limit of %d)' % (size, limit))
        reception = self.node.tcp.reception
        while not reception.reserve(size):
            if not self.alive or self.node.stopping.is_set():
                raise OSError('stopping')
            time.sleep(0.05)
        try:
            deadline = time.monotonic() + self.node.config.msg_timeout + \
                size / WORKER_FRAME_RATE
            return self._recv_body(size, deadline)
        finally:
            reception.release(size)

    def _recv_body(self, size, deadline):
        buf = bytearray(size)
        view, got = memoryview(buf), 0
        poller = _select.poll()
        poller.register(self.chan.fileno(), _select.POLLIN)
        while got < size:
            left = deadline - time.monotonic()
            if left <= 0:
                raise WorkerFault('%d of a %d-byte frame by its deadline' % (got, size))
            if not poller.poll(int(left * 1000) + 1):
                continue
            try:
                # MSG_DONTWAIT: the socket stays blocking for the sending threads
                n = self.chan.recv_into(view[got:], min(size - got, CHUNK), socket.MSG_DONTWAIT)
            except BlockingIOError:
                continue
            if not n:
                raise WorkerFault('%d of a %d-byte frame, then its end' % (got, size))
            got += n
        return buf

    @staticmethod
    def _checked(msg):
        """A worker's message, checked like any peer's (WORKER_MESSAGES)."""
        rule = WORKER_MESSAGES.get(msg[0]) if isinstance(msg, tuple) and msg else None
        if rule is None or not rule[0] <= len(msg) - 1 <= len(rule[1]) \
                or not all(check(v) for check, v in zip(rule[1], msg[1:])):
            raise WorkerFault('an invalid message %s' % brief(msg[0] if isinstance(msg, tuple)
                                                              and msg else msg))
        return msg

    def stop(self, timeout=5.0):
        """Ask the worker to exit (its jobs die with it); kill it if needed."""
        try:
            self.chan.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            if self.cgroup:
                _cgroup_kill(self.cgroup)
            # no cgroup: everything its jobs left came back to it (it is
            # their subreaper), so its tree is all of it
            kill_tree(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.chan.close()
        # whatever the computation still runs (setup's processes, a job's)
        if self.cgroup and not remove_cgroup(self.cgroup):
            logger.warning('processes of a worker outlive SIGKILL in %s', self.cgroup)


# ---------------------------------------------------------------- courier

class Delivery:
    __slots__ = ('comp', 'uid', 'hash', 'reply', 'resend', 'queued')

    def __init__(self, comp, uid, job_hash, reply, resend):
        self.comp, self.uid, self.hash, self.reply, self.resend = \
            comp, uid, job_hash, reply, resend
        self.queued = time.monotonic()


# What one JOB_REPLY send came to (Courier._send): True when the client
# ACKed it (as _send always said), else what went wrong.
ACKED = True
REFUSED_REPLY = 'refused'          # the client answered, but not ACK: this reply alone
UNANSWERED = 'unanswered'          # sent whole, no answer in --msg_timeout (frozen, or dropped it)
UNREACHABLE = 'unreachable'        # no connection, or it broke before the frame was out
NO_DESCRIPTOR = 'no descriptor'    # out of descriptors here: nobody's fault but ours
FD_SHORT_ERRNOS = (_errno.EMFILE, _errno.ENFILE, _errno.ENOBUFS, _errno.ENOMEM)


class Courier:
    """Sends JOB_REPLY frames to clients.  Each reply address has its own
    lane (a queue and a thread that ends when idle), so replies to one
    client stay in order and a client that stalls delays only itself.

    A refusal (the client answered, but not ACK) concerns that reply alone.
    Only an unreachable or silent client marks its address down: new
    replies then go straight to the store for RETRY_SECONDS, and a resend
    round stops at its first failure, rather than each waiting out a
    timeout.  A reply that cannot be delivered is stored (Node.reply_undelivered);
    one sent MAX_REPLY_ATTEMPTS times without an ACK is no longer resent
    on its own (Node.resend)."""

    def __init__(self, node):
        self.node = node
        self.lock = threading.Lock()
        self.settled = threading.Condition(self.lock)    # notified as deliveries end
        self.lanes = {}              # reply address -> (queue, thread)
        self.down = {}               # reply address -> when it last failed
        # (compute id, uid, hash): the legacy client reuses a uid (an id())
        # for its next job as soon as a reply is in, maybe before this lane
        # is done with that reply; the hash tells the jobs apart.
        self.in_flight = set()
        self.closing = False

    def submit(self, delivery):
        key = (delivery.comp.id, delivery.uid, delivery.hash)
        addr = delivery.comp.reply_addr
        with self.lock:
            # Past MAX_LANES client addresses at once, a reply waits in the
            # store for the next retry rather than costing another thread.
            closing = self.closing or (addr not in self.lanes
                                       and len(self.lanes) >= MAX_LANES)
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

    def idle(self):
        """True if no reply is queued or being delivered (or stored)."""
        with self.lock:
            return not self.in_flight

    def wait_idle(self, comp, timeout):
        """Wait (at most ``timeout``) until no reply of ``comp`` is queued
        or being sent."""
        deadline = time.monotonic() + timeout
        with self.lock:
            while any(key[0] == comp.id for key in self.in_flight):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.settled.wait(left)
        return True

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
                    self.in_flight.discard((item.comp.id, item.uid, item.hash))
                    self.settled.notify_all()

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
            # rather than each waiting out a timeout, and the rest of a
            # resend round waits for the next one.
            skip = failed is not None and (
                failed >= item.queued if item.resend
                else time.monotonic() - failed < RETRY_SECONDS)
        outcome = UNREACHABLE if skip else self._send(addr, item.reply)
        if outcome is False:
            outcome = UNREACHABLE
        if outcome is ACKED:
            self.node.reply_delivered(item)
            return
        logs = self.node.logs
        if outcome in (UNREACHABLE, UNANSWERED) and not skip:
            with self.lock:
                self.down[addr] = time.monotonic()
        if outcome in (REFUSED_REPLY, UNANSWERED):
            self.node.reply_unacknowledged(item, outcome)
        elif outcome is NO_DESCRIPTOR:
            logs.log('descriptors short', logging.WARNING, 'out of descriptors: the reply '
                     'of job %s waits to be sent to %s:%s', item.uid, addr[0], addr[1])
        elif not skip:
            logs.log('could not deliver job replies', logging.WARNING,
                     'could not deliver the reply of job %s to %s:%s%s', item.uid,
                     addr[0], addr[1], '' if item.resend else '; storing it')
        if not item.resend:
            self.node.reply_undelivered(item)

    def _send(self, addr, reply):
        """One JOB_REPLY to ``addr``: ACKED, REFUSED_REPLY, UNANSWERED,
        UNREACHABLE or NO_DESCRIPTOR."""
        cfg = self.node.config
        try:
            sock = dc.connect(addr, cfg.msg_timeout, self.node.tls_client)
        except OSError as exc:
            logger.debug('connecting to %s:%s failed: %s', addr[0], addr[1], exc)
            return NO_DESCRIPTOR if exc.errno in FD_SHORT_ERRNOS else UNREACHABLE
        with sock:
            try:
                sock.settimeout(cfg.msg_timeout)
                dc.send_msg(sock, b'JOB_REPLY:' + reply)
            except OSError as exc:
                logger.debug('sending to %s:%s failed: %s', addr[0], addr[1], exc)
                return UNREACHABLE
            self.node.counters.add('bytes_out', 14 + len(reply))
            try:
                answer = dc.recv_msg(sock, 1024)
            except (OSError, ProtocolError) as exc:
                logger.debug('no answer from %s:%s: %s', addr[0], addr[1], exc)
                return UNANSWERED
        return ACKED if answer == b'ACK' else REFUSED_REPLY


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
        self.node.counters.add('bytes_in', len(auth) + 4 + len(msg))
        tag, payload = dc.split_tag(msg)
        self.payload = payload
        handler, recovery = HANDLERS.get(tag, (None, False))
        # The run whose token this is (None: not ours; PING needs none).
        self.token_sign = self.node.token_sign(auth, recovery)
        if handler is None or (tag != b'PING' and self.token_sign is None):
            if handler is not None:
                self.node.counters.add('auth_failures')
            self.node.refuse('request without a valid token' if handler
                             else 'unknown request', self.peer)
            if handler is None and self.token_sign is not None:
                self.reply(b'NAK (invalid command: %s)' % msg[:16])
            return
        # A request is a sign of its client's life once it is served, never
        # when it is refused: a client retrying a refused JOB at once would
        # otherwise keep a dead computation from ever becoming a zombie.
        self.refused, self.alive_noted = False, tag == b'PING'
        self.tag = tag
        try:
            # PING may come from anyone: the bounded plain-data decoder.
            body = dc.loads_unauth(payload) if tag == b'PING' else dc.loads_records(payload)
        except ProtocolError as exc:
            self.node.logs.log('undecodable request', logging.INFO,
                               'undecodable %s from %s: %s', tag.decode(), self.peer, exc)
            self.reply(b'NAK (invalid request)')
            return
        try:
            handler(self, body)
        except (OSError, ProtocolError) as exc:
            logger.debug('%s from %s ended early: %s', tag.decode(), self.peer, exc)
        finally:
            if not self.refused:
                self.note_alive()

    def note_alive(self):
        """The client was heard from (once per request).  RESEND_JOB_RESULTS
        resends by itself, after counting."""
        if not self.alive_noted:
            self.alive_noted = True
            self.node.sign_of_life(self.peer, resend=(self.tag != b'RESEND_JOB_RESULTS'))

    def reply(self, data):
        if data == b'Busy' or data.startswith(b'NAK ('):
            self.refused = True
        try:
            dc.send_msg(self.sock, data)
            self.node.counters.add('bytes_out', 4 + len(data))
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
        self.node.queue_pongs(info, self.peer)

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
        if self.node.have_file(comp, target, xf.stat_buf):
            self.reply(b'ACK')
            return
        self.reply(b'NAK')
        self.reply(self.node.receive_file(self.sock, comp, target, xf))

    @handles(b'SETUP')
    def _handle_setup(self, compute_id):
        comp = self.node.state.find(compute_id)
        if comp is None or comp.worker is None:
            self.reply(b'NAK (invalid computation %s)' % brief(compute_id).encode())
            return
        self.reply(self.node.run_setup(comp))

    @handles(b'JOB')
    def _handle_job(self, job):
        comp, entry, refusal = self.node.admit_job(job, self.peer)
        if refusal:
            self.node.logs.log('job refused', logging.WARNING, 'refusing job from %s: %s',
                               self.peer, refusal.decode())
            self.reply(refusal)
            return
        self.note_alive()       # before its reply can be sent
        # Hand the job to the worker before the ACK, so a TERMINATE_JOB or
        # CLOSE the client sends right after it finds the job there; its
        # reply waits for the ACK (job_done): the legacy client breaks (and
        # hangs) on a JOB_REPLY for a job whose ACK it has not yet read.
        failed = self.node.launch_job(comp, job)
        try:
            if not self.reply(b'ACK'):
                entry.unacknowledged = True
                self.node.terminate_job(comp, entry.uid)
        finally:
            entry.answered.set()
        if failed:
            self.node.job_done(comp, entry.uid, failed)

    @handles(b'TERMINATE_JOB')
    def _handle_terminate_job(self, job):
        comp = self.node.state.find(getattr(job, 'compute_id', None))
        if comp is None:
            logger.debug('ignoring TERMINATE_JOB from %s', self.peer)
            self.refused = True
            return
        self.node.terminate_job(comp, getattr(job, 'uid', None))

    @handles(b'CLOSE', recovery=True)
    def _handle_close(self, info):
        if not isinstance(info, dict):
            return
        comp = self.node.lookup(info, self.token_sign)
        if comp is None:
            self.node.refuse('CLOSE for an unknown computation', self.peer)
            self.refused = True
            return
        self.node.close_computation(comp, bool(info.get('terminate_pending')))

    # -- results and recovery
    @handles(b'RESEND_JOB_RESULTS', recovery=True)
    def _handle_resend_job_results(self, info):
        comp = self.node.lookup(info, self.token_sign)
        if comp is None:
            self.reply(dc.dumps_plain(0))
            return
        _, stored, running = self.node.state.progress(comp)
        self.reply(dc.dumps_plain(stored + running))
        self.node.resend(comp, asked=True)

    @handles(b'PENDING_JOBS', recovery=True)
    def _handle_pending_jobs(self, info):
        comp = self.node.lookup(info, self.token_sign)
        reply = {'done': [], 'pending': 0}
        if comp is not None:
            done, _, running = self.node.state.progress(comp)
            reply = {'done': done, 'pending': running}
        self.reply(dc.dumps_plain(reply))

    @handles(b'RETRIEVE_JOB', recovery=True)
    def _handle_retrieve_job(self, info):
        comp = self.node.lookup(info, self.token_sign)
        uid = info.get('uid') if isinstance(info, dict) else None
        rec = self.node.workspace.load_reply(comp, uid) if comp and isinstance(uid, int) else None
        if rec is None or rec['hash'] != info.get('hash'):  # info is a dict when rec is set
            self.reply(dc.dumps(None))
            return
        if self.reply(rec['reply']) and dc.recv_msg(self.sock, 1024) == b'ACK':
            self.node.reply_delivered(Delivery(comp, uid, rec['hash'], None, True))

    @handles(b'JOBS')
    def _handle_jobs(self, info):
        comp = self.node.lookup(info, self.token_sign)
        jobs = self.node.state.jobs_of(comp.id) if comp else []
        self.reply(dc.dumps_plain([{'uid': e.uid, 'hash': e.hash, 'start_time': e.start}
                                   for e in jobs]))


# ---------------------------------------------------------------- servers

class Request:
    """A connection whose auth prefix and first frame have arrived;
    ``reserved`` bytes of the request memory budget are held until its
    handler is done with it."""
    __slots__ = ('sock', 'auth', 'msg', 'reserved')

    def __init__(self, sock, auth, msg, reserved=0):
        self.sock, self.auth, self.msg, self.reserved = sock, auth, msg, reserved


class _Arrival:
    """A connection still sending its auth prefix and frame."""
    __slots__ = ('sock', 'addr', 'deadline', 'handshaking', 'stage', 'need', 'buf', 'auth',
                 'trusted', 'reserved', 'refusal')

    def __init__(self, sock, addr, deadline, tls):
        self.sock, self.addr, self.deadline, self.handshaking = sock, addr, deadline, tls
        self.stage, self.need, self.buf = 'auth', dc.AUTH_LEN, bytearray()
        self.auth = b''
        self.trusted = False     # sent one of our tokens
        self.reserved = 0        # bytes of the request memory budget held
        self.refusal = None      # set when the body is read only to be dropped


class Waker:
    """Wakes a selector loop from other threads at once (no polling): the
    loop registers ``fileno()``, others call ``wake()``."""

    def __init__(self):
        self.r, self.w = socket.socketpair()
        self.r.setblocking(False)
        self.w.setblocking(False)   # a full pair already holds a wake-up

    def fileno(self):
        return self.r.fileno()

    def wake(self):
        try:
            self.w.send(b'x')
        except OSError:     # full (a wake-up is pending) or closed (loop ended)
            pass

    def drain(self):
        try:
            while self.r.recv(4096):
                pass
        except OSError:
            pass

    def close(self):
        _close(self.r)
        _close(self.w)


# Descriptors the node keeps for itself, beyond client connections: its
# files, sockets, wakers and selectors, the workers' channels, courier
# connections and stored-reply writes, PONG and task threads.
FD_RESERVE = 24 + MAX_COMPUTATIONS + 2 * MAX_LANES + PONG_THREADS + TASK_THREADS
FD_PAUSE_MIN, FD_PAUSE_MAX = 0.05, 1.0   # accepting pauses this long while descriptors are short


def fd_budget(soft, max_connections):
    """(pending connections, requests handled at once) that fit a soft
    descriptor limit of ``soft`` and still leave room for the work in
    flight: FD_RESERVE (at most half the limit), then two descriptors per
    request being handled (its socket and a file), then the pending ones
    (a fifth kept for the Reception's slack, see _shed_idle)."""
    if soft == resource.RLIM_INFINITY:
        return MAX_PENDING, max_connections
    avail = max(8, soft - min(FD_RESERVE, soft // 2))
    handlers = min(max_connections, max(4, avail // 3))
    return max(4, min(MAX_PENDING, (avail - 2 * handlers) * 4 // 5)), handlers


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
        self.waker = Waker()
        self.sel.register(self.waker, selectors.EVENT_READ, None)
        self.lock = threading.Lock()
        self.incoming = []
        self.count = 0               # arrivals pending (for the cap)
        self.want_read, self.want_write = (BlockingIOError,), ()
        if self.node.tls_server is not None:
            import ssl  # only a TLS node pays for the module
            self.want_read = (ssl.SSLWantReadError, BlockingIOError)
            self.want_write = (ssl.SSLWantWriteError,)
        # Stay inside the descriptor limit, with room for the work in
        # flight (fd_budget); past the cap, the oldest connection that has
        # sent nothing yet makes room for a new one (_shed_idle), so idle
        # peers cannot lock clients out.
        self.max_pending = server.max_pending
        self.slack = max(2, self.max_pending // 4)
        self.stopped = False
        self.buffered = 0            # request bytes reserved (under self.lock)

    def add(self, sock, addr):
        with self.lock:
            if self.stopped or self.count >= self.max_pending + self.slack:
                refused = True
            else:
                refused = False
                self.count += 1
                self.incoming.append((sock, addr))
        if refused:
            self.node.refuse('connection: too many pending', addr[0])
            _close(sock)
            return
        self.waker.wake()

    def reserve(self, size):
        """Hold ``size`` bytes of the request memory budget; False if the
        requests already being received and handled hold too much."""
        with self.lock:
            if self.buffered + size > self.node.config.max_request_memory:
                return False
            self.buffered += size
            return True

    def release(self, size):
        if size:
            with self.lock:
                self.buffered -= size

    def stop(self):
        with self.lock:
            self.stopped = True
        self.waker.wake()

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
        with self.lock:
            incoming, self.incoming = self.incoming, []
        for sock, _ in incoming:
            _close(sock)
        self.sel.close()
        self.waker.close()

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
                self.node.refuse('request not complete in time', arrival.addr[0],
                                 logging.INFO)
                self._drop(arrival)

    def _accept_incoming(self):
        self.waker.drain()
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
        self._shed_idle()

    def _shed_idle(self):
        """Over the pending cap: drop the oldest connections that have not
        sent a byte."""
        with self.lock:
            over = self.count - self.max_pending
        if over <= 0:
            return
        idle = sorted((a for a in (k.data for k in self.sel.get_map().values())
                       if a is not None and a.stage == 'auth' and not a.buf
                       and not a.handshaking), key=lambda a: a.deadline)
        for a in idle[:over]:
            self.node.refuse('connection: idle while too many are pending', a.addr[0],
                             logging.INFO)
            self._drop(a)

    def _advance(self, a):
        """Read as far as the data allows; hand over a complete request."""
        try:
            if a.handshaking:
                a.sock.do_handshake()
                a.handshaking = False
            while True:
                if a.refusal is not None:
                    self._discard(a)
                    return
                chunk = a.sock.recv(min(a.need - len(a.buf), CHUNK))
                if not chunk and a.stage == 'auth' and not a.buf:
                    self._drop(a)   # connected and left (a port probe): no refusal
                    return
                if not chunk:
                    raise ProtocolError('closed after %d bytes' % len(a.buf))
                a.buf += chunk
                if a.trusted:
                    # A token holder's big request may take longer than one
                    # --msg_timeout in all, as long as it keeps coming.
                    a.deadline = time.monotonic() + self.node.config.msg_timeout
                if len(a.buf) == a.need and self._next_stage(a):
                    return
        except self.want_write:
            self.sel.modify(a.sock, selectors.EVENT_WRITE, a)
        except self.want_read:
            self.sel.modify(a.sock, selectors.EVENT_READ, a)
        except (OSError, ProtocolError) as exc:
            self.node.logs.log('dropped request', logging.DEBUG,
                               'dropping request from %s: %s', a.addr[0], exc)
            self.node.counters.add('refused_connections')
            self._drop(a)

    def _discard(self, a):
        """Read and drop the body of a refused request (costing no memory),
        then close: the legacy client reads the NAK (sent at once, or now)
        once it has sent everything, and logs its text."""
        while a.need > 0:
            got = len(a.sock.recv(min(a.need, CHUNK)))
            if not got:
                raise ProtocolError('closed while its refused body was read')
            a.need -= got
            a.deadline = time.monotonic() + self.node.config.msg_timeout
        self.sel.unregister(a.sock)
        self._forget(None)
        if a.refusal:
            try:
                a.sock.settimeout(1.0)
                dc.send_msg(a.sock, a.refusal)
            except OSError:
                pass
        _close(a.sock)

    def _next_stage(self, a):
        """Move past a completed stage; True once the request is whole."""
        data, a.buf = bytes(a.buf), bytearray()
        if a.stage == 'auth':
            a.auth = data
            a.trusted = self.node.auth_ok(data, True)
            a.stage, a.need = 'length', 4
            return False
        if a.stage == 'length':
            (size,) = struct.unpack('>L', data)
            if size and not self._admit_size(a, size):
                return False
            if size:
                a.stage, a.need = 'body', size
                return False
            data = b''
        self.sel.unregister(a.sock)
        self._forget(None)
        a.sock.setblocking(True)
        request, a.reserved = Request(a.sock, a.auth, data, a.reserved), 0
        self.server.start_handler(request, a.addr)
        return True

    def _admit_size(self, a, size):
        """Check a frame length before reading the frame: a peer without
        a token may send only a small PING; a token holder gets a clear
        refusal (after its body is read and dropped) when the frame is over
        --max_request_size or the budget of --max_request_memory is spent."""
        cfg = self.node.config
        if not a.trusted:
            if size > UNAUTH_FRAME_LIMIT:
                raise ProtocolError('unauthenticated frame of %d bytes' % size)
            return True
        if size > cfg.max_request_size:
            a.refusal = (b'NAK (request of %d bytes is over the limit of %d bytes: '
                         b'--max_request_size)' % (size, cfg.max_request_size))
        elif not self.reserve(size):
            a.refusal = (b'NAK (node is receiving too much data; %d bytes refused '
                         b'for now: --max_request_memory)' % size)
        else:
            a.reserved = size
            return True
        self.node.counters.add('refused_connections')
        self.node.logs.log('request too large', logging.WARNING, 'refused a request of '
                           '%d bytes from %s: %s', size, a.addr[0], a.refusal[5:-1].decode())
        a.stage, a.need = 'discard', size
        # Say it now: a peer that announced a length it will never send
        # reads the NAK without waiting out --msg_timeout.
        try:
            a.sock.send(struct.pack('>L', len(a.refusal)) + a.refusal)
            a.refusal = b''
        except OSError:     # full buffer (or TLS wants more): say it at the end
            pass
        return False

    def _drop(self, a):
        try:
            self.sel.unregister(a.sock)
        except (KeyError, ValueError):
            pass
        self.release(a.reserved)
        a.reserved = 0
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


class TCPServer(socketserver.TCPServer):
    """The listening socket: accepted connections go to the Reception;
    complete requests run in the ``request`` pool, at most
    --max_connections at once (the excess is refused at once).

    socketserver's flow is split in two here: ``process_request`` (called
    by ``serve_forever`` for each accepted socket) does not start a thread
    but hands the socket to the Reception, which later calls
    ``start_handler`` with a whole ``Request``; that runs socketserver's
    ``finish_request`` in a pooled thread (what ThreadingMixIn does with a
    new thread per request, which cost the node a thread start per job).
    ``shutdown_request`` therefore gets a ``Request``, not a socket.
    ``serve_forever`` and ``shutdown`` are replaced: the accept loop
    waits on a Waker as well as the listening socket, so ``shutdown``
    returns at once instead of after a poll interval."""
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, addr, node):
        self.node = node
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        self.max_pending, handlers = fd_budget(soft, node.config.max_connections)
        if handlers < node.config.max_connections:
            logger.warning('the descriptor limit (%d) allows %d requests at once, not %d '
                           '(--max_connections), and %d pending connections', soft, handlers,
                           node.config.max_connections, self.max_pending)
        self.slots = threading.BoundedSemaphore(handlers)
        # A slot is taken before a request is queued, so the queue never
        # refuses; idle threads end after a second (jobs come much faster).
        self.handlers = TaskPool('request', handlers, handlers, idle_seconds=1.0)
        self.pause = FD_PAUSE_MIN       # the next back-off while descriptors are short
        # Before binding: a failed bind calls server_close, which closes it.
        self.waker = Waker()
        self.stopping = threading.Event()
        self.stopped = threading.Event()
        super().__init__(addr, RequestHandler)
        self.reception = Reception(self)

    def serve_forever(self, poll_interval=None):
        try:
            with selectors.DefaultSelector() as sel:
                sel.register(self, selectors.EVENT_READ)
                sel.register(self.waker, selectors.EVENT_READ)
                resume = None       # while descriptors are short: when to listen again
                while not self.stopping.is_set():
                    timeout = None if resume is None else max(0.0, resume - time.monotonic())
                    for key, _ in sel.select(timeout):
                        if key.fileobj is self and not self.stopping.is_set() \
                                and not self._accept():
                            # The listener stays readable: stop polling it
                            # for a while, or this loop would spin.
                            sel.unregister(self)
                            resume = time.monotonic() + self.pause
                            self.pause = min(FD_PAUSE_MAX, self.pause * 2)
                    if resume is not None and time.monotonic() >= resume:
                        sel.register(self, selectors.EVENT_READ)
                        resume = None
        finally:
            self.stopped.set()

    def _accept(self):
        """Accept one connection; False if out of descriptors."""
        try:
            request, client_address = self.get_request()
        except OSError as exc:      # the peer left already, or out of descriptors
            if exc.errno in FD_SHORT_ERRNOS:
                self.node.logs.log('descriptors short', logging.WARNING,
                                   'out of descriptors (limit %d): not accepting connections '
                                   'for %gs', resource.getrlimit(resource.RLIMIT_NOFILE)[0],
                                   self.pause)
                return False
            return True
        self.pause = FD_PAUSE_MIN
        if self.verify_request(request, client_address):
            self.process_request(request, client_address)
        else:
            self.shutdown_request(request)
        return True

    def shutdown(self):
        """End serve_forever (which must have been started) and wait for it."""
        self.stopping.set()
        self.waker.wake()
        self.stopped.wait()

    def server_close(self):
        super().server_close()
        self.waker.close()
        self.handlers.close(0)      # requests being handled finish on their own

    def verify_request(self, request, client_address):
        try:
            local = request.getsockname()[0]
        except OSError:
            return False
        return self.node.serves_address(local)

    def process_request(self, request, client_address):
        self.reception.add(request, client_address)

    def start_handler(self, request, client_address):
        if not self.slots.acquire(blocking=False):
            self.node.refuse('request: too many at once', client_address[0])
            self.reception.release(request.reserved)
            _close(request.sock)
            return
        if not self.handlers.submit(self._handle_request, request, client_address):
            self._request_done(request)     # closing
            _close(request.sock)

    def _handle_request(self, request, client_address):
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)
            self._request_done(request)

    def _request_done(self, request):
        self.reception.release(request.reserved)
        self.slots.release()

    def shutdown_request(self, request):
        super().shutdown_request(request.sock if isinstance(request, Request) else request)

    def handle_error(self, request, client_address):
        logger.exception('request from %s failed', client_address[0])


# ---------------------------------------------------------------- the node

# ---------------------------------------------------------------- service controls

def parse_hhmm(text, option):
    """'HH:MM' -> minute of the day; ValueError with a one-line message."""
    m = re.match(r'^\s*(\d{1,2}):(\d{2})\s*$', text or '')
    if not m or int(m.group(1)) > 23 or int(m.group(2)) > 59:
        raise ValueError('%s %r: expected a time of day as HH:MM' % (option, text))
    return int(m.group(1)) * 60 + int(m.group(2))


class ServiceClock:
    """Minute of the day (a float) for the --service_* window.  Tests run
    it fast: $DISPYNODE_CLOCK_START (HH:MM) is the minute it shows at start
    and $DISPYNODE_MINUTE_SECONDS how many real seconds a minute lasts."""

    def __init__(self, start=None, minute_seconds=60.0):
        self.t0 = time.monotonic()
        self.start = start
        self.minute_seconds = minute_seconds

    @classmethod
    def from_env(cls, environ=os.environ):
        start = environ.get('DISPYNODE_CLOCK_START')
        try:
            rate = float(environ.get('DISPYNODE_MINUTE_SECONDS') or 60.0)
        except ValueError:
            rate = 0
        if not rate > 0:
            raise ValueError('DISPYNODE_MINUTE_SECONDS must be a positive number')
        return cls(parse_hhmm(start, 'DISPYNODE_CLOCK_START') if start else None, rate)

    def minute(self):
        elapsed = (time.monotonic() - self.t0) / self.minute_seconds
        if self.start is not None:
            return (self.start + elapsed) % 1440
        if self.minute_seconds != 60.0:
            lt = time.localtime(time.time() - (time.monotonic() - self.t0))
            return (lt.tm_hour * 60 + lt.tm_min + lt.tm_sec / 60.0 + elapsed) % 1440
        lt = time.localtime()
        return lt.tm_hour * 60 + lt.tm_min + lt.tm_sec / 60.0


def service_phase(now, start, stop, end):
    """Where minute ``now`` falls in the daily window that opens at
    ``start``: 'on' (takes computations), 'stopped' (after --service_stop:
    running work goes on, nothing new) or 'closed' (after --service_end).
    Windows may span midnight."""
    if stop is None and end is None:
        return 'on'

    def after_start(minute):
        return (minute - start) % 1440

    pos = after_start(now)
    if stop is not None and pos >= after_start(stop):
        return 'closed' if end is not None and pos >= after_start(end) else 'stopped'
    if end is not None and pos >= after_start(end):
        return 'closed'
    return 'on'


class ServiceControl:
    """Node-side controls of later dispy nodes, for 4.5 clients: the daily
    service window, --serve, --ping_interval, --client_shutdown, and the
    console's stop/start/cpus/release.  A mixin of Node; the timer calls
    ``_service_tick``."""

    def _init_service(self):
        cfg = self.config
        self.quit = threading.Event()        # main() exits when set
        self.started_at = time.monotonic()
        self.paused = False                  # console 'stop', control 'pause'
        self.draining = False                # control 'drain' (also NodeState.draining)
        self.state_listeners = []            # callables (event, text): see notify_state
        self.served = 0                      # computations ended
        self.clock = getattr(cfg, 'service_clock', None) or ServiceClock()
        self.window = (getattr(cfg, 'service_start_minute', None),
                       getattr(cfg, 'service_stop_minute', None),
                       getattr(cfg, 'service_end_minute', None))
        if self.window[0] is None:
            # As the later node: without a start the window opens at start-up.
            self.window = (self.clock.minute(),) + self.window[1:]
        self.phase = self.service_phase()
        self._last_ping = time.monotonic()

    def service_phase(self):
        return service_phase(self.clock.minute(), *self.window)

    def in_service(self):
        """Whether we announce ourselves and take new computations."""
        return self.phase == 'on' and not self.paused and self.service_refusal() is None

    def service_refusal(self):
        """Why a new computation is refused (None: it is welcome)."""
        if self.draining:
            return b'NAK (node is draining)'
        if self.phase != 'on':
            return b'NAK (node is outside its service hours)'
        if self.paused:
            return b'NAK (node is stopped)'
        serve = getattr(self.config, 'serve', -1)
        if serve > 0:
            active, _ = self.state.snapshot()
            if self.served + len(active) >= serve:
                return b'NAK (node serves no more computations)'
        return None

    def request_exit(self, why):
        if not self.quit.is_set():
            logger.info('exiting: %s', why)
            self.quit.set()

    def computation_ended(self, comp, shutdown_asked=False):
        """Called once per retired computation."""
        with self.state.lock:
            self.served += 1
            served = self.served
        if shutdown_asked:
            if getattr(self.config, 'client_shutdown', False):
                self.request_exit('the cleanup of computation %s called dispynode_shutdown()'
                                  % comp.id)
            else:
                logger.warning('computation %s called dispynode_shutdown(), which needs '
                               '--client_shutdown; ignored', comp.id)
        serve = getattr(self.config, 'serve', -1)
        if serve > 0 and served >= serve:
            active, _ = self.state.snapshot()
            if not active:
                self.request_exit('served %d computation(s) (--serve)' % served)
        if not (self.quit.is_set() or self.stopping.is_set()):
            self.spawn(self._refill_spare, key='spare')     # for the next computation

    def _service_tick(self):
        phase = self.service_phase()
        if phase != self.phase:
            self.phase = phase
            logger.info('service window: %s', {'on': 'open', 'stopped': 'stopped (running '
                        'work goes on, no new computation)', 'closed': 'ended'}[phase])
            if phase == 'on':
                self.announce()
        if phase == 'closed':
            for comp in self.state.to_evict():
                self.spawn(self.evict, comp, 'service window ended')
        interval = getattr(self.config, 'ping_interval', 0)
        now = time.monotonic()
        if interval and now - self._last_ping >= interval:
            self._last_ping = now
            if self.state.is_free():
                self.announce()

    # -- multi-homed nodes
    def addr_for(self, client_ip):
        """Our address as the client at ``client_ip`` can reach it: with one
        -i, its (external) address; with several or -i 0.0.0.0, the local
        address the route to the client leaves from, mapped to the
        --ext_ip_addr paired with it."""
        pairs = getattr(self.config, 'ip_addrs', None)
        if not pairs or (len(pairs) == 1 and pairs[0][0] != '0.0.0.0') or not is_ipv4(client_ip):
            return self.config.ext_ip_addr
        with self.lookup_lock:
            local = self.route_cache.get(client_ip)
        if local is None:
            local = route_source(client_ip) or pairs[0][0]   # a syscall: not under the lock
            with self.lookup_lock:
                if len(self.route_cache) >= 1024:
                    self.route_cache.clear()
                self.route_cache[client_ip] = local
        for bind, ext in pairs:
            if bind == local:
                return ext or bind
        if pairs[0][0] == '0.0.0.0':
            return pairs[0][1] or (local if local != '0.0.0.0' else self.config.ext_ip_addr)
        return self.config.ext_ip_addr

    def ip_of(self, comp):
        return getattr(comp, 'node_ip', None) or self.config.ext_ip_addr

    def broadcast_targets(self):
        """(address announced, broadcast address) for each served address."""
        pairs = getattr(self.config, 'ip_addrs', None)
        if not pairs or len(pairs) == 1 and pairs[0][0] != '0.0.0.0':
            return [(self.config.ext_ip_addr, self.broadcast)]
        targets = []
        for bind, ext in pairs:
            if bind == '0.0.0.0':
                for addr in sorted(set(interface_addresses().values())):
                    if not addr.startswith('127.'):
                        targets.append((ext or addr, broadcast_address(addr)))
            else:
                targets.append((ext or bind, broadcast_address(bind)))
        return targets or [(self.config.ext_ip_addr, self.broadcast)]

    def serves_address(self, local_ip):
        """Whether a TCP connection to our ``local_ip`` is for us (several
        -i addresses share one listening socket on 0.0.0.0)."""
        pairs = getattr(self.config, 'ip_addrs', None)
        if not pairs or self.config.ip_addr != '0.0.0.0':
            return True
        binds = [b for b, _ in pairs]
        return '0.0.0.0' in binds or local_ip in binds

    def describe_addresses(self):
        pairs = getattr(self.config, 'ip_addrs', None) or [(self.config.ip_addr,
                                                             self.config.ext_ip_addr)]
        return ', '.join(b if not e or e == b else '%s (as %s)' % (b, e) for b, e in pairs)

    # -- console commands
    def set_cpus(self, cpus):
        """Offer ``cpus`` CPUs from now on (running jobs go on)."""
        total = os.cpu_count() or 1
        if not isinstance(cpus, int) or isinstance(cpus, bool):
            raise ValueError('cpus must be an integer')
        cpus = cpus if cpus > 0 else total + cpus
        if not 0 < cpus <= total:
            raise ValueError('cpus must be between %d and %d' % (-total + 1, total))
        with self.state.lock:
            self.state.avail_cpus += cpus - self.state.cpus
            self.state.cpus = cpus
        self.config = self.config.replace(cpus=cpus)
        logger.info('now offering %d cpus', cpus)
        if self.state.is_free():
            self.announce()
        else:
            self.spawn(self._tell_cpus)
        return cpus

    def remember_sign(self, info, peer):
        """Keep the sign of a client's PING: a PONG made with it tells
        that client our CPU count later (the only way a 4.5 client learns
        it, and it only ever lowers it)."""
        if isinstance(info, dict) and isinstance(info.get('sign'), str) \
                and valid_port(info.get('port')):
            with self.lookup_lock:
                if len(self.client_signs) >= 256:
                    self.client_signs.clear()
                self.client_signs[(peer, info['port'])] = info['sign']

    def _tell_cpus(self):
        sched = self.state.client()
        with self.lookup_lock:
            sign = self.client_signs.get(sched) if sched else None
        if sign is None:
            logger.info('the client does not know of the new cpu count until it '
                        'discovers the node again')
            return
        pong = self.pong_for({'version': dc.PROTOCOL_VERSION, 'port': sched[1],
                              'sign': sign}, sched[0])
        self._tcp_notify(sched, b'PONG:' + dc.dumps_plain(pong))

    def pause(self):
        self.paused = True
        logger.info('stopped: running work goes on, no new computation')
        self.notify_state('paused', 'paused: no new computation')

    def resume(self):
        self.paused = False
        logger.info('started: taking computations')
        self.notify_state('serving', 'serving')
        self.announce()

    def drain(self):
        """Take no new computation or job and stop announcing; once the
        running jobs have ended and their replies are delivered or stored,
        the node exits (the timer checks ``drained``).  Returns how many
        jobs run."""
        with self.state.lock:
            first = not self.draining
            self.draining = self.state.draining = True
            running = len(self.state.jobs)
        if first:
            logger.info('draining: no new computation or job; the node exits once its %d '
                        'running job(s) have ended and their replies are delivered or '
                        'stored', running)
            self.notify_state('draining', 'draining: %d job(s) running' % running)
        self._drain_check()
        return running

    def drained(self):
        """True once a drain has nothing left to wait for: no job runs,
        none is being finished, and no reply is on its way to a client."""
        if not self.draining or self.state.busy_cpus():
            return False
        with self.finishing_lock:
            if self.finishing:
                return False
        return self.courier.idle()

    def _drain_check(self):
        if self.drained():
            self.request_exit('drained')

    def notify_state(self, event, text):
        """Tell the state listeners (for instance a service manager's
        status line) about ``event``: 'serving', 'paused', 'draining',
        'stopping' or 'stopped', with a one-line ``text``.  A listener must
        not block; its errors are logged."""
        for listener in list(self.state_listeners):
            try:
                listener(event, text)
            except Exception:  # a listener must not break the node
                logger.exception('state listener %r failed', listener)

    def health(self):
        """None while the node takes new work, else why not (/healthz)."""
        if self.stopping.is_set() or self.quit.is_set():
            return 'stopping'
        if self.draining:
            return 'draining'
        if self.paused:
            return 'paused'
        why = self.guard.refusal()
        if why:
            return 'guard: %s' % why
        if self.phase != 'on':
            return 'outside the service window'
        why = self.service_refusal()
        if why:
            text = why.decode()
            return text[5:-1] if text.startswith('NAK (') else text
        return None

    def release(self, why='released from the console'):
        """Drop the current client's computations now (its view: as a
        zombie drop).  Returns how many."""
        active, _ = self.state.snapshot()
        for comp in active:
            self.spawn(self.evict, comp, why)
        return len(active)


class SystemdNotifier:
    """sd_notify(3) in a few lines, without libsystemd: READY=1, STOPPING=1
    and STATUS= datagrams to $NOTIFY_SOCKET (a path, or '@name' for the
    abstract namespace), for a ``Type=notify`` unit.  Does nothing without
    it; a send that fails is logged once and never stops the node."""

    def __init__(self, address):
        self.address = self.sock = self.last_status = None
        self.failed = self.ready = False
        if not address:
            return
        if address[0] == '@':
            address = '\0' + address[1:]
        elif address[0] != '/':
            logger.warning('NOTIFY_SOCKET=%s: not a UNIX socket address; not notifying',
                           address)
            return
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.settimeout(1.0)       # systemd reads at once; never hang on it

    def notify(self, *fields):
        if self.sock is None:
            return False
        try:
            self.sock.sendto('\n'.join(fields).encode('utf-8', 'replace'), self.address)
        except OSError as exc:
            if not self.failed:
                self.failed = True
                logger.warning('NOTIFY_SOCKET: cannot notify systemd: %s', exc)
            return False
        return True

    def status(self, text, *fields):
        """STATUS= (with ``fields``), sent only when the text changed."""
        if text != self.last_status or fields:
            self.last_status = text
            self.notify(*(fields + ('STATUS=' + text,)))

    def close(self):
        if self.sock is not None:
            self.sock.close()
            self.sock = None


class Node(ServiceControl):
    """Owns the servers, threads, workers, state and store."""

    def __init__(self, config):
        # The jobs' cgroup and the prefix lock are this node's to release
        # only if its own start_up took them (not a caller's that it was handed).
        self.owns_cgroup = not config.started_up
        config = self.config = start_up(config)
        self.owns_proc_cgroup = False
        try:
            self._init(config)
        except BaseException:
            if getattr(self, 'tcp', None) is not None:
                self.tcp.server_close()
            if getattr(self, 'udp', None) is not None:
                self.udp.close()
            self._release_cgroup()      # no node will use it
            self._release_prefix()
            raise

    def _contain_jobs(self, config):
        """Every job gets a cgroup of its own where the node can make one:
        it holds whatever the job starts (setsid or not), and cgroup.kill
        ends it.  The jobs' group is the memory limit's when there is one,
        else a plain one that this Node makes when it starts serving and
        removes when it closes."""
        group, note = getattr(config, 'proc_cgroup', None), None
        if group is None and getattr(config, 'proc_cgroup_note', None) is None:
            group, note = cgroup_v2_jobs()
            self.owns_proc_cgroup = group is not None
            config = config.replace(proc_cgroup=group, proc_cgroup_note=note)
        if group:
            logger.debug('each job runs in a cgroup of its own under %s', group)
        else:
            logger.info('jobs are contained without a cgroup (the worker is their '
                        'subreaper): %s', config.proc_cgroup_note)
        return config

    def _init(self, config):
        self.state = NodeState(config.cpus)
        self.sign = dc.new_sign(config.secret)
        self.auth = dc.auth_code(config.secret, self.sign)
        # Tokens of earlier runs (restored computations): auth -> that run's sign.
        self.old_auths = {}
        self.old_signs = set()
        self.tls_server, self.tls_client = config.tls_contexts
        self.workspace = Workspace(config.dest_path_prefix, config.job_user)
        self.workspace.shared = lambda comp: any(
            c is not comp and c.dest_path == comp.dest_path for c in self.state.snapshot()[0])
        self.courier = Courier(self)
        # Background work (retirements, notifications, spare workers).
        self.tasks = TaskPool('task', TASK_THREADS, TASK_QUEUE)
        self.pongs = TaskPool('pong', PONG_THREADS, PONG_QUEUE, idle_seconds=2.0,
                              drop_oldest=True)
        self.ping_gate = RateGate(PING_SOURCE_INTERVAL, PING_RATE, PING_BURST)
        self.service_threads = []   # tcp-server, udp-listener, timer
        self.client_signs = {}      # (client ip, port) -> sign of its last PING
        self.route_cache = {}       # client ip -> our address its route leaves from
        self.lookup_lock = threading.Lock()     # guards the two tables above
        self.counters = Counters()
        self.logs = LogLimiter()
        self.held = collections.deque()     # replies neither delivered nor stored (yet)
        self.held_lock = threading.Lock()    # guards held and invites
        self.invites = []                   # (when, client ip, port): see retire
        self.stopping = threading.Event()
        self.finishing = 0          # job_done calls under way (a drain waits for them)
        self.finishing_lock = threading.Lock()
        self._closed = self._started = False
        self.spare = None                   # a started worker awaiting a computation
        self.spare_lock = threading.Lock()
        self._close_lock = threading.Lock()
        self.tcp = TCPServer((config.ip_addr, config.node_port), self)
        self.port = self.tcp.server_address[1]
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind(('', self.port))
        self.udp.settimeout(0.5)
        self.broadcast = broadcast_address(config.ip_addr) if config.ip_addr != '0.0.0.0' \
            else '<broadcast>'
        self._restore()
        self._init_service()
        self._init_observers()
        self.systemd = SystemdNotifier(getattr(config, 'notify_socket', None))
        if self.systemd.sock is not None:
            self.state_listeners.append(self._tell_systemd)
        # PID 1 (a container without --init) inherits every orphan: the timer reaps them.
        self.pid_one = os.getpid() == 1

    # -- start and stop
    def start(self):
        self._started = True
        self.config = self._contain_jobs(self.config)     # before the first worker
        self._start_observers()
        self.tcp.reception.start()
        self.spawn(self._refill_spare, key='spare')
        for target, name in ((self.tcp.serve_forever, 'tcp-server'),
                             (self._udp_loop, 'udp-listener'), (self._timer_loop, 'timer')):
            thread = threading.Thread(target=target, name=name, daemon=True)
            self.service_threads.append(thread)
            thread.start()
        logger.info('%s', self.start_up_line())
        if not self.config.secret:
            job_user = self.config.job_user
            logger.warning('no secret is set: anyone who reaches port %d can run code here as '
                           'user %s (set DISPYNODE_SECRET, --secret_file or -s)', self.port,
                           job_user.name if job_user else _user_name(os.geteuid()))
        logger.info('serving %d cpus at %s:%d (name %r)', self.config.cpus,
                    self.describe_addresses(), self.port, self.config.name)
        self.notify_state('serving', 'serving %d cpus' % self.config.cpus)
        self.announce()

    def start_up_line(self):
        """What an operator checks first: version, pid, Python, prefix,
        addresses, TLS, secret and service window, in one log line."""
        cfg = self.config
        window = ', '.join('%s %s' % (opt[8:], getattr(cfg, opt)) for opt in (
            'service_start', 'service_stop', 'service_end') if getattr(cfg, opt, None))
        return ('dispynode %s (dispy protocol %s) pid %d, Python %s (%s), prefix %s, '
                'addresses %s port %d, TLS %s, secret %s, service window %s' % (
                    __version__, dc.PROTOCOL_VERSION, os.getpid(),
                    '.'.join(map(str, sys.version_info[:3])), sys.executable,
                    cfg.dest_path_prefix, self.describe_addresses(), self.port,
                    'on' if cfg.certfile else 'off', 'on' if cfg.secret else 'off',
                    '%s (%s now)' % (window, {'on': 'open', 'stopped': 'stopped'}.get(
                        self.phase, 'closed')) if window else 'always'))

    def _tell_systemd(self, event, text):
        """A state listener (notify_state): READY=1 once the node serves,
        STOPPING=1 when it drains or stops, STATUS= with each change."""
        fields = ()
        if event == 'serving' and not self.systemd.ready:
            self.systemd.ready = True
            fields = ('READY=1', 'MAINPID=%d' % os.getpid())
        elif event in ('draining', 'stopping'):
            fields = ('STOPPING=1',)
        elif event == 'stopped':
            return
        self.systemd.status(self.status_line(), *fields)

    def status_line(self):
        """One line on the node's state, for systemd's STATUS=."""
        why = self.health()
        if why == 'stopping':
            return 'stopping'
        st = self.state.observe()
        head = 'serving %d cpus at %s:%d' % (st['cpus'], self.config.ext_ip_addr, self.port)
        if why == 'draining':
            head += ' (draining: it exits once its running jobs have ended)'
        elif why:
            head += ' (refusing new work: %s)' % why
        if not st['computations']:
            return head + '; idle'
        return '%s; client %s, %d computations, %d of %d cpus busy, %d results stored' % (
            head, st['client'] or '-', len(st['computations']), st['cpus_busy'], st['cpus'],
            st['stored_results'])

    def close(self):
        """Stop serving: end running jobs, deliver or store their replies,
        tell schedulers we leave.  Safe to call more than once."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        self.stopping.set()
        self.notify_state('stopping', 'stopping')     # (systemd: STOPPING=1)
        self._stop_observers()
        if self._started:
            self.tcp.shutdown()
            self.tcp.reception.stop()
        self.tcp.server_close()
        active, _ = self.state.snapshot()
        for comp in active:
            self.evict(comp, 'node shutting down')
        deadline = time.monotonic() + 3.0
        while self.state.busy_cpus() and time.monotonic() < deadline:
            time.sleep(0.05)
        if self._started:
            self.courier.drain(3.0)
        self.retry_held(store_only=True)    # a last try to keep them
        for comp in active:
            # A retiring computation's worker may be running its cleanup: it
            # gets 2 s.  Any other's jobs are over (or past waiting for), and
            # a worker runs no cleanup at shutdown: its tree is killed rather
            # than waited for (a worker still booting reads its channel late).
            if comp.worker is not None:
                comp.worker.stop(2.0 if self.state.phase_of(comp) is Phase.RETIRING else 0)
            self._settle(comp, self.state.shut_down)
            self.send_terminated(comp)
        with self.spare_lock:
            spare, self.spare = self.spare, None
        if spare is not None:
            spare.stop(0)   # killed: it holds no computation, and may still be booting
        self.tasks.close(3.0)
        self.pongs.close(1.0)
        # The UDP port is free only once no thread is inside recvfrom: an
        # empty datagram to ourselves wakes the listener.
        try:
            self.udp.sendto(b'', ('127.0.0.1', self.port))
        except OSError:
            pass
        for thread in self.service_threads:
            thread.join(2.0)
        self.udp.close()
        self._release_cgroup()      # every worker is stopped by now
        logger.info('node at %s:%d stopped', self.config.ext_ip_addr, self.port)
        self.notify_state('stopped', 'stopped')
        self.systemd.close()
        self._release_prefix()

    def evict(self, comp, reason, kill_jobs=True):
        """Drop ``comp`` as the original node leaves a computation: its
        running jobs are killed (whole process tree) and send no reply, then
        the client gets TERMINATED, so a 4.5 client reschedules reentrant
        jobs on another node and marks the others Abandoned.  Results that
        finished earlier stay stored for recovery.  Used by shutdown, the
        console's release, --service_end and the zombie drop; the zombie
        drop lets running jobs finish (their results are stored), as the
        original does for a silent client."""
        change = self.state.evict(comp, reason, kill_jobs)
        if Do.LOG_DROP in change:
            logger.warning('dropping computation %s of %s: %s', comp.id, comp.scheduler_ip,
                           reason)
        for uid in change.uids:
            self.terminate_job(comp, uid)
        if change and not self.stopping.is_set():
            self.retire(comp)       # at once, or when its last job ends

    def spawn(self, func, *args, key=None):
        """Run ``func(*args)`` on the bounded task pool; False if refused."""
        if not self.tasks.submit(func, *args, key=key):
            self.logs.log('task refused', logging.WARNING,
                          'background task %s refused (pool closing or full)',
                          getattr(func, '__name__', func))
            return False
        return True

    def _restore(self):
        for comp in self.workspace.restore():
            if not self.state.adopt(comp):
                logger.warning('ignoring a second record of computation %s', comp.id)
                continue
            self.old_auths[dc.auth_code(self.config.secret, comp.sign)] = comp.sign
            self.old_signs.add(comp.sign)
            logger.info('restored %d stored result(s) of computation %s for %s',
                        len(comp.stored), comp.id, comp.scheduler_ip)

    def token_sign(self, received, recovery=False):
        """The sign of the run whose token ``received`` is: this run's, or
        (for ``recovery`` messages only) an earlier run's whose computations
        were restored.  None if it is no token of ours."""
        if dc.auth_matches(received, self.auth):
            return self.sign
        if recovery:
            for auth, sign in self.old_auths.items():
                if dc.auth_matches(received, auth):
                    return sign
        return None

    def auth_ok(self, received, recovery=False):
        return self.token_sign(received, recovery) is not None

    # -- discovery
    def ping_info(self, scheduler_ip=None, ip_addr=None):
        return {'ip_addr': ip_addr or (self.addr_for(scheduler_ip) if scheduler_ip
                                       else self.config.ext_ip_addr),
                'port': self.port, 'sign': self.sign,
                'version': dc.PROTOCOL_VERSION, 'scheduler_ip_addr': scheduler_ip}

    def announce(self):
        """Broadcast that we are free (and tell --scheduler_node directly)."""
        if not self.state.is_free() or self.stopping.is_set() or not self.in_service() \
                or self.guard.refusal():
            return
        for ext, brd in self.broadcast_targets():
            data = b'PING:' + dc.dumps_plain(self.ping_info(ip_addr=ext))
            self._udp_send(data, (brd, self.config.scheduler_port), broadcast=True)
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

    def _tcp_notify(self, addr, data, timeout=None):
        """Send one unauthenticated message to a client's TCP server."""
        try:
            with dc.connect(addr, timeout or self.config.msg_timeout, self.tls_client) as sock:
                sock.settimeout(self.config.msg_timeout)
                dc.send_msg(sock, data)
        except OSError as exc:
            logger.debug('message to %s:%s failed: %s', addr[0], addr[1], exc)

    @staticmethod
    def _valid_ping(info):
        return (isinstance(info, dict) and info.get('version') == dc.PROTOCOL_VERSION
                and valid_port(info.get('port'))
                and isinstance(info.get('ip_addrs', []), list))

    def sign_refusal(self, sign):
        """Why a PONG must not carry ``sha1(secret + sign)``, or None.

        That hash is the request token of whichever node made ``sign``: our
        own sign (announced in every PONG), an earlier run's, or any other
        node's with our secret.  An empty sign would give ``sha1(secret)``
        for offline guessing.  Only the signs dispy 4.5 clients and
        schedulers make are answered."""
        if not dc.valid_peer_sign(sign):
            return 'malformed or empty sign'
        if sign == self.sign or sign in self.old_signs:
            return "this node's own sign"
        if dc.is_node_sign(self.config.secret, sign):
            return "a node's sign"
        return None

    def pong_for(self, info, peer):
        if not self._valid_ping(info):
            self.refuse('malformed PING', peer)
            return None
        why = self.sign_refusal(info.get('sign'))
        if why:
            self.refuse('PING with %s' % why, peer)
            return None
        self.remember_sign(info, peer)
        return {'ip_addr': self.addr_for(peer), 'port': self.port, 'sign': self.sign,
                'version': dc.PROTOCOL_VERSION, 'name': self.config.name,
                'cpus': self.state.cpus, 'auth': dc.auth_code(self.config.secret, info['sign']),
                'scheduler_ip_addr': peer}

    def refuse(self, what, peer, level=logging.WARNING, kind='connection'):
        """Count and log (rate-limited, never once per packet) a refusal."""
        self.counters.add('refused_connections' if kind == 'connection' else 'dropped_packets')
        self.logs.log(what, level, 'refused %s from %s', what, peer)

    def queue_pongs(self, info, peer):
        """Answer a PING from an unauthenticated peer, within bounds: one
        round per (source, port, sign) per PING_SOURCE_INTERVAL (two clients
        on one machine differ in port and sign), PING_RATE rounds a second
        in all, on the capped pong pool, at most PONG_TARGETS addresses."""
        key = (peer, info.get('port'), info.get('sign'))
        if not self.ping_gate.allow(key):
            self.counters.add('dropped_packets')
            self.logs.log('PING over the rate limit', logging.INFO,
                          'dropped PING from %s: over the rate limit', peer)
            return
        if not self.pongs.submit(self.send_pongs, info, peer, key=key):
            self.counters.add('dropped_packets')

    def pong_targets(self, info, peer):
        """The PING's source first, then the addresses it lists (a client
        behind NAT or on several interfaces), at most PONG_TARGETS."""
        # 0.0.0.0 is what a broadcast sent before the sender had an address
        # carries; a PONG there would register the client under it.
        listed = [a for a in info.get('ip_addrs', [])[:PONG_TARGETS] if unicast_ipv4(a)]
        return list(dict.fromkeys(listed + [peer] if unicast_ipv4(peer) else listed))[
            :PONG_TARGETS]

    def send_pongs(self, info, peer):
        """Answer a client's PING with a PONG to its addresses."""
        if not self.state.is_free() or not self.in_service() or self.guard.refusal():
            logger.debug('busy or out of service; not answering PING from %s', peer)
            return
        for ip in self.pong_targets(info, peer):
            pong = self.pong_for(info, ip)
            if pong is None:
                return
            self._tcp_notify((ip, info['port']), b'PONG:' + dc.dumps_plain(pong),
                             timeout=PONG_CONNECT_TIMEOUT)

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
            if self.stopping.is_set() or addr is None:
                break               # woken by close()'s shutdown
            try:
                self._udp_datagram(data, addr)
            except Exception:  # one bad datagram must not stop the listener
                logger.exception('UDP datagram from %s failed', addr[0])

    def _udp_datagram(self, data, addr):
        self.counters.add('bytes_in', len(data))
        tag, payload = dc.split_tag(data)
        if tag not in (b'PING', b'PULSE') or len(data) > UDP_MAX:
            self.counters.add('dropped_packets')
            self.logs.log('junk datagram', logging.DEBUG, 'ignoring datagram from %s', addr[0])
            return
        try:
            info = dc.loads_unauth(payload)
        except ProtocolError as exc:
            self.counters.add('dropped_packets')
            self.logs.log('undecodable datagram', logging.INFO,
                          'ignoring %s from %s: %s', tag.decode(), addr[0], exc)
            return
        if tag == b'PING':
            why = self.sign_refusal(info.get('sign')) if self._valid_ping(info) \
                else 'malformed'
            if why:
                self.refuse('PING (%s)' % why, addr[0], kind='packet')
            else:
                self.queue_pongs(info, addr[0])
        elif isinstance(info, dict) and is_ipv4(info.get('ip_addr')):
            port = info.get('port')
            self.sign_of_life(info['ip_addr'], port if valid_port(port) else None)
        else:
            self.counters.add('dropped_packets')

    def sign_of_life(self, scheduler_ip, port=None, resend=True):
        """A client was heard from: refresh its computations and retry
        whatever results we hold for it.  Without the client's port (a TCP
        request) only its active computations count: several clients may
        share an address, and an old one may be frozen."""
        for comp in self.state.touch(scheduler_ip, port):
            self.courier.revive(comp.reply_addr)
            # Pulses are unauthenticated: whatever they say, stored results
            # are re-read and sent at most once per retry interval.
            if resend and self.state.resend_due(comp, RETRY_SECONDS):
                self.resend(comp)

    # -- timer: pulses, zombies, resends
    def _timer_loop(self):
        last_pulse = last_retry = last_held = time.monotonic()
        # A zombie is found within a tenth of its interval (the tests use
        # intervals of a fraction of a second).
        zombie = self.config.zombie_seconds
        tick = max(0.01, min(TICK_SECONDS, zombie / 10.0)) if zombie else TICK_SECONDS
        while not self.stopping.wait(tick):
            try:
                last_pulse = self._tick(last_pulse)
                self._service_tick()
                self.logs.flush()
                self.guard.refusal()    # logs changes, announces when work may resume
                if self.systemd.sock is not None:
                    self.systemd.status(self.status_line())
                if self.pid_one:
                    CHILDREN.reap()
                if time.monotonic() - last_retry >= RETRY_SECONDS:
                    last_retry = time.monotonic()
                    self._retry_stored()
                if self.invites:
                    self._send_invites()
                if self.held and time.monotonic() - last_held >= HELD_RETRY_SECONDS:
                    last_held = time.monotonic()
                    self.retry_held()
            except Exception:  # keep ticking
                logger.exception('timer tick failed')

    def _send_invites(self):
        """The TCP PINGs due to clients whose computation ended with its
        worker (see retire), if the node is still free."""
        now = time.monotonic()
        with self.held_lock:
            due = [i for i in self.invites if i[0] <= now]
            self.invites = [i for i in self.invites if i[0] > now]
        for _, ip, port in due:
            if self.state.is_free():
                self.spawn(self._tcp_notify, (ip, port),
                           b'PING:' + dc.dumps_plain(self.ping_info(ip)))

    def _retry_stored(self):
        active, _ = self.state.snapshot()
        for comp in active:
            if self.state.resend_due(comp, RETRY_SECONDS, active_only=True):
                self.resend(comp)

    def pulse_interval(self, active):
        intervals = [c.pulse_interval for c in active if c.pulse_interval]
        interval = min(intervals) if intervals else DEFAULT_PULSE_SECONDS
        if self.config.zombie_seconds:
            interval = min(interval, self.config.zombie_seconds / 5.0)
        return interval

    def _tick(self, last_pulse):
        now = time.monotonic()
        if self.draining:
            self._drain_check()
        active, _ = self.state.snapshot()
        if active and now - last_pulse >= self.pulse_interval(active):
            last_pulse = now
            sched = self.state.client()
            if sched:
                info = {'ip_addr': self.addr_for(sched[0]), 'port': self.port,
                        'cpus': self.state.busy_cpus(), 'scheduler_ip_addr': sched[0]}
                self._udp_send(b'PULSE:' + dc.dumps_plain(info), sched)
        if self.config.zombie_seconds:
            for comp in self.state.zombies(self.config.zombie_seconds):
                logger.warning('computation %s of %s is a zombie', comp.id, comp.scheduler_ip)
                self.spawn(self.evict, comp, 'client silent for the zombie interval', False)
        return last_pulse

    # -- computations
    def validate_compute(self, c):
        if not isinstance(c, dc.Compute):
            return b'NAK (invalid computation request)'
        checks = (
            (small_int(c.id), 'id'), (c.type in (1, 2), 'type'),
            (isinstance(c.name, str) and 0 < len(c.name) <= 1024 and '\0' not in c.name,
             'name'),
            (isinstance(c.auth, str) and _HEX_RE.match(c.auth or ''), 'auth'),
            (is_ipv4(c.scheduler_ip_addr), 'scheduler address'),
            (valid_port(c.scheduler_port) and valid_port(c.job_result_port), 'port'),
            (isinstance(c.code, str), 'code'),
            (isinstance(c.xfer_files, list) and len(c.xfer_files) <= MAX_XFER_FILES
             and all(valid_xfer(x) for x in c.xfer_files), 'files'),
            (c.dest_path is None or isinstance(c.dest_path, str) and len(c.dest_path) <= 1024,
             'dest_path'),
            (c.pulse_interval is None or isinstance(c.pulse_interval, (int, float))
             and not isinstance(c.pulse_interval, bool)
             and 0 < c.pulse_interval < 10 ** 7, 'pulse_interval'),
            (c.setup is None or isinstance(c.setup, dc.Function), 'setup'),
            (c.cleanup is None or isinstance(c.cleanup, (bool, dc.Function)), 'cleanup'))
        for ok, what in checks:
            if not ok:
                return b'NAK (invalid %s)' % what.encode()
        limit = self.config.max_file_size
        if limit and any(x.stat_buf.st_size > limit for x in c.xfer_files):
            return b'NAK (file too big)'
        if c.code:
            try:
                compile_legacy(c.code)
            except (SyntaxError, ValueError) as exc:
                # Code valid on the client's Python 3.6 only is taken: each
                # job then ends Terminated saying why (a refused COMPUTE
                # leaves the client's jobs Created for ever, silently).
                if not (isinstance(exc, SyntaxError) and only_valid_on_36(c.code)):
                    return b'NAK (Compilation failed: %s)' % str(exc).encode()
        return None

    def add_computation(self, compute, raw):
        """Claim the node for a validated computation; whatever fails
        afterwards undoes the claim, so a bad COMPUTE leaves the node free."""
        refusal = self.service_refusal()
        if refusal:
            logger.info('refusing computation from %s: %s', compute.scheduler_ip_addr,
                        refusal.decode())
            return None, refusal
        if not self.state.is_free() and self.state.client() != (
                compute.scheduler_ip_addr, compute.scheduler_port):
            return None, b'Busy'
        if self.guard_refusal():
            return None, b'Busy'
        try:
            return self._add_computation(compute, raw)
        except Exception as exc:  # validated input should never get here
            logger.exception('could not add computation %s', brief(compute.id))
            return None, b'NAK (could not start computation: %s)' % type(exc).__name__.encode()

    def _add_computation(self, compute, raw):
        try:
            made = self.workspace.make_computation_dir(compute)
        except OSError as exc:
            return None, b'NAK (could not create directory: %s)' % str(exc).encode()
        if made is None:
            return None, b'NAK (Invalid dest_path)'
        dest = made[0]
        comp = Computation(compute, dest, self.sign)
        comp.dir_id = made[1]
        comp.node_ip = self.addr_for(comp.scheduler_ip)
        if getattr(self.config, 'force_cleanup', False):
            comp.keep_files = False
        refusal = self.state.claim(comp)
        if refusal:
            return None, refusal
        comp.compute_bytes, comp.code = raw, compute.code
        try:
            self.workspace.save_computation(comp)
            comp.worker = self.take_worker()
            comp.worker.attach(comp, raw, compute.code)
        except Exception as exc:  # nothing may leave the node claimed
            logger.error('could not start computation %s: %s', comp.id, exc)
            self.drop_computation(comp)
            return None, b'NAK (could not start computation: %s)' % str(exc).encode()
        self.counters.add('computations')
        logger.info('computation %s (%s) from %s:%s started in %s', comp.id, comp.name,
                    comp.scheduler_ip, comp.scheduler_port, dest)
        return comp, None

    def take_worker(self):
        """The spare worker if it is alive, else a new one.  The next spare
        starts when a computation ends (computation_ended), not now: on a
        small machine a second interpreter booting beside this one delays
        the computation waiting for it."""
        with self.spare_lock:
            worker, self.spare = self.spare, None
        if worker is not None and not worker.usable():
            worker.stop(0)      # killed (by a job of the job user?): its channel and cgroup
            worker = None
        if worker is None:
            worker = WorkerHandle(self)
        return worker

    def _refill_spare(self):
        """Start a spare worker, unless there is one or the node stops."""
        with self.spare_lock:
            if self.spare is not None or self.stopping.is_set():
                return
        worker = WorkerHandle(self)
        with self.spare_lock:
            if self.spare is None and not self.stopping.is_set():
                self.spare, worker = worker, None
        if worker is not None:
            worker.stop(0)

    def drop_computation(self, comp):
        """Undo add_computation (the client never got our ACK)."""
        if comp.worker is not None:
            comp.worker.stop(2.0)
        self._settle(comp, self.state.unclaim)
        if not self.stopping.is_set():
            self.spawn(self._refill_spare, key='spare')     # the one it took

    def lookup(self, info, token_sign):
        """The computation a request dict names, if the dict carries that
        computation's auth and the request came with the token of the run
        the computation belongs to (an earlier run's token reaches only the
        computations restored from that run)."""
        if not isinstance(info, dict) or not isinstance(info.get('auth'), str):
            return None
        comp = self.state.find(info.get('compute_id'), info['auth'], include_detached=True)
        if comp is None or comp.sign != token_sign:
            return None
        return comp

    def run_setup(self, comp):
        answer = comp.worker.request(('setup',), SETUP_TIMEOUT)
        if answer is not None and answer[1]:
            if answer[2]:       # code for Python 3.6 only: its jobs will say so
                logger.warning('setup of computation %s not run:\n%s', comp.id, answer[2])
            return b'ACK'
        text = answer[2] if answer else 'worker process died during setup'
        logger.warning('setup of computation %s failed:\n%s', comp.id, LogLines(text))
        self.state.mark_zombie(comp)
        # As the original, a failed setup is followed by the cleanup (in the
        # worker, with setup's globals); not when the worker is gone or stuck.
        self.spawn(self.retire, comp, answer is not None)
        return text.encode('utf-8', 'replace')

    def close_computation(self, comp, terminate):
        """The client's CLOSE: an active computation retires once its jobs
        end; a detached one goes once its stored results are delivered."""
        self.state.mark_zombie(comp)
        if terminate:
            for entry in self.state.jobs_of(comp.id):
                self.terminate_job(comp, entry.uid)
        if self.state.is_detached(comp):
            self.resend(comp, asked=True)
            self._settle(comp, self.state.forget)
            return
        self.retire(comp)

    def retire(self, comp, run_cleanup=True):
        """End a zombie computation once its jobs are done: cleanup, files,
        record; free the node.  Runs once per computation."""
        started = self.state.begin_retire(comp)
        if not started:
            return
        shutdown_asked = False
        if comp.worker is not None:
            answer = comp.worker.request(('close', run_cleanup), CLEANUP_TIMEOUT)
            if answer and answer[1]:
                logger.warning('cleanup of computation %s failed:\n%s', comp.id,
                               LogLines(answer[1]))
            shutdown_asked = bool(answer and len(answer) > 2 and answer[2])
            comp.worker.stop(5.0)
        self._drop_files(comp, started)     # before the record decision, as ever
        change = self._settle(comp, self.state.retire_detach)
        if not change:
            return      # the node shut down meanwhile and settled it
        if Do.TERMINATED in change:
            # Replies first: a JOB_REPLY after TERMINATED finds its job
            # already rescheduled or abandoned at the client.
            self.courier.wait_idle(comp, 2 * self.config.msg_timeout)
            self.send_terminated(comp)
        kept = self.state.progress(comp)[1] if Do.SAVE_RECORD in change else 0
        logger.info('computation %s closed (%s of %s:%s, %.1fs; jobs: %s)%s', comp.id,
                    comp.name, comp.scheduler_ip, comp.scheduler_port,
                    time.time() - comp.started,
                    ', '.join('%s %d' % kv for kv in sorted(comp.outcomes.items())) or 'none',
                    '; %d result(s) kept' % kept if kept else '')
        if Do.ANNOUNCE in change:
            self.announce()
            if comp.rejoin:
                # As a restarted original node is rediscovered: a TCP PING
                # makes the client set its computation up here anew, and run
                # the jobs it still holds.  Sent by the timer once the
                # client's own PING of a moment ago no longer counts against
                # the PONG rate limit.
                with self.held_lock:
                    self.invites.append((time.monotonic() + PING_SOURCE_INTERVAL,
                                         comp.scheduler_ip, comp.scheduler_port))
        self.computation_ended(comp, shutdown_asked)

    def _settle(self, comp, transition):
        """Apply a NodeState ``transition`` with its record written under
        the workspace lock; then remove the files if it says so."""
        change = self.workspace.settle(comp, transition)
        self._drop_files(comp, change)
        return change

    def _drop_files(self, comp, change):
        if Do.REMOVE_FILES in change:
            self.workspace.remove_files(comp, self.state.transferred(comp))

    def send_terminated(self, comp):
        info = {'ip_addr': self.ip_of(comp), 'port': self.port, 'sign': self.sign}
        self._tcp_notify((comp.scheduler_ip, comp.scheduler_port),
                         b'TERMINATED:' + dc.dumps_plain(info))

    # -- files
    def file_target(self, xf, peer):
        if not valid_file_size(xf):
            return None, None, b'NAK (invalid file transfer)'
        comp = self.state.find(xf.compute_id)
        name = safe_basename(xf.name, xf.sep)
        if comp is None or self.state.phase_of(comp) is not Phase.ACTIVE:
            return None, None, b'NAK (invalid computation)'
        if name is None:
            return None, None, b'NAK (invalid file name)'
        limit = self.config.max_file_size
        if limit and xf.stat_buf.st_size > limit:
            self.logs.log('file too big', logging.WARNING, 'refusing %s: %d bytes is over '
                          'the limit', name, xf.stat_buf.st_size)
            return None, None, b'NAK (file too big)'
        why = self.disk_refusal(xf.stat_buf.st_size)
        if why:
            self.logs.log('file refused', logging.WARNING, 'refusing file %s of %d bytes: %s',
                          name, xf.stat_buf.st_size, why)
            return None, None, b'NAK (not enough free disk: --min_free_disk)'
        self.state.note_transfer(comp, name)
        return comp, os.path.join(comp.dest_path, name), None

    def have_file(self, comp, target, stat_buf):
        with self.workspace.opened(comp) as dfd:
            if dfd is None:
                return False
            try:
                st = os.stat(os.path.basename(target), dir_fd=dfd, follow_symlinks=False)
            except OSError:
                return False
        return (stat.S_ISREG(st.st_mode) and st.st_size == stat_buf.st_size
                and abs(st.st_mtime - stat_buf.st_mtime) <= 1
                and stat.S_IMODE(st.st_mode) == _safe_mode(stat_buf.st_mode))

    def receive_file(self, sock, comp, target, xf):
        """Stream ``st_size`` bytes into ``target`` through a temp file, so
        a cut transfer never leaves a file that looks whole.  Everything
        happens relative to the directory's descriptor (Workspace.opened):
        with --job_user the directory is the job user's, and no path a job
        can change is followed."""
        with self.workspace.opened(comp) as dfd:
            if dfd is None:
                return b'NAK (computation directory is not usable)'
            return self._receive_at(sock, comp, dfd, target, xf)

    def _receive_at(self, sock, comp, dfd, target, xf):
        size = xf.stat_buf.st_size
        name = os.path.basename(target)
        got, tmp, fd = 0, None, None
        try:
            for _ in range(100):
                tmp = '.tmp-' + base64.b32encode(os.urandom(5)).decode().lower()
                try:
                    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _FILE_FLAGS,
                                 0o600, dir_fd=dfd)
                    break
                except FileExistsError:
                    continue
            with os.fdopen(fd, 'wb') as fh:
                got, err = recv_to_file(sock, fh.fileno(), size, self.config.msg_timeout)
                if err is not None:
                    raise err
                self.counters.add('bytes_in', got)
                if got < size:
                    raise ProtocolError('read only %d of %d bytes' % (got, size))
                os.fchmod(fh.fileno(), _safe_mode(xf.stat_buf.st_mode, target == comp.program))
                if self.config.job_user:
                    os.fchown(fh.fileno(), self.config.job_user.uid, self.config.job_user.gid)
                os.utime(fh.fileno(), (xf.stat_buf.st_atime, xf.stat_buf.st_mtime))
            os.replace(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
        except (OSError, ProtocolError, TypeError) as exc:
            if tmp is not None:
                try:
                    os.unlink(tmp, dir_fd=dfd)
                except OSError:
                    pass
            logger.warning('transfer of %s failed: %s', target, exc)
            return b'NAK (read only %d bytes)' % got
        return b'ACK'

    # -- jobs
    def admit_job(self, job, peer):
        if not isinstance(job, dc.DispyJobRecord) or not small_int(job.uid) \
                or not isinstance(job.hash, str) or len(job.hash) > 256 \
                or not isinstance(job.args, bytes) or not isinstance(job.kwargs, bytes) \
                or not isinstance(job.code or '', str) \
                or not isinstance(job.xfer_files or [], list):
            return None, None, b'NAK (invalid job)'
        comp = self.state.find(job.compute_id)
        if comp is not None and not comp.worker_ready.is_set():
            # Its worker died: wait (bounded) while worker_lost replaces it
            # or ends the computation, rather than refuse the job (the
            # legacy client would retry it at once, again and again).
            comp.worker_ready.wait(self.config.msg_timeout)
        if comp is None or comp.worker is None \
                or not comp.worker.alive:
            return None, None, b'NAK (invalid computation %s)' % brief(job.compute_id).encode()
        limit = self.config.max_file_size
        files = []
        if len(job.xfer_files or []) > MAX_XFER_FILES:
            return None, None, b'NAK (invalid file)'
        for xf in job.xfer_files or []:
            if not valid_xfer(xf):
                return None, None, b'NAK (invalid file)'
            name = safe_basename(xf.name, xf.sep)
            if limit and getattr(xf.stat_buf, 'st_size', 0) > limit:
                return None, None, b'NAK (file too big)'
            files.append(name)
        if self.guard_refusal():
            # What the client reads as busy; it retries the job at once,
            # so the refusal is a little slow to come.
            time.sleep(GUARD_REFUSAL_DELAY)
            return None, None, b'NAK (all cpus busy)'
        if self.draining:
            time.sleep(GUARD_REFUSAL_DELAY)     # as above: the client reschedules it
            return None, None, b'NAK (node is draining)'
        entry = JobEntry(job.uid, job.hash, comp.id, files)
        entry.answered = threading.Event()
        return comp, entry, self.state.start_job(comp, entry)

    def launch_job(self, comp, job):
        """Hand the job to the worker; None, or the Terminated reply to
        give (after the ACK) when the worker is gone."""
        try:
            comp.worker.send(('job', job.uid, job.hash, job.args, job.kwargs, job.code or ''))
        except OSError:
            return self._terminated_reply(comp, job.uid, job.hash,
                                          'worker process of the computation is gone')
        return None

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
        return dc.dumps(dc.JobReply(uid=uid, hash=job_hash, ip_addr=self.ip_of(comp),
                                    status=DispyJob.Terminated, exception=why,
                                    start_time=time.time(), end_time=time.time()))

    def job_done(self, comp, uid, reply, status=DispyJob.Terminated, limit=None, reason=None):
        """A worker finished job ``uid`` with ``reply`` (pickled bytes);
        ``status`` is the job's own status, ``limit`` the limit that ended it,
        ``reason`` why it ended without its own reply (None: it replied)."""
        with self.finishing_lock:
            self.finishing += 1     # a drain waits for this reply too
        try:
            self._job_done(comp, uid, reply, status, limit, reason)
        finally:
            with self.finishing_lock:
                self.finishing -= 1

    def _job_done(self, comp, uid, reply, status, limit, reason):
        entry, _, unused = self.state.finish_job(uid, comp.id)
        if entry is None:
            logger.debug('result for job %s, not running in computation %s', brief(uid), comp.id)
            return
        if entry.answered is not None:
            entry.answered.wait(self.config.msg_timeout)
        self.note_job(comp, entry, status, limit, reason)
        self.workspace.remove_job_files(comp, unused)
        # A job killed by evict() sends nothing: the client reschedules or
        # abandons it on our TERMINATED, as with the original node.
        if not entry.unacknowledged and uid not in comp.dropped:
            self.courier.submit(Delivery(comp, uid, entry.hash, reply, False))
        if self.state.retire_due(comp) and not self.stopping.is_set():
            self.spawn(self.retire, comp)

    def worker_lost(self, comp, handle=None):
        """The channel to ``comp``'s worker closed.  At retirement or
        shutdown that is the worker's normal exit.  Otherwise it died (the
        OOM killer, a crash in an extension, an operator): its running jobs
        end Terminated with the reason and what it left running is killed.
        Then a computation without setup goes on in a fresh worker (the
        code is all its state: jobs are forks and keep nothing), at most
        MAX_WORKER_RESTARTS times; one with setup (whose state died with the
        worker, and which the node must not run twice behind the client's
        back) ends, and the client gets TERMINATED, as from an original
        node that shut down: it reschedules reentrant jobs it still had
        here and abandons the others, and sets up anew when it rediscovers
        the node, which is free again."""
        handle = handle or comp.worker
        try:
            phase = self.state.phase_of(comp)
            if comp.worker is not handle or handle.alive or self.stopping.is_set() \
                    or phase not in (Phase.ACTIVE, Phase.ZOMBIE):
                return
            why = handle.exit_reason()
            handle.kill_orphans()
            entries = self.state.jobs_of(comp.id)
            replace = (phase is Phase.ACTIVE and not comp.has_setup
                       and comp.worker_restarts < MAX_WORKER_RESTARTS)
            for entry in entries:
                self.job_done(comp, entry.uid, self._terminated_reply(
                    comp, entry.uid, entry.hash, 'worker process of the computation died '
                    '(%s)' % why), reason='worker_lost')
            if handle.cut_short & {'setup', 'close'}:
                # run_setup or retire, which get no answer, end it themselves
                logger.debug('the worker of computation %s died in its setup or close',
                             comp.id)
                return
            if replace:
                try:
                    worker = self.take_worker()
                    worker.attach(comp, comp.compute_bytes, comp.code)
                except Exception as exc:  # no worker: end it as below
                    why += '; no new worker: %s' % exc
                else:
                    comp.worker = worker
                    comp.worker_restarts += 1
                    if self.state.phase_of(comp) is not Phase.ACTIVE:
                        # closed meanwhile: retire may have stopped the dead
                        # worker and never see this one
                        worker.stop(0)
                        return
                    logger.warning('%s (computation %s): %d running job(s) end Terminated; '
                                   'its jobs go on in a new worker (%d of at most %d)', why,
                                   comp.id, len(entries), comp.worker_restarts,
                                   MAX_WORKER_RESTARTS)
                    self.spawn(self._refill_spare, key='spare')
                    return
            if phase is not Phase.ACTIVE:   # closing anyway: its last job_done retires it
                logger.warning('%s (computation %s, closing): %d running job(s) end '
                               'Terminated', why, comp.id, len(entries))
                return
            why += ('; the computation has setup, whose state died with it' if comp.has_setup
                    else '; %d workers died already' % comp.worker_restarts)
            logger.warning('%s (computation %s): %d running job(s) end Terminated', why,
                           comp.id, len(entries))
            # retire invites the client back if the death took jobs with it:
            # each round then ends a job, so a worker that keeps dying (in
            # setup, or between jobs) cannot bring the client back for ever
            comp.rejoin = bool(entries)
            self.evict(comp, why, kill_jobs=False)
        finally:
            comp.worker_ready.set()

    # -- results
    def reply_delivered(self, item):
        comp = item.comp
        if item.resend or self.state.is_stored(comp, item.uid):
            self._drop_reply(comp, item.uid)

    def _drop_reply(self, comp, uid):
        """``uid``'s stored reply is delivered, or unreadable: forget it."""
        self._drop_files(comp, self.workspace.drop_reply(comp, uid, self.state.drop_stored))

    def reply_unacknowledged(self, item, outcome):
        """The client did not ACK this reply (it refused it, or sent no
        answer).  Counted per reply: once MAX_REPLY_ATTEMPTS sends went
        unacknowledged, the stored reply is no longer resent on its own
        (only a client's RESEND_JOB_RESULTS, as dispy.recover_jobs sends,
        still gets it)."""
        comp, (ip, port) = item.comp, item.comp.reply_addr
        count = self.state.note_unacked(comp, item.uid, fresh=not item.resend)
        if count >= MAX_REPLY_ATTEMPTS:
            self.logs.log('replies never acknowledged', logging.WARNING,
                          'the client at %s:%s did not acknowledge the reply of job %s in %d '
                          'attempts (last: %s); it stays stored for recovery and is not sent '
                          'again unless the client asks (RESEND_JOB_RESULTS)', ip, port,
                          item.uid, count, outcome)
        else:
            self.logs.log('replies not acknowledged', logging.INFO,
                          'the client at %s:%s %s the reply of job %s (attempt %d of %d)%s',
                          ip, port, 'refused' if outcome is REFUSED_REPLY else
                          'did not answer', item.uid, count, MAX_REPLY_ATTEMPTS,
                          '' if item.resend else '; storing it')

    def reply_undelivered(self, item):
        """Store a reply that was not delivered.  If even that fails (a full
        disk, no descriptor left), it is held in memory and tried again
        (delivery, then storage) from the timer: never dropped."""
        try:
            self.workspace.store_reply(item.comp, item.uid, item.hash, item.reply,
                                       self.state.add_stored)
        except OSError as exc:
            with self.held_lock:
                self.held.append(item)
                held = len(self.held)
            self.logs.log('could not store job replies', logging.ERROR,
                          'could not store the reply of job %s: %s; %d reply(s) held in '
                          'memory, tried again every %gs', item.uid, exc, held, HELD_RETRY_SECONDS)

    def retry_held(self, store_only=False):
        """Try the replies held in memory again: delivered, else stored,
        else held again (``store_only``: at shutdown, no delivery)."""
        with self.held_lock:
            items, self.held = list(self.held), collections.deque()
        for item in items:
            item = Delivery(item.comp, item.uid, item.hash, item.reply, False)
            if store_only:
                self.reply_undelivered(item)
            else:
                self.courier.submit(item)

    def resend(self, comp, asked=False):
        """Send ``comp``'s stored replies again (at most 64 per round); the
        ones sent MAX_REPLY_ATTEMPTS times without an ACK only if the
        client ``asked``."""
        for uid in self.state.stored_uids(comp, exhausted=asked):
            rec = self.workspace.load_reply(comp, uid)
            if rec is None:     # gone, or moved aside as unreadable
                self._drop_reply(comp, uid)
                continue
            self.courier.submit(Delivery(comp, uid, rec['hash'], rec['reply'], True))

    # -- status, metrics, limits and guards (see the observing section)
    def _init_observers(self):
        cfg = self.config
        self.started_at, self.started_mono = time.time(), time.monotonic()
        self.job_times = JobTimes()
        self.guard = ResourceGuard(self)
        self.control = ControlServer(self)
        self.metrics = None
        if getattr(cfg, 'metrics', None):
            try:
                self.metrics = MetricsServer(self, cfg.metrics)
            except OSError as exc:
                raise OSError('--metrics %s:%s: %s' % (cfg.metrics[0], cfg.metrics[1],
                                                        exc.strerror or exc))

    def _start_observers(self):
        self.control.start()
        if self.metrics is not None:
            self.metrics.start()
            logger.info('metrics at http://%s:%d/metrics', *self.metrics.address[:2])

    def _stop_observers(self):
        self.control.stop()

    def _release_cgroup(self):
        """Remove the jobs' cgroup (once no worker is left to use it)."""
        if self.owns_cgroup and not release_job_cgroup(self.config):
            logger.warning('could not remove the jobs\' cgroup %s', self.config.job_cgroup)
        if getattr(self, 'owns_proc_cgroup', False):
            self.owns_proc_cgroup = False
            if not remove_cgroup(self.config.proc_cgroup):
                logger.warning('could not remove the jobs\' cgroup %s',
                               self.config.proc_cgroup)

    def _release_prefix(self):
        """Unlock the prefix (start_up locked it) for the next node."""
        lock = getattr(self.config, 'prefix_lock', None)
        if self.owns_cgroup and lock is not None:
            lock.close()

    def note_job(self, comp, entry, status, limit, reason=None):
        """Count a finished job by its outcome (and the limit that ended it);
        log one line for a job that did not finish normally.  ``limit`` and
        ``reason`` come from a worker, which runs client code: only known
        names are counted (they become metric labels)."""
        outcome = outcome_name(status)
        self.counters.add('jobs_' + outcome)
        if limit not in _LIMIT_NAMES.values():
            limit = None
        if limit:
            self.counters.add('limit_' + limit)
        if outcome != 'Finished':
            if limit:
                reason = limit
            elif reason is None:
                reason = 'exception'        # its own reply says Terminated
            elif reason not in JOB_END_REASONS:
                reason = 'other'
            self.counters.add('terminated_' + reason)
        if comp is not None:
            self.state.note_outcome(comp, outcome)
            if outcome != 'Finished':
                self.log_job_end(comp, entry, outcome, reason)
        self.job_times.observe(max(0.0, time.time() - entry.start))

    def log_job_end(self, comp, entry, outcome, reason):
        """The one log line of a job that did not finish normally."""
        detail = JOB_END_REASONS.get(reason, 'ended')
        if reason == 'cancelled' and comp.evicted and entry.uid in comp.dropped:
            detail = 'killed: %s' % comp.evicted
        logger.log(logging.INFO if reason in ('exception', 'cancelled') else logging.WARNING,
                   'job %s of computation %s (%s) from %s:%s: %s, %s (%s)', entry.uid,
                   comp.id, log_text(comp.name), comp.scheduler_ip, comp.scheduler_port,
                   outcome, reason, detail)

    def disk_refusal(self, size):
        """Why a file of ``size`` bytes may not be written now: the guards
        refuse work, or it would take free disk below --min_free_disk."""
        why = self.guard.refusal()
        disk, minimum = self.guard.disk, self.guard.min_disk
        if not why and minimum and disk is not None and disk - size < minimum:
            why = 'a file of %s would leave %s free, below --min_free_disk %s' % (
                format_size(size), format_size(max(0, disk - size)), format_size(minimum))
        if why:
            self.counters.add('guard_refusals')
        return why

    def guard_refusal(self):
        """Why the resource guards refuse new work now, or None."""
        why = self.guard.refusal()
        if why:
            self.counters.add('guard_refusals')
        return why

    def status(self):
        """The node's status as plain data (the control socket's answer;
        format_status_table renders it)."""
        cfg = self.config
        counts = self.counters.snapshot()
        status = self.state.observe()
        refusing = self.guard.refusal()
        health = self.health()
        done = {k[5:]: v for k, v in counts.items() if k.startswith('jobs_')}
        status.update({
            'version': __version__, 'protocol': dc.PROTOCOL_VERSION, 'name': cfg.name,
            'pid': os.getpid(), 'ip_addr': cfg.ext_ip_addr, 'port': self.port,
            'uptime': round(time.monotonic() - self.started_mono, 3),
            'started': self.started_at,
            'serving': health is None, 'refusing': refusing or health,
            'draining': self.draining, 'paused': self.paused,
            'jobs_terminated': {k[11:]: v for k, v in counts.items()
                                if k.startswith('terminated_')},
            'free': status['client'] is None and status['cpus_busy'] == 0,
            'jobs_done': done,
            'computations_total': counts.get('computations', 0),
            'bytes_in': counts.get('bytes_in', 0), 'bytes_out': counts.get('bytes_out', 0),
            'refused_connections': counts.get('refused_connections', 0),
            'auth_failures': counts.get('auth_failures', 0),
            'dropped_packets': counts.get('dropped_packets', 0),
            'guard_refusals': counts.get('guard_refusals', 0),
            'limit_kills': {k[6:]: v for k, v in counts.items() if k.startswith('limit_')},
            'limits': {'job_timeout': getattr(cfg, 'job_timeout', 0) or None,
                       'job_memory': getattr(cfg, 'job_memory_text', '') or None,
                       'job_threads': getattr(cfg, 'job_threads', 0) or None,
                       'job_memory_cgroup': getattr(cfg, 'job_cgroup', None),
                       'job_memory_cgroup_unavailable': getattr(cfg, 'cgroup_note', None),
                       'job_containment': ('cgroup %s' % cfg.proc_cgroup
                                           if getattr(cfg, 'proc_cgroup', None) else
                                           'subreaper (no cgroup: %s)'
                                           % getattr(cfg, 'proc_cgroup_note', None))},
            'guards': {'min_free_memory': getattr(cfg, 'min_free_memory', 0),
                       'min_free_disk': getattr(cfg, 'min_free_disk', 0),
                       'free_memory': self.guard.memory, 'free_disk': self.guard.disk},
        })
        return status

    def metrics_text(self):
        return prometheus_text(self.status(), self.counters.snapshot(),
                               self.job_times.snapshot(), process_stats())


# ---------------------------------------------------------------- console and control commands
# One table serves the terminal console and the control socket (the
# ``dispynode <command>`` CLI): each command is a function (node, args) ->
# (ok, message or data).  The surfaces differ only in their spellings: the
# console keeps the later nodes' 'stop'/'start' for pause/resume and
# 'quit'/'exit' for a shutdown; on the control socket 'stop' shuts down.

class NodeCommand:
    __slots__ = ('name', 'func', 'usage', 'text')

    def __init__(self, name, func, usage, text):
        self.name, self.func, self.usage, self.text = name, func, usage, text


NODE_COMMANDS = {}
CONSOLE_NAMES = {'status': 'status', 'cpus': 'cpus', 'stop': 'pause', 'start': 'resume',
                 'pause': 'pause', 'resume': 'resume', 'release': 'release', 'drain': 'drain',
                 'quit': 'shutdown', 'exit': 'shutdown'}
CONTROL_NAMES = {'status': 'status', 'cpus': 'cpus', 'pause': 'pause', 'resume': 'resume',
                 'release': 'release', 'drain': 'drain', 'stop': 'shutdown'}
# Commands after whose answer the control connection stays open until the
# node process exits (the CLI waits for that end of file).
CONTROL_WAITS = ('drain', 'shutdown')


def node_command(name, usage, text):
    def register(func):
        NODE_COMMANDS[name] = NodeCommand(name, func, usage, text)
        return func
    return register


@node_command('status', 'status', 'show the status')
def _command_status(node, args, source):
    return True, node.status()


@node_command('cpus', 'cpus N', 'offer N cpus from now on (running jobs go on)')
def _command_cpus(node, args, source):
    try:
        cpus = node.set_cpus(int(args[0]) if len(args) == 1 else None)
    except ValueError as exc:
        return False, 'cpus: %s (usage: cpus N)' % exc
    return True, 'offering %d cpus' % cpus


@node_command('pause', 'pause', 'take no new computation (running work goes on)')
def _command_pause(node, args, source):
    node.pause()
    return True, 'stopped: running work goes on, no new computation'


@node_command('resume', 'resume', 'take computations again')
def _command_resume(node, args, source):
    if node.draining:
        return False, 'draining: the node exits once its running jobs have ended'
    node.resume()
    return True, 'started'


@node_command('release', 'release', 'drop the current client now')
def _command_release(node, args, source):
    return True, 'released %d computation(s)' % node.release(
        'released from the console' if source[0] == 'console' else 'released by a control '
        'command')


@node_command('drain', 'drain', 'no new computation or job; exit once running jobs end')
def _command_drain(node, args, source):
    running = node.drain()
    return True, 'draining: %d job(s) running; the node exits once they have ended and ' \
                 'their replies are delivered or stored' % running


@node_command('shutdown', 'stop', 'shut the node down now (as SIGTERM)')
def _command_shutdown(node, args, source):
    node.request_exit('%s %s' % (source[0], source[1]))
    return True, 'shutting down'


def run_node_command(node, names, words, source):
    """Run the command ``words`` (spelled as in ``names``); returns
    (command name or None if unknown, ok, message or data)."""
    name = names.get(words[0].lower()) if words else None
    if name is None:
        return None, False, 'unknown command'
    return (name,) + tuple(NODE_COMMANDS[name].func(node, words[1:], source))


CONSOLE_HELP = ('commands: status | cpus N | stop (no new computation) | start | '
                'release (drop the current client now) | drain (exit once running jobs '
                'end) | quit | exit')


class Console:
    """Interactive commands read from the terminal (see CONSOLE_HELP)."""

    def __init__(self, node, infile=None, outfile=None):
        self.node = node
        self.infile = infile or sys.stdin
        self.outfile = outfile or sys.stdout

    @staticmethod
    def wanted(cfg):
        """A console needs a terminal on stdin of which we are the
        foreground (a node started with '&' must not read it) and no
        --daemon."""
        if getattr(cfg, 'daemon', False):
            return False
        try:
            if not sys.stdin or not sys.stdin.isatty():
                return False
            return os.tcgetpgrp(sys.stdin.fileno()) == os.getpgrp()
        except OSError:
            return True     # a terminal that is not our controlling one
        except (AttributeError, ValueError):
            return False

    def start(self):
        threading.Thread(target=self.run, name='console', daemon=True).start()

    def say(self, text):
        try:
            self.outfile.write(text + '\n')
            self.outfile.flush()
        except (OSError, ValueError):
            pass

    def run(self):
        self.say('dispynode console; ' + CONSOLE_HELP)
        while not self.node.quit.is_set():
            try:
                line = self.infile.readline()
            except (OSError, ValueError):
                return
            if not line:
                return      # end of input: the node goes on without a console
            try:
                self.command(line.split())
            except Exception:  # a bad command must not end the console
                logger.exception('console command %r failed', line.strip())

    def command(self, words):
        if not words:
            return
        name, ok, answer = run_node_command(self.node, CONSOLE_NAMES, words,
                                            ('console', words[0].lower()))
        if name is None:
            self.say(CONSOLE_HELP)
        elif name == 'status':
            self.say(format_status_table(answer))
        else:
            self.say(answer)


def _safe_mode(mode, executable=False):
    """Permission bits kept from a client file: never setuid/setgid/sticky."""
    bits = stat.S_IMODE(mode) & 0o777
    return bits | 0o100 if executable else bits


# ---------------------------------------------------------------- observing and bounding the node
# Status (a UNIX control socket), Prometheus metrics, per-job limits and
# resource guards.  Everything here reads node state through NodeState and
# Counters; nothing unpickles user data.

CONTROL_SOCKET = '.dispynode-control'     # under --dest_path_prefix
CONTROL_TIMEOUT = 2.0                     # per control or metrics connection
CONTROL_REQUEST_MAX = 256
CONTROL_WAITERS = 16                      # drain/stop commands waiting for the exit
METRICS_THREADS = 2                       # answer complete /metrics and /healthz requests
METRICS_QUEUE = 16
METRICS_PENDING = 64                      # connections still sending their request
METRICS_REQUEST_MAX = 8192
METRICS_REASONS = {200: 'OK', 404: 'Not Found', 405: 'Method Not Allowed',
                   503: 'Service Unavailable'}
GUARD_CHECK_SECONDS = 1.0                 # free memory/disk readings are cached this long
GUARD_REFUSAL_DELAY = 0.5                 # slows a client that retries a refused job at once
JOB_SECONDS_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 60.0, 300.0, 1800.0, 3600.0)
# Environment variables that cap the threads of common numeric libraries.
JOB_THREAD_VARS = ('OMP_NUM_THREADS', 'OPENBLAS_NUM_THREADS', 'MKL_NUM_THREADS',
                   'NUMEXPR_NUM_THREADS', 'NUMEXPR_MAX_THREADS', 'VECLIB_MAXIMUM_THREADS',
                   'BLIS_NUM_THREADS', 'RAYON_NUM_THREADS', 'NUMBA_NUM_THREADS',
                   'JULIA_NUM_THREADS', 'GOTO_NUM_THREADS', 'TF_NUM_INTRAOP_THREADS',
                   'TF_NUM_INTEROP_THREADS')
# Test hooks: a size ('64m') or the path of a file holding one, read instead
# of the real free memory / free disk.
FREE_MEMORY_ENV = 'DISPYNODE_FREE_MEMORY'
FREE_DISK_ENV = 'DISPYNODE_FREE_DISK'
_STATUS_NAMES = {v: k for k, v in vars(DispyJob).items() if isinstance(v, int)}
_LIMIT_NAMES = {1: 'job_memory', 2: 'job_timeout'}
# Why a job ended Terminated (the reason label of dispynode_jobs_terminated_total).
JOB_END_REASONS = {
    'exception': 'the job raised an exception',
    'signal': 'its process was killed by a signal',
    'exited': 'its process exited without a result',
    'cancelled': 'cancelled (TERMINATE_JOB)',
    'job_timeout': 'killed by --job_timeout',
    'job_memory': 'ended by --job_memory',
    'worker_lost': 'the worker process of its computation died',
    'result_too_large': 'its result was over --max_request_size',
    'other': 'unknown reason'}


def log_text(text):
    """A client-given name as it goes into a log line: escaped (printable;
    the node's logger escapes every argument as well)."""
    return printable(text) if isinstance(text, str) else text


def outcome_name(status):
    return _STATUS_NAMES.get(status, 'Unknown')


def format_size(n):
    """12345678 -> '11.8m' (None -> '-')."""
    if n is None:
        return '-'
    for unit in ('', 'k', 'm', 'g', 't'):
        if abs(n) < 1024 or unit == 't':
            return '%d%s' % (n, unit) if n == int(n) else '%.1f%s' % (n, unit)
        n /= 1024.0


def job_environment(cfg):
    """The environment of worker processes (and so of jobs)."""
    env = dict(os.environ)
    if getattr(cfg, 'job_user', None):
        # the job user's site is every client's: not for the Pythons jobs start
        env['PYTHONNOUSERSITE'] = '1'
    if getattr(cfg, 'job_threads', 0):
        for name in JOB_THREAD_VARS:
            env[name] = str(cfg.job_threads)
    return env


def job_limits(cfg):
    """The per-job limits a worker enforces (see Worker)."""
    return {'job_timeout': getattr(cfg, 'job_timeout', 0) or 0,
            'job_memory': getattr(cfg, 'job_memory', 0) or 0,
            'job_memory_text': getattr(cfg, 'job_memory_text', ''),
            'cgroup': None, 'cgroup_slots': 0}


def _override_reading(env_name):
    value = os.environ.get(env_name)
    if not value:
        return None
    if value.startswith('/'):
        try:
            with open(value) as fh:
                value = fh.read().strip()
        except OSError:
            return None
    try:
        return dc.parse_size(value)
    except ValueError:
        return None


def free_memory():
    """Bytes of memory available for new work (MemAvailable), or None."""
    fake = _override_reading(FREE_MEMORY_ENV)
    if fake is not None:
        return fake
    try:
        with open('/proc/meminfo') as fh:
            for line in fh:
                if line.startswith('MemAvailable:'):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf('SC_AVPHYS_PAGES') * os.sysconf('SC_PAGE_SIZE')
    except (ValueError, OSError, AttributeError):
        return None


def free_disk(path):
    """Bytes free for unprivileged users on the file system of ``path``."""
    fake = _override_reading(FREE_DISK_ENV)
    if fake is not None:
        return fake
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def _own_cgroup_v2(cgroup_file, mounts_file):
    """This process's cgroup v2 directory: (path, None) or (None, why not)."""
    try:
        with open(cgroup_file) as fh:
            own = [line.strip()[3:] for line in fh if line.startswith('0::')]
        with open(mounts_file) as fh:
            mounts = [line.split()[1] for line in fh if line.split()[2:3] == ['cgroup2']]
    except OSError as exc:
        return None, 'cannot read cgroup information: %s' % exc
    if not own or not mounts:
        return None, 'no cgroup v2 hierarchy'
    return os.path.join(mounts[0], own[0].lstrip('/')), None


def cgroup_v2_memory(cgroup_file='/proc/self/cgroup', mounts_file='/proc/self/mounts',
                     pid=None):
    """Prepare cgroup v2 groups for per-job memory limits, if this process
    may: returns (jobs group path, None) or (None, why not).

    cgroup v2 lets a group hand the memory controller to its children only
    while it holds no process itself, so a node that is alone in its group
    (a systemd service with Delegate=yes, a container) first moves into a
    leaf ``node-<pid>``; jobs then get leaves of ``dispynode-jobs-<pid>``
    (see Worker).  The node cannot remove its own leaf while it is in it:
    the service manager removes it with the service's group."""
    pid = pid or os.getpid()
    base, why = _own_cgroup_v2(cgroup_file, mounts_file)
    if base is None:
        return None, why

    def read(name):
        with open(os.path.join(base, name)) as fh:
            return fh.read().split()

    def write(path, text):
        with open(path, 'w') as fh:
            fh.write(text)

    try:
        if 'memory' not in read('cgroup.controllers'):
            return None, 'the memory controller is not available in %s' % base
        if 'memory' not in read('cgroup.subtree_control'):
            procs = read('cgroup.procs')
            if procs and procs != [str(pid)]:
                return None, ('%s holds other processes, so it cannot delegate the memory '
                              'controller' % base)
            if procs:
                leaf = os.path.join(base, 'node-%d' % pid)
                os.makedirs(leaf, exist_ok=True)
                write(os.path.join(leaf, 'cgroup.procs'), str(pid))
            write(os.path.join(base, 'cgroup.subtree_control'), '+memory')
        group = os.path.join(base, 'dispynode-jobs-%d' % pid)
        os.makedirs(group, exist_ok=True)
        write(os.path.join(group, 'cgroup.subtree_control'), '+memory')
    except OSError as exc:
        return None, 'cannot set up a memory cgroup under %s: %s' % (
            base, exc.strerror or exc)
    return group, None


def cgroup_v2_jobs(cgroup_file='/proc/self/cgroup', mounts_file='/proc/self/mounts',
                   pid=None):
    """A cgroup v2 group for the jobs' groups (containment only, no
    controller needed), if this process may make one: (path, None) or
    (None, why not)."""
    pid = pid or os.getpid()
    base, why = _own_cgroup_v2(cgroup_file, mounts_file)
    if base is None:
        return None, why
    _remove_stale_groups(base)
    for n in range(100):
        group = os.path.join(base, 'dispynode-jobs-%d%s' % (pid, '-%d' % n if n else ''))
        try:
            os.mkdir(group)
        except FileExistsError:
            continue        # another node of this process (tests)
        except OSError as exc:
            return None, 'cannot make a cgroup under %s: %s' % (base, exc.strerror or exc)
        if not os.path.exists(os.path.join(group, 'cgroup.procs')):
            os.rmdir(group)
            return None, '%s is not a cgroup v2 hierarchy' % base
        return group, None
    return None, 'no free cgroup name under %s' % base


_STALE_GROUP = re.compile(r'^dispynode-jobs-(\d+)(-\d+)?$')


def _remove_stale_groups(base):
    """Remove the jobs' groups of nodes that died without removing them
    (killed with SIGKILL), with whatever is left in them."""
    try:
        names = os.listdir(base)
    except OSError:
        return
    for name in names:
        match = _STALE_GROUP.match(name)
        if not match:
            continue
        try:
            os.kill(int(match.group(1)), 0)
            continue            # its node lives (or another process has the pid)
        except ProcessLookupError:
            pass
        except OSError:
            continue
        if remove_cgroup(os.path.join(base, name), 0.5):
            logger.info('removed the cgroup %s of a node that is gone', name)


def make_worker_cgroup(group, worker_pid, slots, memory=0, owner=None):
    """The node's side of a worker's containment: ``group/w-<pid>`` with
    the worker in its leaf ``worker`` and ``slots`` job groups ``job-N``
    (memory.max = ``memory`` and no swap, when the memory controller is
    on).  The node makes them as root; a --job_user worker (``owner``, a
    uid) may only move its job processes among them (cgroup.procs of the
    group and of each job group) and kill a job group (cgroup.kill): it
    cannot make groups or change a limit.  Returns the path, or None (the
    worker then contains its jobs as a subreaper)."""
    path = os.path.join(group, 'w-%d' % worker_pid)

    def write(name, text):
        with open(os.path.join(path, name), 'w') as fh:
            fh.write(text)
    try:
        os.mkdir(path)
        if memory:
            write('cgroup.subtree_control', '+memory')
        os.mkdir(os.path.join(path, 'worker'))
        delegated = ['cgroup.procs', 'cgroup.kill']
        for n in range(slots):
            job = 'job-%d' % n
            os.mkdir(os.path.join(path, job))
            if memory:
                write(os.path.join(job, 'memory.max'), str(memory))
                try:
                    write(os.path.join(job, 'memory.swap.max'), '0')
                except FileNotFoundError:
                    pass        # no swap accounting
            delegated += [os.path.join(job, 'cgroup.procs'), os.path.join(job, 'cgroup.kill')]
        if owner is not None:
            for name in delegated:
                try:
                    os.chown(os.path.join(path, name), owner, -1)
                except FileNotFoundError:
                    pass        # no cgroup.kill before Linux 5.14
        write(os.path.join('worker', 'cgroup.procs'), str(worker_pid))
    except OSError as exc:
        logger.debug('no cgroup for worker %d: %s', worker_pid, exc)
        remove_cgroup(path, 0)
        return None
    return path


def remove_cgroup(path, timeout=3.0):
    """Kill every process in the cgroup ``path`` (and below), then remove
    it and its groups.  False if it is still there after ``timeout``
    seconds (a process in uninterruptible sleep)."""
    if not path or not os.path.isdir(path):
        return True
    _cgroup_kill(path)
    deadline = time.monotonic() + timeout
    while True:
        for top, dirs, _ in os.walk(path, topdown=False):
            for name in dirs:
                try:
                    os.rmdir(os.path.join(top, name))
                except OSError:
                    pass
        try:
            os.rmdir(path)
            return True
        except FileNotFoundError:
            return True
        except OSError:
            if time.monotonic() >= deadline:
                return False
            _cgroup_kill(path)
            time.sleep(0.02)


def release_job_cgroup(cfg, timeout=3.0):
    """Remove the jobs' cgroup that start_up made (if it did), killing
    whatever is left in it; call it once no worker is left.  Returns False
    if it is still there after ``timeout`` seconds (a job process that
    outlived its kill still in it)."""
    return remove_cgroup(getattr(cfg, 'job_cgroup', None), timeout)


class JobTimes:
    """A histogram of job run times (for the metrics endpoint)."""

    def __init__(self, buckets=JOB_SECONDS_BUCKETS):
        self.lock = threading.Lock()
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.total = 0
        self.sum = 0.0

    def observe(self, seconds):
        with self.lock:
            self.total += 1
            self.sum += seconds
            for i, bound in enumerate(self.buckets):
                if seconds <= bound:
                    self.counts[i] += 1

    def snapshot(self):
        with self.lock:
            return list(zip(self.buckets, self.counts)), self.total, self.sum


class ResourceGuard:
    """Refuses new computations and jobs while free memory or free disk
    (under the prefix) is below the configured minimum.  Readings are
    cached for GUARD_CHECK_SECONDS; the reason is logged once per episode."""

    def __init__(self, node):
        self.node = node
        cfg = node.config
        self.min_memory = getattr(cfg, 'min_free_memory', 0) or 0
        self.min_disk = getattr(cfg, 'min_free_disk', 0) or 0
        self.lock = threading.Lock()
        self.checked = None
        self.reason = None
        self.memory = self.disk = None

    @property
    def enabled(self):
        return bool(self.min_memory or self.min_disk)

    def refusal(self):
        """None if the node may take work, else why not (a short text)."""
        if not self.enabled:
            return None
        now = time.monotonic()
        with self.lock:
            if self.checked is not None and now - self.checked < GUARD_CHECK_SECONDS:
                return self.reason
            self.checked = now
        return self.check()

    def check(self):
        memory = free_memory() if self.min_memory else None
        disk = free_disk(self.node.config.dest_path_prefix) if self.min_disk else None
        why = None
        if memory is not None and memory < self.min_memory:
            why = 'free memory %s is below --min_free_memory %s' % (
                format_size(memory), format_size(self.min_memory))
        elif disk is not None and disk < self.min_disk:
            why = 'free disk %s under %s is below --min_free_disk %s' % (
                format_size(disk), self.node.config.dest_path_prefix,
                format_size(self.min_disk))
        with self.lock:
            before, self.reason = self.reason, why
            self.memory, self.disk = memory, disk
        if why and not before:
            logger.warning('not taking new computations or jobs: %s', why)
        elif before and not why:
            logger.info('taking work again: free memory and disk are above the minimums')
            self.node.announce()
        return why


class ControlServer:
    """The node's local control socket: one command line (CONTROL_NAMES:
    status, cpus N, pause, resume, release, drain, stop) answered with one
    JSON line: the status, or {"ok", "message", "pid"}.  One named thread
    serves one connection at a time, each bounded by CONTROL_TIMEOUT; only
    the node's own user (or root) is served.  After drain and stop the
    connection stays open (at most CONTROL_WAITERS of them) until the node
    process exits, so the command's end of file says it has."""

    def __init__(self, node):
        self.node = node
        self.path = os.path.join(node.config.dest_path_prefix, CONTROL_SOCKET)
        self.sock = None
        self.waiters = []       # connections closed by the process's exit

    def start(self):
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.settimeout(1.0)
            probe.connect(self.path)
        except OSError:
            pass            # nobody answers: a socket left by an earlier run
        else:
            logger.warning('no control socket: another node serves %s', self.path)
            return False
        finally:
            probe.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            logger.warning('no control socket: %s', exc)
            return False
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(self.path)
            os.chmod(self.path, 0o600)
            st = os.lstat(self.path)
            if stat.S_IMODE(st.st_mode) != 0o600 or st.st_uid != os.geteuid():
                raise OSError('%s has mode %o, owner %d' % (self.path, st.st_mode, st.st_uid))
            sock.listen(8)
            sock.settimeout(0.5)
        except OSError as exc:
            sock.close()
            logger.warning('no control socket at %s: %s', self.path, exc)
            return False
        self.sock = sock
        threading.Thread(target=self._serve, name='control', daemon=True).start()
        return True

    def stop(self):
        """Remove the socket file now (the thread ends within its timeout)."""
        if self.sock is not None:
            try:
                os.unlink(self.path)
            except OSError:
                pass

    def _serve(self):
        try:
            while not self.node.stopping.is_set():
                try:
                    conn, _ = self.sock.accept()
                except socket.timeout:
                    continue
                except OSError:
                    if self.node.stopping.is_set():
                        break
                    time.sleep(0.1)
                    continue
                keep = False
                try:
                    keep = self._answer(conn)
                except (OSError, ValueError) as exc:
                    logger.debug('control request failed: %s', exc)
                except Exception:  # a failed command must not end the control thread
                    logger.exception('control request failed')
                finally:
                    if keep:
                        self.waiters.append(conn)
                    else:
                        conn.close()
        finally:
            self.sock.close()
            self.stop()

    def _answer(self, conn):
        conn.settimeout(CONTROL_TIMEOUT)
        # Read the (short) request first: closing with it unread would reset
        # the connection and lose our answer.
        request = b''
        while b'\n' not in request and len(request) < CONTROL_REQUEST_MAX:
            chunk = conn.recv(CONTROL_REQUEST_MAX)
            if not chunk:
                break
            request += chunk
        uid = peer_uid(conn)
        if uid is not None and uid not in (os.geteuid(), 0):
            self.node.logs.log('control refused', logging.WARNING,
                               'control socket: refusing a request of user %d', uid)
            conn.sendall(b'{"error": "permission denied"}\n')
            return False
        import json
        words = request.split(b'\n', 1)[0].decode('ascii', 'replace').split()
        name, ok, answer = run_node_command(self.node, CONTROL_NAMES, words,
                                            ('control', words[0].lower() if words else ''))
        if name is None:
            conn.sendall(b'{"error": "unknown command"}\n')
            return False
        if name == 'status':
            conn.sendall(json.dumps(answer, sort_keys=True).encode() + b'\n')
            return False
        logger.info('control command %r: %s', ' '.join(words)[:80], answer)
        wait = ok and name in CONTROL_WAITS and len(self.waiters) < CONTROL_WAITERS
        conn.sendall(json.dumps({'ok': ok, 'message': answer, 'pid': os.getpid(),
                                 'wait': wait}).encode() + b'\n')
        return wait


def peer_uid(conn):
    """The user id of a UNIX socket's peer (SO_PEERCRED), or None where the
    platform does not say."""
    option = getattr(socket, 'SO_PEERCRED', None)
    if option is None:
        return None
    creds = conn.getsockopt(socket.SOL_SOCKET, option, struct.calcsize('3i'))
    return struct.unpack('3i', creds)[1]


class MetricsServer:
    """HTTP for Prometheus: GET /metrics (text format 0.0.4) and GET
    /healthz (200 ok, or 503 and why the node takes no new work).

    One named thread ('metrics') accepts connections and reads their
    requests in a selector loop, so an idle or slow peer costs no thread;
    each connection has one deadline (CONTROL_TIMEOUT) for its whole
    request, however it trickles in, and at most METRICS_PENDING wait (the
    oldest is dropped first).  Complete requests are answered on the
    bounded 'metrics' TaskPool, each within its deadline."""

    def __init__(self, node, addr):
        self.node = node
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.sock.bind(addr)
            self.sock.listen(64)
            self.sock.setblocking(False)
        except OSError:
            self.sock.close()
            raise
        self.address = self.sock.getsockname()
        self.pool = TaskPool('metrics', METRICS_THREADS, METRICS_QUEUE, idle_seconds=5.0)

    def start(self):
        threading.Thread(target=self._serve, name='metrics', daemon=True).start()

    def _serve(self):
        sel = selectors.DefaultSelector()
        sel.register(self.sock, selectors.EVENT_READ, None)
        pending = collections.OrderedDict()     # conn -> [deadline, bytearray]
        try:
            while not self.node.stopping.is_set():
                now = time.monotonic()
                wait = 0.5
                if pending:
                    wait = min(wait, max(0.0, next(iter(pending.values()))[0] - now))
                for key, _ in sel.select(wait):
                    if key.data is None:
                        self._accept(sel, pending)
                    else:
                        self._read(sel, pending, key.fileobj)
                now = time.monotonic()
                while pending:
                    conn, (deadline, _) = next(iter(pending.items()))
                    if deadline > now:
                        break
                    self._drop(sel, pending, conn)
        except Exception:  # the endpoint must not die silently
            logger.exception('metrics endpoint failed')
        finally:
            for conn in list(pending):
                self._drop(sel, pending, conn)
            sel.close()
            self.sock.close()
            self.pool.close(1.0)

    def _accept(self, sel, pending):
        while True:
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:      # out of descriptors, say: later
                logger.debug('metrics: accept failed: %s', exc)
                return
            if len(pending) >= METRICS_PENDING:
                self._drop(sel, pending, next(iter(pending)))
            conn.setblocking(False)
            pending[conn] = [time.monotonic() + CONTROL_TIMEOUT, bytearray()]
            sel.register(conn, selectors.EVENT_READ, True)

    def _read(self, sel, pending, conn):
        entry = pending.get(conn)
        if entry is None:
            return
        try:
            data = conn.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b''
        if not data:
            self._drop(sel, pending, conn)
            return
        entry[1] += data
        head = entry[1]
        if b'\r\n\r\n' not in head and b'\n\n' not in head:
            if len(head) > METRICS_REQUEST_MAX:
                self._drop(sel, pending, conn)
            return
        sel.unregister(conn)
        del pending[conn]
        if not self.pool.submit(self._respond, conn, bytes(head), entry[0]):
            conn.close()        # the pool is full or closing

    @staticmethod
    def _drop(sel, pending, conn):
        pending.pop(conn, None)
        try:
            sel.unregister(conn)
        except (KeyError, ValueError):
            pass
        conn.close()

    def _respond(self, conn, head, deadline):
        try:
            line = head.split(b'\n', 1)[0].decode('latin-1').split()
            method, path = (line[0], line[1]) if len(line) >= 2 else ('', '')
            code, body, ctype = self.route(method, path.split('?', 1)[0])
            text = '%d %s' % (code, METRICS_REASONS.get(code, ''))
            data = ('HTTP/1.0 %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n'
                    'Connection: close\r\n\r\n' % (text, ctype, len(body))).encode()
            if method != 'HEAD':
                data += body
            conn.setblocking(True)
            conn.settimeout(max(0.05, deadline - time.monotonic()))
            conn.sendall(data)      # the timeout bounds the whole send
            logger.debug('metrics: %s %s -> %d', method, path[:80], code)
        except OSError as exc:
            logger.debug('metrics: answering failed: %s', exc)
        finally:
            conn.close()

    def route(self, method, path):
        """(HTTP status, body bytes, content type) for a request."""
        plain = 'text/plain; charset=utf-8'
        if method not in ('GET', 'HEAD'):
            return 405, b'only GET and HEAD\n', plain
        if path == '/metrics':
            return 200, self.node.metrics_text().encode(), \
                'text/plain; version=0.0.4; charset=utf-8'
        if path == '/healthz':
            why = self.node.health()
            if why is None:
                return 200, b'ok\n', plain
            return 503, ('%s\n' % why).encode('utf-8', 'replace'), plain
        return 404, b'not found\n', plain


def parse_hostport(text, default_host='127.0.0.1'):
    """'HOST:PORT' or a bare 'PORT' -> (host, port); ValueError if invalid."""
    host, sep, port = str(text).rpartition(':')
    if not sep:
        host = default_host
    host = host.strip('[]') or default_host
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError('invalid port in %r' % text)
    return host, int(port)


def prometheus_label(value):
    """A label value as the text format wants it: backslash, double quote
    and line feed escaped."""
    return str(value).replace('\\', '\\\\').replace('"', '\\"').replace('\n', '\\n')


def process_stats():
    """The node process's own figures for the process_* metrics (None
    where the platform does not say): cpu seconds, resident bytes, open
    descriptors, start time (seconds since the epoch)."""
    times = os.times()
    stats = {'cpu': times.user + times.system, 'rss': None, 'fds': None,
             'start': _PROCESS_START}
    try:
        with open('/proc/self/statm') as fh:
            stats['rss'] = int(fh.read().split()[1]) * resource.getpagesize()
        with open('/proc/self/stat') as fh:
            ticks = int(fh.read().rpartition(')')[2].split()[19])
        with open('/proc/stat') as fh:
            boot = next(int(line.split()[1]) for line in fh if line.startswith('btime '))
        stats['start'] = boot + ticks / os.sysconf('SC_CLK_TCK')
    except (OSError, ValueError, IndexError, StopIteration):
        pass
    if stats['rss'] is None:
        try:
            import psutil
            stats['rss'] = psutil.Process().memory_info().rss
        except Exception:  # optional: no psutil, or it cannot tell
            pass
    for fd_dir in ('/proc/self/fd', '/dev/fd'):
        try:
            stats['fds'] = len(os.listdir(fd_dir))
            break
        except OSError:
            pass
    return stats


def prometheus_text(st, counts, job_times, process=None):
    """The Prometheus text exposition (version 0.0.4) of a status (see
    Node.status), counter snapshot, JobTimes snapshot and process_stats."""
    out = []

    def family(name, kind, text, samples):
        out.append('# HELP %s %s' % (name, text))
        out.append('# TYPE %s %s' % (name, kind))
        for suffix, labels, value in samples:
            label = '{%s}' % ','.join('%s="%s"' % (k, prometheus_label(v))
                                      for k, v in labels) if labels else ''
            out.append('%s%s%s %s' % (name, suffix, label, float(value)))

    outcomes = dict.fromkeys(('Finished', 'Terminated'), 0)
    outcomes.update(st['jobs_done'])
    family('dispynode_jobs_total', 'counter', 'Jobs ended, by outcome.',
           [('', [('outcome', k)], v) for k, v in sorted(outcomes.items())])
    limits = dict.fromkeys(('job_timeout', 'job_memory'), 0)
    limits.update(st['limit_kills'])
    family('dispynode_job_limit_kills_total', 'counter',
           'Jobs ended by a per-job limit, by limit.',
           [('', [('limit', k)], v) for k, v in sorted(limits.items())])
    reasons = dict.fromkeys(('exception', 'signal', 'cancelled', 'job_timeout',
                             'job_memory'), 0)
    reasons.update(st.get('jobs_terminated') or {})
    family('dispynode_jobs_terminated_total', 'counter',
           'Jobs ended Terminated, by reason.',
           [('', [('reason', k)], v) for k, v in sorted(reasons.items())])
    for name, key, text in (
            ('computations', 'computations', 'Computations accepted.'),
            ('bytes_received', 'bytes_in', 'Bytes received from clients.'),
            ('bytes_sent', 'bytes_out', 'Bytes sent to clients.'),
            ('refused_connections', 'refused_connections',
             'Connections refused (capacity or authentication).'),
            ('dropped_packets', 'dropped_packets', 'UDP datagrams ignored.'),
            ('guard_refusals', 'guard_refusals',
             'Computations or jobs refused for low free memory or disk.')):
        family('dispynode_%s_total' % name, 'counter', text,
               [('', [], counts.get(key, 0))])
    for name, value, text in (
            ('cpus', st['cpus'], 'CPUs offered.'),
            ('cpus_busy', st['cpus_busy'], 'CPUs running a job.'),
            ('jobs_running', len(st['jobs_running']), 'Jobs running.'),
            ('stored_results', st['stored_results'], 'Undelivered results stored.'),
            ('serving', int(bool(st['serving'])), '1 while taking new work.'),
            ('draining', int(bool(st.get('draining'))), '1 while draining.'),
            ('uptime_seconds', st['uptime'], 'Seconds since the node started.')):
        family('dispynode_' + name, 'gauge', text, [('', [], value)])
    buckets, total, seconds = job_times
    samples = [('_bucket', [('le', repr(float(b)))], n) for b, n in buckets]
    samples += [('_bucket', [('le', '+Inf')], total), ('_sum', [], seconds),
                ('_count', [], total)]
    family('dispynode_job_seconds', 'histogram', 'Run time of ended jobs.', samples)
    family('dispynode_build_info', 'gauge', 'The node\'s version (the value is 1).',
           [('', [('version', st.get('version', __version__)),
                  ('protocol', st.get('protocol', dc.PROTOCOL_VERSION)),
                  ('python', '%d.%d.%d' % sys.version_info[:3])], 1)])
    process = process or {}
    for name, kind, key, text in (
            ('process_cpu_seconds_total', 'counter', 'cpu',
             'User and system CPU time of the node process, in seconds.'),
            ('process_resident_memory_bytes', 'gauge', 'rss', 'Resident memory in bytes.'),
            ('process_open_fds', 'gauge', 'fds', 'Open file descriptors.'),
            ('process_start_time_seconds', 'gauge', 'start',
             'Start time of the process since the epoch, in seconds.')):
        if process.get(key) is not None:
            family(name, kind, text, [('', [], process[key])])
    return '\n'.join(out) + '\n'


def format_status_table(status):
    """The status dict (Node.status) as a plain-text table for a terminal."""
    def when(seconds):
        seconds = int(seconds or 0)
        days, rest = divmod(seconds, 86400)
        text = '%02d:%02d:%02d' % (rest // 3600, rest % 3600 // 60, rest % 60)
        return '%dd %s' % (days, text) if days else text

    done = status.get('jobs_done') or {}
    rows = [
        ('node', '%s (dispynode %s) at %s:%s, pid %s' % (
            status.get('name'), status.get('version'), status.get('ip_addr', '?'),
            status.get('port', '?'), status.get('pid', '?'))),
        ('uptime', when(status.get('uptime'))),
        ('cpus', '%s busy of %s' % (status.get('cpus_busy'), status.get('cpus'))),
        ('serving', 'yes' if status.get('serving') else
         'no (%s)' % (status.get('refusing') or 'stopping')),
        ('client', status.get('client') or '-'),
        ('jobs done', ', '.join('%s %d' % kv for kv in sorted(done.items())) or '0'),
        ('stored results', status.get('stored_results')),
        ('bytes in / out', '%s / %s' % (status.get('bytes_in'), status.get('bytes_out'))),
        ('refused connections', status.get('refused_connections')),
        ('dropped packets', status.get('dropped_packets', 0)),
    ]
    limits = status.get('limits') or {}
    shown = []
    if limits.get('job_timeout'):
        shown.append('timeout %gs' % limits['job_timeout'])
    if limits.get('job_memory'):
        shown.append('memory %s (%s)' % (limits['job_memory'], 'RLIMIT_AS and cgroup %s'
                                         % limits['job_memory_cgroup']
                                         if limits.get('job_memory_cgroup')
                                         else 'RLIMIT_AS only'))
    if limits.get('job_threads'):
        shown.append('threads %s' % limits['job_threads'])
    rows.append(('job limits', ', '.join(shown) or 'none'))
    guards = status.get('guards') or {}
    if guards.get('min_free_memory') or guards.get('min_free_disk'):
        rows.append(('free memory / disk', '%s / %s (minimums %s / %s)' % (
            format_size(guards.get('free_memory')), format_size(guards.get('free_disk')),
            format_size(guards.get('min_free_memory')),
            format_size(guards.get('min_free_disk')))))
    width = max(len(str(k)) for k, _ in rows)
    # client-given names reach a terminal here: escaped (printable)
    lines = ['%-*s  %s' % (width, k, printable(str(v))) for k, v in rows]
    comps = status.get('computations') or []
    lines.append('')
    lines.append('computations: %d' % len(comps))
    if comps:
        head = ('id', 'name', 'client', 'state', 'running', 'done', 'stored')
        table = [head] + [(str(c.get('id')), str(c.get('name')), str(c.get('client')),
                           str(c.get('state')), str(c.get('jobs_running')),
                           str(sum((c.get('jobs_done') or {}).values())
                               if isinstance(c.get('jobs_done'), dict) else c.get('jobs_done')),
                           str(c.get('stored'))) for c in comps]
        lines += _columns(table)
    running = status.get('jobs_running') or []
    lines.append('')
    lines.append('jobs running: %d' % len(running))
    if running:
        table = [('uid', 'computation', 'seconds')] + [
            (str(j.get('uid')), str(j.get('computation')), '%.1f' % (j.get('seconds') or 0))
            for j in running]
        lines += _columns(table)
    return '\n'.join(lines) + '\n'


def _columns(table):
    table = [[printable(cell) for cell in row] for row in table]
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    return ['  ' + '  '.join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip()
            for row in table]


def _control_connect(prefix, timeout):
    """A connection to the control socket of the node serving ``prefix``,
    after checking that the socket is the node's of our own user (or
    root's).  Raises OSError with a clear text."""
    path = os.path.join(prefix, CONTROL_SOCKET)
    try:
        st = os.lstat(path)
    except OSError as exc:
        raise OSError('no node control socket at %s (%s): is a node running with '
                      '--dest_path_prefix %s?' % (path, exc.strerror, prefix))
    if not stat.S_ISSOCK(st.st_mode):
        raise OSError('%s is not a socket' % path)
    if stat.S_IMODE(st.st_mode) & 0o077 or st.st_uid not in (os.geteuid(), 0):
        raise OSError('refusing %s: mode %o, owner %d (expected 600 and your user)'
                      % (path, stat.S_IMODE(st.st_mode), st.st_uid))
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(path)
        uid = peer_uid(sock)
        if uid is not None and uid not in (os.geteuid(), 0):
            raise OSError('refusing %s: served by user %d' % (path, uid))
    except BaseException:
        sock.close()
        raise
    return sock


def _control_answer(sock):
    """The node's one JSON line (the node closes after it, or keeps the
    connection open for a waiting command)."""
    import json
    data = b''
    while not data.endswith(b'\n'):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
        if len(data) > 64 * 1024 * 1024:
            raise ValueError('answer too long')
    answer = json.loads(data.decode())
    if isinstance(answer, dict) and answer.get('error'):
        raise OSError('node refused: %s' % answer['error'])
    return answer


def query_control(prefix, command='status', timeout=5.0):
    """Ask the node serving ``prefix`` (its control socket); returns the
    decoded JSON answer.  Raises OSError or ValueError with a clear text."""
    with _control_connect(prefix, timeout) as sock:
        sock.sendall(command.encode() + b'\n')
        return _control_answer(sock)


def wait_for_exit(sock, timeout):
    """Wait (``timeout`` seconds; None: no limit) for the end of file that
    the node's exit gives a held control connection.  True if it came."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            return False
        sock.settimeout(left if left is None else max(0.05, left))
        try:
            if not sock.recv(4096):
                return True
        except socket.timeout:
            return False
        except ConnectionError:
            return True


CONTROL_CLI = ('status', 'drain', 'pause', 'resume', 'cpus', 'release', 'stop')


def control_main(command, argv):
    """``dispynode <command> [--dest_path_prefix P | --config FILE] ...``:
    one command to the running node over its control socket.  Prints one
    line (status: a table or JSON); exits 0 on success, 1 if refused or
    the node cannot be reached (or, for drain and stop, is still running
    after --timeout), 2 on a usage error."""
    import json
    helps = {'status': 'Show the status of the node running with this --dest_path_prefix.',
             'drain': 'Let the node take no new computation or job, and exit once its '
                      'running jobs have ended and their replies are delivered or '
                      'stored; returns when the node has exited.',
             'pause': 'Take no new computation (running work goes on).',
             'resume': 'Take computations again after a pause.',
             'cpus': 'Offer N cpus from now on (negative: all but that many).',
             'release': "Drop the current client's computations now.",
             'stop': 'Shut the node down now (as SIGTERM); returns when it has exited.'}
    p = argparse.ArgumentParser(prog='dispynode %s' % command, description=helps[command])
    p.add_argument('--dest_path_prefix', default=None,
                   help="the running node's prefix (default: its --config file's, else "
                        "<tmp>/dispy/node)")
    p.add_argument('--config', default='', metavar='FILE',
                   help="the node's config file (to find its --dest_path_prefix)")
    if command == 'status':
        p.add_argument('--json', action='store_true', help='print JSON instead of a table')
    if command == 'cpus':
        p.add_argument('n', type=int, metavar='N', help='cpus to offer')
    if command in ('drain', 'stop'):
        p.add_argument('--timeout', type=float, default=0 if command == 'drain' else 60,
                       metavar='S', help='give up waiting after S seconds (exit 1; %s)'
                       % ('default: wait until the node exits' if command == 'drain'
                          else 'default 60'))
    args = p.parse_args(argv)
    prefix = args.dest_path_prefix
    if prefix is None and args.config:
        node_parser = build_parser()
        try:
            apply_config_file(node_parser, args.config)
        except ValueError as exc:
            p.exit(2, 'dispynode: error: %s\n' % exc)
        prefix = node_parser.get_default('dest_path_prefix')
    prefix = prefix or os.path.join(tempfile.gettempdir(), 'dispy', 'node')
    prefix = os.path.abspath(prefix.strip()).rstrip(os.sep)
    if command == 'status':
        try:
            status = query_control(prefix)
        except (OSError, ValueError) as exc:
            p.exit(1, 'dispynode: error: %s\n' % exc)
        if args.json:
            sys.stdout.write(json.dumps(status, indent=1, sort_keys=True) + '\n')
        else:
            sys.stdout.write(format_status_table(status))
        return 0
    line = command if command != 'cpus' else 'cpus %d' % args.n
    timeout = getattr(args, 'timeout', None)
    if timeout is not None and timeout < 0:
        p.error('--timeout must be 0 (no limit) or positive')
    try:
        with _control_connect(prefix, 10.0) as sock:
            sock.sendall(line.encode() + b'\n')
            answer = _control_answer(sock)
            if not isinstance(answer, dict) or 'ok' not in answer:
                raise ValueError('unexpected answer %r' % (answer,))
            if not answer['ok']:
                p.exit(1, 'dispynode: error: %s\n' % answer.get('message'))
            if command not in ('drain', 'stop'):
                sys.stdout.write('%s\n' % answer.get('message'))
                return 0
            if not answer.get('wait'):
                p.exit(1, 'dispynode: error: %s; cannot wait for the node (pid %s) to exit '
                          '(too many commands wait)\n' % (answer.get('message'),
                                                          answer.get('pid')))
            if not wait_for_exit(sock, timeout or None):
                p.exit(1, 'dispynode: error: the node (pid %s) is still %s after %gs\n'
                       % (answer.get('pid'), 'draining' if command == 'drain'
                          else 'stopping', timeout))
    except (OSError, ValueError) as exc:
        p.exit(1, 'dispynode: error: %s\n' % exc)
    sys.stdout.write('%s: the node (pid %s) has exited\n' % (
        'drained' if command == 'drain' else 'stopped', answer.get('pid')))
    return 0


def status_main(argv):
    """``dispynode status [--dest_path_prefix P] [--json]``."""
    return control_main('status', argv)


def resolve_obs_options(args):
    """Validate the options of this section (part of resolve_config)."""
    for opt in ('job_memory', 'min_free_memory', 'min_free_disk'):
        text = getattr(args, opt)
        try:
            setattr(args, opt, dc.parse_size(text) if text else 0)
        except ValueError as exc:
            raise ValueError('--%s: %s' % (opt, exc))
        setattr(args, opt + '_text', text or '')
    if args.job_memory and args.job_memory < 16 * 1024 * 1024:
        raise ValueError('--job_memory must be at least 16m (a Python job needs more)')
    if args.job_timeout < 0:
        raise ValueError('--job_timeout must be 0 (off) or positive')
    if args.job_threads < 0:
        raise ValueError('--job_threads must be 0 (unset) or positive')
    if args.metrics:
        try:
            args.metrics = parse_hostport(args.metrics)
        except ValueError as exc:
            raise ValueError('--metrics: %s (use HOST:PORT or PORT)' % exc)
    args.job_cgroup = args.cgroup_note = None     # see start_up
    args.proc_cgroup = args.proc_cgroup_note = None


def add_obs_options(p):
    p.epilog = ('"%(prog)s status [--dest_path_prefix P] [--json]" shows the status of the '
                'node running with that prefix; "%(prog)s drain|pause|resume|cpus N|release|'
                'stop [--dest_path_prefix P | --config FILE]" controls it (see '
                '"%(prog)s drain --help").')
    p.add_argument('--metrics', default=None, metavar='HOST:PORT',
                   help='serve Prometheus metrics at http://HOST:PORT/metrics '
                        '(a bare PORT binds 127.0.0.1; default: off)')
    p.add_argument('--job_timeout', type=float, default=0.0, metavar='SECONDS',
                   help='terminate a job running longer than this (default: no limit)')
    p.add_argument('--job_memory', default='', metavar='SIZE',
                   help='address-space (and, where possible, cgroup v2 memory) limit '
                        'of each job, with k/m/g suffix (default: no limit)')
    p.add_argument('--job_threads', type=int, default=0, metavar='N',
                   help='set OMP_NUM_THREADS, OPENBLAS_NUM_THREADS, MKL_NUM_THREADS '
                        'and similar to N for jobs (default: unset)')
    p.add_argument('--min_free_memory', default='', metavar='SIZE',
                   help='take no new computation or job while free memory is below '
                        'this (k/m/g suffix; default: off)')
    p.add_argument('--min_free_disk', default='', metavar='SIZE',
                   help='take no new computation or job while free disk under '
                        '--dest_path_prefix is below this (default: off)')


# ---------------------------------------------------------------- main

def build_parser():
    p = argparse.ArgumentParser(
        prog='dispynode',
        description='Compute node for dispy 4.5 clients (stdlib port of dispynode 4.5.5).')
    p.add_argument('-c', '--cpus', type=int, default=0,
                   help='number of CPUs to use; negative leaves that many unused '
                        '(default: all)')
    p.add_argument('-d', '--debug', action='store_true', help='log debug messages')
    p.add_argument('-i', '--ip_addr', '--host', action='append', default=None,
                   help='IP address to serve on (default: primary IPv4 address); may be '
                        'repeated; 0.0.0.0 serves every interface')
    p.add_argument('--ext_ip_addr', '--ext_host', action='append', default=None,
                   help='address announced to clients (NAT gateway address); the n-th '
                        'pairs with the n-th -i')
    p.add_argument('-p', '--node_port', type=int, default=DEFAULT_NODE_PORT,
                   help='TCP and UDP port (default %(default)s)')
    p.add_argument('--name', default='', help='node name shown to clients (default: hostname)')
    p.add_argument('--dest_path_prefix', default=None,
                   help='directory for files and stored results '
                        '(default: <tmp>/dispy/node)')
    p.add_argument('--scheduler_node', '--scheduler_host', default=None,
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
    p.add_argument('--job_user', default=None,
                   help='run workers and jobs as this unprivileged user (the node must '
                        'start as root), so that jobs cannot read stored results, other '
                        "clients' files or the node's environment")
    p.add_argument('--max_request_size', default=DEFAULT_MAX_REQUEST,
                   help='largest request (e.g. a job with its arguments) accepted, with '
                        'k/m/g suffix; larger ones get a NAK (default %(default)s)')
    p.add_argument('--max_request_memory', default=DEFAULT_REQUEST_MEMORY,
                   help='memory all requests being received may hold together, with '
                        'k/m/g suffix (default %(default)s)')
    add_service_options(p)
    add_obs_options(p)
    p.add_argument('--version', action='version',
                   version='dispynode %s (dispy protocol %s)' % (__version__,
                                                               dc.PROTOCOL_VERSION))
    return p


# Options of later dispy nodes (4.15) that this node does not implement:
# each fails with one line naming it.
UNSUPPORTED_OPTIONS = {
    '--ipv4_udp_multicast': 0, '--unsafe_setup': 0, '--init': 1, '--admin_secret': 1,
    '--dispy_port': 1}
# Names later nodes use in their config files, mapped onto ours.
CONFIG_ALIASES = {'hosts': 'ip_addr', 'ext_hosts': 'ext_ip_addr',
                  'scheduler_host': 'scheduler_node', 'loglevel': 'debug',
                  'node_init': 'init', 'safe_setup': 'unsafe_setup'}
# A later node writes these unimplemented options into every file it saves;
# with these (default) values they ask for nothing.
LATER_DEFAULTS = {'dispy_port': ('9700', ''), 'unsafe_setup': ('true', ''),
                  'ipv4_udp_multicast': ('false', ''), 'init': ('',), 'admin_secret': ('',)}


class _Unsupported(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        parser.exit(2, 'dispynode: error: %s is an option of later dispy nodes that this '
                       'node does not implement\n' % option_string)


def add_service_options(p):
    """Options of later dispy nodes for running as a service."""
    g = p.add_argument_group('service (options of later dispy nodes)')
    g.add_argument('--daemon', action='store_true',
                   help='no interactive console (the node stays in the foreground)')
    g.add_argument('--ping_interval', type=float, default=0,
                   help='while free, announce the node every this many seconds '
                        '(0 = only when it becomes free)')
    g.add_argument('--serve', type=int, default=-1,
                   help='exit after this many computations have ended (-1 = no limit)')
    g.add_argument('--service_start', default='', metavar='HH:MM',
                   help='daily time when the node starts taking computations')
    g.add_argument('--service_stop', default='', metavar='HH:MM',
                   help='daily time when the node takes no new computation (running '
                        'work goes on)')
    g.add_argument('--service_end', default='', metavar='HH:MM',
                   help='daily time when running jobs end as in a node shutdown')
    g.add_argument('--client_shutdown', action='store_true',
                   help="a computation's cleanup may call dispynode_shutdown() to stop "
                        "the node once that computation ends")
    g.add_argument('--force_cleanup', action='store_true',
                   help="remove a computation's files even if the client asked cleanup=False")
    g.add_argument('--log_file', default='', metavar='PATH',
                   help='write the log to this file (appending) instead of stderr; '
                        'SIGHUP reopens it (for logrotate)')
    g.add_argument('--config', default='', metavar='FILE',
                   help='read options from this INI file (command-line options override it)')
    g.add_argument('--save_config', default='', metavar='FILE',
                   help='write every option to this INI file and exit')
    for flag, nargs in sorted(UNSUPPORTED_OPTIONS.items()):
        p.add_argument(flag, action=_Unsupported, nargs='?' if nargs else 0,
                       help=argparse.SUPPRESS)


def _config_value(action, text, key):
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        value = text.strip().lower()
        if value not in ('1', 'true', 'yes', 'on', '0', 'false', 'no', 'off', ''):
            raise ValueError('%s: expected true or false, not %r' % (key, text))
        truth = value in ('1', 'true', 'yes', 'on')
        return truth if isinstance(action, argparse._StoreTrueAction) else not truth
    if isinstance(action, argparse._AppendAction):
        text = text.strip()
        if text.startswith('['):       # a later node's file: a Python list
            text = re.sub(r"[\[\]'\"]", '', text)
        return [v.strip() for v in text.split(',') if v.strip()] or None
    if action.type is not None:
        try:
            return action.type(text.strip())
        except ValueError:
            raise ValueError('%s: invalid value %r' % (key, text))
    return text.strip()


def apply_config_file(parser, path):
    """Set ``parser``'s defaults from the INI file ``path`` (section
    [DEFAULT] or [dispynode]; keys are the long option names), so that
    command-line options override it.  Empty values keep the default.
    Returns the repeatable options' values, which the caller applies only
    where the command line gives none (argparse would add to them)."""
    import configparser
    cp = configparser.ConfigParser(interpolation=None)
    try:
        with open(path) as fh:
            cp.read_file(fh)
    except (OSError, configparser.Error) as exc:
        raise ValueError('--config %s: %s' % (path, str(exc).splitlines()[0]))
    items = dict(cp.defaults())
    if cp.has_section('dispynode'):
        items.update(cp.items('dispynode'))
    actions = {a.dest: a for a in parser._actions if a.dest not in ('help', 'version')}
    values = {}
    for key, text in items.items():
        dest = CONFIG_ALIASES.get(key, key)
        action = actions.get(dest)
        if action is None or dest in ('config', 'save_config'):
            raise ValueError('--config %s: unknown option %r' % (path, key))
        if isinstance(action, _Unsupported):
            if text.strip().lower() in LATER_DEFAULTS.get(dest, ()):
                continue
            raise ValueError('--config %s: %s is an option of later dispy nodes that this '
                             'node does not implement' % (path, key))
        if text.strip() in ('', 'None') and not isinstance(action, argparse._StoreTrueAction):
            continue
        values[dest] = _config_value(action, text, key)
    lists = {k: values.pop(k) for k in list(values)
             if isinstance(actions[k], argparse._AppendAction)}
    parser.set_defaults(**values)
    return lists


def save_config_file(args, path):
    """Write every option of ``args`` (as parsed) to the INI file ``path``."""
    import configparser
    cp = configparser.ConfigParser(interpolation=None)
    section = {}
    skip = {'config', 'save_config'} | {f.lstrip('-') for f in UNSUPPORTED_OPTIONS}
    for key, value in sorted(vars(args).items()):
        if key in skip:
            continue
        if value is None:
            value = ''
        elif isinstance(value, list):
            value = ', '.join(str(v) for v in value)
        section[key] = str(value)
    cp['dispynode'] = section
    text = io.StringIO()
    text.write('# dispynode %s options; command-line options override these\n' % __version__)
    cp.write(text)
    try:
        atomic_write(os.path.abspath(path), text.getvalue().encode())
    except OSError as exc:
        raise ValueError('--save_config %s: %s' % (path, exc.strerror or exc))


def resolve_service(args):
    """Validate the service options (part of resolve_config)."""
    if args.ping_interval < 0:
        raise ValueError('--ping_interval must be 0 (off) or positive')
    if args.serve == 0 or args.serve < -1:
        raise ValueError('--serve must be a positive number of computations (or -1)')
    minutes = {}
    for opt in ('service_start', 'service_stop', 'service_end'):
        text = getattr(args, opt)
        minutes[opt] = parse_hhmm(text, '--' + opt) if text else None
    start, stop, end = minutes['service_start'], minutes['service_stop'], \
        minutes['service_end']
    if start is not None and stop is None and end is None:
        raise ValueError('--service_start needs --service_stop or --service_end')
    if stop is not None and end is not None:
        base = start if start is not None else stop
        if not (stop - base) % 1440 < (end - base) % 1440 or stop == end:
            raise ValueError('--service_stop must come before --service_end')
    if start is not None and start in (stop, end):
        raise ValueError('--service_start must differ from --service_stop/--service_end')
    args.service_start_minute, args.service_stop_minute, args.service_end_minute = \
        start, stop, end


class Config:
    """The node's options, validated once by resolve_config and read-only
    afterwards (``replace`` makes a changed copy)."""
    __slots__ = ('_values',)

    def __init__(self, values):
        object.__setattr__(self, '_values', dict(values))

    def __getattr__(self, name):
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name, value):
        raise AttributeError('the configuration is read-only (%s)' % name)

    def replace(self, **changes):
        return Config(dict(self._values, **changes))


def resolve_config(args):
    """Validate the parsed options into a read-only Config; raise
    ValueError with a one-line message.  Pure: no name lookups, no files
    read, the environment untouched (start_up does those)."""
    resolve_service(args)
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
    for opt in ('max_request_size', 'max_request_memory'):
        try:
            value = dc.parse_size(getattr(args, opt))
        except ValueError as exc:
            raise ValueError('--%s: %s' % (opt, exc))
        if not 0 < value < 2 ** 32:
            raise ValueError('--%s must be between 1 and 4g (the frame length field)' % opt)
        setattr(args, opt, value)
    if args.max_request_memory < args.max_request_size:
        raise ValueError('--max_request_memory must be at least --max_request_size')
    resolve_obs_options(args)
    check_addresses(args)
    for opt in ('certfile', 'keyfile'):
        if getattr(args, opt):
            setattr(args, opt, os.path.abspath(getattr(args, opt)))
    if args.keyfile and not args.certfile:
        raise ValueError('--keyfile needs --certfile')
    prefix = args.dest_path_prefix or os.path.join(tempfile.gettempdir(), 'dispy', 'node')
    args.dest_path_prefix = os.path.abspath(prefix.strip()).rstrip(os.sep)
    args.started_up = False
    return Config(vars(args))


# ---------------------------------------------------------------- start-up

def start_up(cfg, environ=os.environ):
    """The node's start-up side effects on a validated Config, in order:
    take the secret (and remove it from the environment, which workers and
    jobs inherit), look up --job_user, resolve addresses, check the TLS
    files, create and lock the prefix, try the job user and (with
    --job_memory) prepare the cgroup v2 groups for jobs; take
    $NOTIFY_SOCKET (systemd) from the environment too.  Returns the completed
    Config (a second call returns it unchanged); raises ValueError with a
    one-line message."""
    if cfg.started_up:
        return cfg
    secret = _read_secret(cfg, environ)
    job_user = _job_user(cfg.job_user)
    override = environ.get('DISPYNODE_ZOMBIE_SECONDS')
    notes = []      # logged only once every lookup succeeded
    cfg = cfg.replace(
        secret=secret, job_user=job_user, service_clock=ServiceClock.from_env(environ),
        zombie_seconds=float(override) if override else cfg.zombie_interval * 60,
        scheduler_node=cfg.scheduler_node and _resolve(cfg.scheduler_node,
                                                        '--scheduler_node'),
        name=cfg.name or socket.gethostname(), **resolve_addresses(cfg, notes))
    for opt in ('certfile', 'keyfile'):
        path = getattr(cfg, opt)
        if path and not os.access(path, os.R_OK):
            raise ValueError('--%s %s: file is missing or unreadable' % (opt, path))
    tls_contexts = (None, None)     # (server, client), loaded once, here
    if cfg.certfile:
        try:
            tls_contexts = (dc.server_tls_context(cfg.certfile, cfg.keyfile),
                            dc.client_tls_context(cfg.certfile))
        except OSError as exc:
            raise ValueError('TLS certificate/key not usable: %s' % exc)
    for level, note in notes:
        logger.log(level, note)
    prefix_lock = prepare_prefix(cfg)
    try:
        check_job_user(cfg)
        job_cgroup = cgroup_note = proc_note = None
        if cfg.job_memory:
            job_cgroup, cgroup_note = cgroup_v2_memory()
            if job_cgroup:
                logger.info('jobs get a cgroup v2 memory limit under %s', job_cgroup)
            else:
                logger.info('job memory is limited by RLIMIT_AS only (no cgroup: %s)',
                            cgroup_note)
    except BaseException:
        prefix_lock.close()
        raise
    if environ.get('DISPYNODE_NO_CGROUP') == '1':
        proc_note = 'DISPYNODE_NO_CGROUP=1'
    # The memory group is the jobs' group too; without it the Node makes a
    # plain one (see Node.__init__: it removes what it made).
    return cfg.replace(started_up=True, tls_contexts=tls_contexts, job_cgroup=job_cgroup,
                       cgroup_note=cgroup_note, proc_cgroup=job_cgroup,
                       proc_cgroup_note=proc_note, prefix_lock=prefix_lock,
                       notify_socket=environ.pop('NOTIFY_SOCKET', None) or None)


def _user_name(uid):
    import pwd
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


JobUser = collections.namedtuple('JobUser', 'name uid gid')


def _job_user(name):
    """--job_user NAME as a JobUser (None without the option)."""
    if name is None:
        return None
    import pwd
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise ValueError('--job_user %s: no such user' % name) from None
    if entry.pw_uid == 0:
        raise ValueError('--job_user %s: must be an unprivileged user, not root' % name)
    if os.geteuid() != 0:
        raise ValueError('--job_user needs the node to start as root')
    if sys.version_info < (3, 9):
        raise ValueError('--job_user needs Python 3.9 or later')
    return JobUser(name, entry.pw_uid, entry.pw_gid)


def check_job_user(cfg):
    """Start the worker program as the job user once, so that a user who
    cannot read the node's files or its Python fails here, not at the
    first job."""
    if not cfg.job_user:
        return
    cmd = worker_command('pass', cfg.job_user)
    try:
        proc = subprocess.run(cmd, cwd=cfg.dest_path_prefix, stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=60,
                              **job_user_args(cfg.job_user))
    except (OSError, subprocess.SubprocessError) as exc:
        raise ValueError('--job_user %s: cannot start workers: %s' % (cfg.job_user.name, exc))
    if proc.returncode != 0:
        last = (proc.stdout.decode('utf-8', 'replace').strip().splitlines() or ['?'])[-1]
        raise ValueError('--job_user %s cannot run %s with %s: %s'
                         % (cfg.job_user.name, _HERE, sys.executable, last))


def job_user_args(job_user):
    """subprocess arguments that drop to ``job_user`` (none without it)."""
    if not job_user:
        return {}
    return {'user': job_user.uid, 'group': job_user.gid, 'extra_groups': []}


def check_addresses(args):
    """-i (repeatable; 0.0.0.0, * or '' = every interface) and
    --ext_ip_addr (the n-th pairs with the n-th -i): what can be checked
    without a lookup."""
    args.ip_addr = [a.strip() for a in (args.ip_addr or []) if a is not None]
    args.ext_ip_addr = [e.strip() for e in (args.ext_ip_addr or []) if e is not None]
    if len(args.ext_ip_addr) > max(len(args.ip_addr), 1):
        raise ValueError('--ext_ip_addr is given %d times but -i only %d' % (
            len(args.ext_ip_addr), len(args.ip_addr)))
    if len(args.ip_addr) > 1 and any(a in ('0.0.0.0', '*', '') for a in args.ip_addr):
        raise ValueError('-i 0.0.0.0 serves every interface: give it alone')


def resolve_addresses(cfg, notes):
    """Look up -i and --ext_ip_addr.  Returns the Config fields ip_addrs
    [(bind, ext or None)], ip_addr (what the TCP server binds) and
    ext_ip_addr (our address where no client tells which)."""
    binds = []
    for addr in cfg.ip_addr:
        bind = '0.0.0.0' if addr in ('0.0.0.0', '*', '') else _resolve_local(addr,
                                                                             '-i/--ip_addr')
        if bind in binds:
            raise ValueError('-i %s is given twice' % addr)
        binds.append(bind)
    if not binds:
        binds = [primary_ipv4()]
        notes.append((logging.INFO, 'serving on %s (primary address; use -i to choose)'
                      % binds[0]))
        if binds[0].startswith('127.'):
            notes.append((logging.WARNING, 'only a loopback address was found; other '
                          'machines cannot reach this node'))
    exts = cfg.ext_ip_addr
    ip_addrs = [(b, _resolve(exts[i], '--ext_ip_addr') if i < len(exts) else None)
                for i, b in enumerate(binds)]
    first_bind, first_ext = ip_addrs[0]
    return {'ip_addrs': ip_addrs, 'ip_addr': binds[0] if len(binds) == 1 else '0.0.0.0',
            'ext_ip_addr': first_ext or (first_bind if first_bind != '0.0.0.0'
                                         else primary_ipv4())}


def _read_secret(cfg, environ):
    """The secret from its one source: -s, --secret_file or
    $DISPYNODE_SECRET (two sources, or an empty file, are an error: which
    one the clients share would be a guess)."""
    # Workers and jobs inherit the environment; they have no use for the secret.
    env_secret = environ.pop('DISPYNODE_SECRET', '')
    given = [name for name, value in (('-s/--secret', cfg.secret is not None),
                                      ('--secret_file', cfg.secret_file),
                                      ('DISPYNODE_SECRET', env_secret)) if value]
    if len(given) > 1:
        raise ValueError('the secret is given by both %s: give it one way only'
                         % ' and '.join(given))
    if cfg.secret_file:
        try:
            with open(cfg.secret_file) as fh:
                secret = fh.read().strip()
        except OSError as exc:
            raise ValueError('--secret_file: %s' % exc.strerror)
        except UnicodeDecodeError:
            raise ValueError('--secret_file %s: not text' % cfg.secret_file)
        if not secret:
            raise ValueError('--secret_file %s is empty' % cfg.secret_file)
        return secret
    if cfg.secret is not None:
        return cfg.secret
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
    """Many idle peers should cost descriptors, not refusals: the soft
    limit goes up to the hard one (at most 65536).  Returns a note for the
    log when the limit stays small, else None."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 65536
    if soft != resource.RLIM_INFINITY and soft < min(target, 65536):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(target, 65536), hard))
        except (ValueError, OSError):
            pass
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft != resource.RLIM_INFINITY and soft < 1024:
        return ('the descriptor limit is %d (hard limit %s): the node takes fewer '
                'connections at once' % (soft, 'unlimited' if hard == resource.RLIM_INFINITY
                                         else hard))
    return None


def check_prefix_path(prefix):
    """Refuse a prefix that another local user could redirect: the
    prefix itself, and every level below a world-writable directory (such
    as /tmp), must be a real directory (not a symlink) owned by us or root.
    Levels that do not exist yet are fine (we create them).  Raises
    ValueError."""
    trusted = {os.geteuid(), 0}
    current, exposed = os.sep, False
    for part in prefix.strip(os.sep).split(os.sep):
        if os.stat(current).st_mode & stat.S_IWOTH:
            exposed = True
        current = os.path.join(current, part)
        try:
            st = os.lstat(current)
        except FileNotFoundError:
            return
        if exposed or current == prefix:
            if stat.S_ISLNK(st.st_mode):
                raise ValueError('--dest_path_prefix: %s is a symlink; refusing to use it'
                                 % current)
            if st.st_uid not in trusted:
                raise ValueError('--dest_path_prefix: %s is owned by another user (uid %d); '
                                 'refusing to use it' % (current, st.st_uid))
        if not os.path.isdir(current):
            raise ValueError('--dest_path_prefix: %s is not a directory' % current)


PREFIX_LOCK = '.dispynode-lock'


def lock_prefix(prefix):
    """Take the prefix for this node: an exclusive flock on
    <prefix>/.dispynode-lock, held (the returned file open) for the node's
    life and released by the kernel however the node ends.  The file holds
    the pid of the node that has it.  Raises ValueError naming that pid if
    another node holds it."""
    path = os.path.join(prefix, PREFIX_LOCK)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise ValueError('--dest_path_prefix %s: cannot open its lock file: %s'
                         % (prefix, exc.strerror))
    lock = os.fdopen(fd, 'r+')
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = lock.read(32).strip()
        lock.close()
        raise ValueError('--dest_path_prefix %s is in use by another node (pid %s)'
                         % (prefix, holder if holder.isdigit() else 'unknown'))
    lock.seek(0)
    lock.truncate()
    lock.write('%d\n' % os.getpid())
    lock.flush()
    return lock


def prepare_prefix(cfg):
    """Check, create (mode 0700; 0711 with --job_user so that the job
    user can reach its own directories), lock (lock_prefix) and, with
    --clean, empty the prefix; returns the lock.  Nothing under it is
    followed through a symlink."""
    prefix = cfg.dest_path_prefix
    mode = 0o711 if cfg.job_user else 0o700
    check_prefix_path(prefix)
    missing = []
    probe = prefix
    while not os.path.lexists(probe):
        missing.append(probe)
        probe = os.path.dirname(probe)
    for path in reversed(missing):
        try:
            os.mkdir(path, mode)
        except FileExistsError:
            pass
    check_prefix_path(prefix)     # nobody swapped a level in meanwhile
    if os.stat(prefix).st_uid == os.geteuid():
        os.chmod(prefix, mode)
    lock = lock_prefix(prefix)      # before --clean: never empty another node's prefix
    if cfg.clean:
        for name in os.listdir(prefix):
            if name == PREFIX_LOCK:
                continue
            full = os.path.join(prefix, name)
            if stat.S_ISDIR(os.lstat(full).st_mode):
                shutil.rmtree(full, ignore_errors=True)   # never follows symlinks
            else:
                os.unlink(full)
    return lock


class JournalFormatter(logging.Formatter):
    """Log lines for journald reading our stderr: each line (a traceback's
    too) starts with its syslog priority, ``<3>`` error ... ``<7>`` debug
    (sd-daemon(3)), so that ``journalctl -p warning`` finds warnings; no
    time stamp (the journal has it)."""
    PRIORITIES = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4),
                  (logging.INFO, 6))

    def format(self, record):
        prio = next((p for level, p in self.PRIORITIES if record.levelno >= level), 7)
        return '\n'.join('<%d>%s' % (prio, line)
                         for line in super().format(record).split('\n'))


def stderr_is_journal(environ=os.environ, fd=2):
    """Whether stderr is the journal stream systemd gave us: $JOURNAL_STREAM
    ("device:inode") names the file that fd 2 still is (systemd.exec(5);
    a redirected stderr does not match)."""
    dev, _, ino = environ.get('JOURNAL_STREAM', '').partition(':')
    if not (dev.isdigit() and ino.isdigit()):
        return False
    try:
        st = os.fstat(fd)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


def setup_logging(debug, handler=None, environ=os.environ):
    """The node's log: to ``handler`` (--log_file) or stderr, with time
    stamps; on a stderr that is the journal, with syslog priorities."""
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
        if stderr_is_journal(environ):
            handler.setFormatter(JournalFormatter('dispynode %(levelname)s %(message)s'))
    if handler.formatter is None:
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    return handler


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] and argv[0] in CONTROL_CLI:
        return control_main(argv[0], argv[1:])
    parser = build_parser()
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument('--config', default='')
    known, _ = pre.parse_known_args(argv)
    lists = {}
    try:
        if known.config:
            lists = apply_config_file(parser, known.config)
    except ValueError as exc:
        parser.exit(2, 'dispynode: error: %s\n' % exc)
    args = parser.parse_args(argv)
    for dest, value in lists.items():
        if getattr(args, dest) is None:
            setattr(args, dest, value)
    if args.save_config:
        try:
            save_config_file(args, args.save_config)
        except ValueError as exc:
            parser.exit(2, 'dispynode: error: %s\n' % exc)
        return 0
    fd_note = _raise_fd_limit()
    log_handler = None
    if args.log_file:
        try:
            log_handler = ReopenableFileHandler(os.path.abspath(args.log_file))
        except OSError as exc:
            parser.exit(2, 'dispynode: error: --log_file %s: %s\n' % (
                args.log_file, exc.strerror or exc))
    setup_logging(args.debug, log_handler)
    if fd_note:
        logger.warning('%s', fd_note)
    try:
        node = Node(resolve_config(args))
    except (ValueError, OSError) as exc:
        parser.exit(2, 'dispynode: error: %s\n' % exc)
    # Signal handlers only queue the signal and wake the main loop through
    # a pipe, which acts on it (no logging or locks inside a handler: an
    # Event's lock could be the one the main thread holds).  The one
    # exception is a second SIGINT/SIGTERM while the first one's shutdown
    # runs: it exits at once, as it always has.
    signals = collections.deque(maxlen=64)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    stopping = []

    def on_signal(signum, frame):
        if signum != signal.SIGHUP:
            if stopping:
                os.write(2, b'dispynode: second signal: exiting now\n')
                os._exit(1)
            stopping.append(signum)
        signals.append(signum)
        try:
            os.write(wake_w, b'.')
        except OSError:
            pass        # full: the main loop is awake anyway

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, on_signal)
    node.start()
    if Console.wanted(node.config):
        Console(node).start()
    stop = False
    while not stop and not node.quit.is_set():
        try:
            if _select.select([wake_r], [], [], 0.25)[0]:
                os.read(wake_r, 4096)
        except InterruptedError:
            pass
        while signals:
            signum = signals.popleft()
            if signum == signal.SIGHUP:
                if log_handler is None:
                    logger.info('SIGHUP: no --log_file to reopen; serving on')
                else:
                    try:
                        log_handler.reopen()
                    except OSError as exc:
                        logger.error('SIGHUP: could not reopen --log_file %s: %s; logging '
                                     'to the old file', log_handler.baseFilename, exc)
                    else:
                        logger.info('SIGHUP: log file %s reopened', log_handler.baseFilename)
            else:
                logger.info('signal %d: shutting down', signum)
                stop = True
    node.close()
    return 0


LOG_FORMAT = '%(asctime)s dispynode %(levelname)s %(message)s'


class ReopenableFileHandler(logging.FileHandler):
    """A log file that ``reopen`` (on SIGHUP) opens again by its name, so
    that logrotate can move the old one away.  The new file is opened
    before the old one is closed: a failure keeps the old one."""

    def __init__(self, path):
        super().__init__(path, mode='a', encoding='utf-8', delay=False)

    def reopen(self):
        stream = open(self.baseFilename, 'a', encoding='utf-8')
        self.acquire()
        try:
            old, self.stream = self.stream, stream
        finally:
            self.release()
        if old is not None:
            old.close()


if __name__ == '__main__':
    sys.exit(main())
