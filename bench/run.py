#!/usr/bin/env python3
"""Benchmark: our dispynode against the original dispynode 4.5.5.

    python3 bench/run.py [--rounds N] [--quick] [--only ours|original]
                         [--profile] [--profile-tool auto|py-spy|cprofile]
                         [--files-only] [--no-big] [--xfer-repeat N] [--old-file]
                         [--alt-python auto|none|PYTHON]

Both nodes are driven by the same real legacy client (dispy 4.5.5 on Python
3.6, from the cached venv of tests/legacy.py), alternating A/B within each
round (the first node of a round alternates too).  Everything runs in a
private network namespace with only loopback (plus a route that sends the
legacy client's 255.255.255.255 broadcast to lo), so no traffic leaves the
machine; this needs root (or DISPYBENCH_NO_NETNS=1 to run on the host
loopback knowingly).  Every client run is bounded: a run that doesn't finish
in time is a failed round, reported as such.

Measurements (definitions in bench/README.md), per node and round:
  tiny-job throughput and node CPU per job (-c 2 and -c 1), round-trip
  latency, job-start latency (1 job vs the last of 20 queued), 200 MB and
  (unless --quick or --no-big) 2 GB file transfers both ways as a user waits for them
  (submit -> file on the node's disk; dispy_send_file -> client has it;
  MB/s, node CPU, peak RSS) beside a plain loopback copy measured in the
  same round (the ceiling), idle RSS, process-tree
  memory while 2 jobs share 100 MB of setup data, and RSS growth over
  5,000 jobs (first round only unless --leak-rounds).

Our node also runs the tiny-job and latency runs on a second interpreter
(--alt-python; by default the newest pyenv CPython 3.13), and
bench/jobcost.py breaks a tiny job's CPU in our worker down (fork and exit
of the worker's image, faults, a perf profile in the first round).

The table of medians and ratios (ours / original) goes to stdout,
bench/results/<timestamp>.md (+ .json with the raw values) and
bench/LATEST.md; a PNG chart is written too if matplotlib is importable.
--profile adds one tiny-job run of our node under py-spy (all threads and
the worker process) or, failing that, a thread-aware cProfile wrapper, and
prints where the node's time goes.
"""

import argparse
import ctypes
import hashlib
import json
import math
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
CLIENTS = BENCH / 'clients'
RESULTS = BENCH / 'results'
sys.path.insert(0, str(REPO / 'tests'))

import jobcost  # noqa: E402  (bench/, this script's directory)
import legacy  # noqa: E402
from legacy import LegacyUnavailable, Node, ensure_legacy_venv, free_port  # noqa: E402

CLONE_NEWNET = 0x40000000
CLK_TCK = os.sysconf('SC_CLK_TCK')
IMPLS = ('original', 'ours')
ALT = 'ours-alt'     # our node on the second interpreter (--alt-python)
JOBCOST_TIMEOUT = 600   # bench/jobcost.py, perf profile included


def log(msg):
    sys.stderr.write('[%s] %s\n' % (time.strftime('%H:%M:%S'), msg))
    sys.stderr.flush()


# ---------------------------------------------------------------- isolation

def isolate_network():
    """Move this process into a new network namespace with only lo (the
    approach of tests/conftest.py). Returns a description."""
    if os.environ.get('DISPYTEST_ISOLATED') == '1':
        return 'inherited isolated network namespace'
    if os.environ.get('DISPYBENCH_NO_NETNS') == '1':
        return 'HOST NETWORK (DISPYBENCH_NO_NETNS=1): the legacy client broadcasts'
    if not sys.platform.startswith('linux') or os.geteuid() != 0:
        sys.exit('bench: needs root on Linux to run in a private network namespace '
                 '(the legacy client broadcasts to 255.255.255.255); set '
                 'DISPYBENCH_NO_NETNS=1 to run on the host network anyway')
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNET) != 0:
        sys.exit('bench: unshare(CLONE_NEWNET) failed: %s' % os.strerror(ctypes.get_errno()))
    # The broadcast route names src 127.0.0.1 (as tests/conftest.py does since
    # cae8eac): without it broadcasts leave with source address 0.0.0.0, and
    # our node may answer the legacy client's PING with scheduler_ip_addr
    # 0.0.0.0, then refuse every job of that computation ("invalid
    # computation"): a hang that only exists in such a namespace.
    for cmd in (['ip', 'link', 'set', 'lo', 'up'],
                ['ip', 'route', 'add', 'broadcast', '255.255.255.255', 'dev', 'lo',
                 'table', 'local', 'src', '127.0.0.1']):
        r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=30)
        if r.returncode != 0:
            sys.exit('bench: in the new network namespace, %r failed: %s'
                     % (' '.join(cmd), r.stdout.decode(errors='replace')))
    os.environ['DISPYTEST_ISOLATED'] = '1'
    return 'private network namespace (lo only, broadcast routed to lo, src 127.0.0.1)'


# ---------------------------------------------------------------- /proc

def _stat_fields(pid):
    with open('/proc/%d/stat' % pid, 'rb') as fh:
        data = fh.read()
    return data[data.rfind(b')') + 2:].split()


def children_map():
    children = {}
    for entry in os.listdir('/proc'):
        if not entry.isdigit():
            continue
        try:
            ppid = int(_stat_fields(int(entry))[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    return children


def descendants(pid):
    children = children_map()
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), ()):
            found.append(child)
            todo.append(child)
    return found


def cpu_ticks(pid):
    """utime+stime+cutime+cstime of pid (fields 14-17 of /proc/pid/stat)."""
    f = _stat_fields(pid)
    return sum(int(x) for x in f[11:15])


def own_cpu_seconds(pid):
    """utime+stime of pid alone (no children)."""
    f = _stat_fields(pid)
    return (int(f[11]) + int(f[12])) / CLK_TCK


def tree_cpu_seconds(pid):
    """CPU seconds of pid and its reaped children, plus those of descendants
    still present (alive or zombie; normally none once the run is over).
    Returns (seconds, number of descendants still present)."""
    ticks = cpu_ticks(pid)
    rest = descendants(pid)
    for d in rest:
        try:
            ticks += cpu_ticks(d)
        except (OSError, IndexError, ValueError):
            pass
    return ticks / CLK_TCK, len(rest)


def wait_reaped(pid, timeout, allowed=0):
    """Wait until pid has at most ``allowed`` descendants (its workers/job
    processes exited and were reaped; our node keeps one idle spare worker
    started, so it settles at 1). Returns True if so."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(descendants(pid)) <= allowed:
            return True
        time.sleep(0.05)
    return len(descendants(pid)) <= allowed


def status_kb(pid, key):
    try:
        with open('/proc/%d/status' % pid) as fh:
            for line in fh:
                if line.startswith(key + ':'):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def smaps_kb(pid):
    """(Rss, Pss) in kB from /proc/pid/smaps_rollup (VmRSS twice if missing)."""
    try:
        rss = pss = None
        with open('/proc/%d/smaps_rollup' % pid) as fh:
            for line in fh:
                if line.startswith('Rss:'):
                    rss = int(line.split()[1])
                elif line.startswith('Pss:'):
                    pss = int(line.split()[1])
        if rss is not None:
            return rss, pss if pss is not None else rss
    except OSError:
        pass
    v = status_kb(pid, 'VmRSS') or 0
    return v, v


def tree_mem_kb(pid):
    node_rss, _ = smaps_kb(pid)
    rss_sum = pss_sum = 0
    pids = [pid] + descendants(pid)
    for p in pids:
        rss, pss = smaps_kb(p)
        rss_sum += rss
        pss_sum += pss
    return {'node_rss': node_rss, 'tree_rss': rss_sum, 'tree_pss': pss_sum, 'procs': len(pids)}


class Sampler:
    """Calls fn() (a dict of numbers) every interval seconds in a thread and
    keeps the maximum of each key."""

    def __init__(self, fn, interval):
        self.fn, self.interval = fn, interval
        self.peak = {}
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            try:
                vals = self.fn()
            except Exception:
                vals = None
            if vals:
                self.samples += 1
                for k, v in vals.items():
                    if v is not None and v > self.peak.get(k, -1):
                        self.peak[k] = v
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(5)
        return False


def loadavg():
    try:
        with open('/proc/loadavg') as fh:
            return ' '.join(fh.read().split()[:3])
    except OSError:
        return '?'


# ---------------------------------------------------------------- runs

class Fail:
    """A failed measurement (hang, error)."""

    def __init__(self, why):
        self.why = why

    def __repr__(self):
        return 'Fail(%r)' % self.why


class Bench:
    def __init__(self, opts, tmp):
        self.o = opts
        self.tmp = tmp
        self.values = {}     # metric -> impl -> [value | Fail]
        self.failures = []   # (round, impl, what, why)
        self.notes = []
        self.nodes = []
        self.client_cwd = tmp / 'client-cwd'
        self.client_cwd.mkdir()
        self.node_count = 0
        # run a snapshot of our node, so that edits to the shared working tree
        # during the run can't mix versions
        snap = tmp / 'ours'
        snap.mkdir()
        self.ours_sha = {}
        for name in ('dispynode.py', 'dispy_common.py'):
            shutil.copy2(str(REPO / name), str(snap / name))
            self.ours_sha[name] = hashlib.sha1((snap / name).read_bytes()).hexdigest()[:12]
        self.ours_script = snap / 'dispynode.py'
        # Node.start runs [python, REPO/dispynode.py, options...]: a launcher
        # that drops the second word and runs the snapshot instead
        self.ours_python = self.ours_interpreter(opts.ours_python)
        # Like the original (python -m dispy.dispynode), ours runs from cached
        # bytecode, as the console script of `pip install .` does; compile it
        # now.  The script form (python3 dispynode.py, compiled at every start)
        # is measured separately for idle RSS.
        subprocess.run([self.ours_python, '-m', 'compileall', '-q', str(snap)], check=True)
        self.ours_version = python_version(self.ours_python)
        self.ours_launcher = self.snapshot_launcher('python-ours', self.ours_python)
        self.ours_script_launcher = self.launcher('python-ours-script', [
            self.ours_python, str(self.ours_script)])
        # the same snapshot on a second interpreter (--alt-python), for the
        # tiny-job runs only
        self.alt_python = self.alt_version = None
        if opts.alt_python:
            try:
                self.alt_python = self.ours_interpreter('venv', opts.alt_python, 'venv-alt')
                self.alt_version = python_version(self.alt_python)
                subprocess.run([self.alt_python, '-m', 'compileall', '-q', str(snap)],
                               check=True, timeout=120)
            except (OSError, subprocess.SubprocessError) as exc:
                self.notes.append('--alt-python %s unusable, skipped: %s' % (
                    opts.alt_python, exc))
                self.alt_python = None
            else:
                self.alt_launcher = self.snapshot_launcher('python-ours-alt', self.alt_python)
        self.jobcost = {}       # interpreter label -> [result dicts of bench/jobcost.py]

    def ours_interpreter(self, choice, base=None, name='venv-ours'):
        """The interpreter our node runs on.  By default a plain venv of this
        CPython (no pip, no site packages), just as the original runs from
        its venv: the base interpreter here processes a site-packages .pth
        that imports certifi, zipfile and more into every process (+5 MB of
        RSS), which is this machine's, not the node's."""
        if choice == 'system':
            return sys.executable
        if choice != 'venv':
            return choice
        venv = self.tmp / name
        subprocess.run([base or sys.executable, '-m', 'venv', '--without-pip', str(venv)],
                       check=True)
        return str(venv / 'bin' / 'python')

    def snapshot_launcher(self, name, python):
        """A launcher running the snapshot of our node from its cached
        bytecode, on ``python``."""
        return self.launcher(name, [
            python, '-c', 'import sys; sys.path.insert(0, %r); import dispynode; '
            'sys.exit(dispynode.main())' % str(self.ours_script.parent)])

    def launcher(self, name, words):
        path = self.tmp / name
        path.write_text('#!/bin/sh\nshift\nexec %s "$@"\n' % ' '.join(
            shlex.quote(w) for w in words))
        path.chmod(0o755)
        return path

    # -- bookkeeping
    def put(self, metric, impl, value):
        self.values.setdefault(metric, {}).setdefault(impl, []).append(value)

    def fail(self, rnd, impl, what, why, metrics, node=None):
        why = ' '.join(str(why).split())
        if len(why) > 600:   # keep both ends (a traceback's last line says most)
            why = why[:250] + ' ... ' + why[-350:]
        if node is not None:
            why += '; ' + self.keep_log(node, rnd, what)
        self.failures.append((rnd, impl, what, why))
        log('FAILED %s %s round %d: %s' % (impl, what, rnd + 1, why))
        for m in metrics:
            self.put(m, impl, Fail(why))

    # -- nodes
    def start_node(self, impl, args=(), launcher=None):
        self.node_count += 1
        prefix = self.tmp / ('node%d-%s' % (self.node_count, impl)) / 'prefix'
        if impl == 'ours':
            launcher = launcher or self.ours_launcher
        node = Node.start(impl=impl, prefix=prefix, args=list(args), debug=False,
                          python=str(launcher) if launcher else None)
        self.nodes.append(node)
        try:
            node.wait_ready(timeout=30)
        except AssertionError as exc:
            self.stop_node(node)
            raise RuntimeError('%s node did not start: %s' % (impl, str(exc)[-1500:]))
        return node

    def keep_log(self, node, rnd, what):
        """Copy the node's log (it is deleted with the node) for a failed run."""
        if self.o.no_write:
            return 'node log not kept (--no-write)'
        logs = RESULTS / 'logs'
        logs.mkdir(parents=True, exist_ok=True)
        name = '%s-r%d-%s-%s.log' % (self.stamp, rnd + 1, node.impl,
                                     ''.join(c if c.isalnum() else '_' for c in what)[:40])
        try:
            shutil.copyfile(str(node.log_path), str(logs / name))
            with open(str(logs / name), 'a') as fh:
                fh.write('\n\n======== legacy client output ========\n%s\n'
                         % getattr(self, 'last_client_output', '?'))
        except OSError as exc:
            return 'node log not kept: %s' % exc
        return 'node %s, node log + client output in bench/results/logs/%s' % (
            'alive' if node.alive() else 'exited %s' % node.proc.returncode, name)

    def stop_node(self, node):
        try:
            node.stop(timeout=10)
        finally:
            if node in self.nodes:
                self.nodes.remove(node)
            shutil.rmtree(str(node.prefix.parent), ignore_errors=True)

    def stop_all(self):
        for node in list(self.nodes):
            try:
                self.stop_node(node)
            except Exception as exc:
                log('stopping %r: %r' % (node, exc))

    # -- clients
    def client(self, name, node, *args, timeout=180):
        """Run bench/clients/<name>.py against node; (data, None) or (None, why)."""
        env = {'DISPYBENCH_WATCHDOG': str(max(5, timeout - 10))}
        try:
            r = legacy.run_client(CLIENTS / (name + '.py'), node.port, free_port(), *args,
                                  timeout=timeout, cwd=str(self.client_cwd), env=env)
        except AssertionError as exc:   # run_client's timeout
            self.last_client_output = str(exc)
            return None, 'hang: client killed after %ss (%s)' % (
                timeout, str(exc).splitlines()[0][:200])
        self.last_client_output = r.describe()
        data = r.data
        if data is None:
            return None, 'client exited %s without a result: %s' % (
                r.returncode, (r.stderr or r.stdout)[-600:])
        if data.get('error'):
            prefix = 'hang: ' if data.get('hang') else ''
            return data, prefix + str(data['error'])
        return data, None

    # -- measurements
    def tiny(self, rnd, impl, node, jobs, tag):
        """Throughput and node CPU per job; returns False if the node may be stuck."""
        # Settled: no job or worker left, at most our idle spare worker (whose
        # CPU so far is in cpu0; the run's replacement spare is in cpu1).
        if not wait_reaped(node.pid, 10, allowed=1):
            self.notes.append('%s round %d %s: node had live children before the run'
                              % (impl, rnd + 1, tag))
        idle = len(descendants(node.pid))
        cpu0, _ = tree_cpu_seconds(node.pid)
        own0 = own_cpu_seconds(node.pid)
        wait = self.o.tiny_wait
        data, why = self.client('tiny', node, 'jobs=%d' % jobs, 'wait=%s' % wait,
                                timeout=int(wait + 90))
        metrics = ['tput_' + tag, 'cpu_' + tag, 'cpuself_' + tag, 'cpukids_' + tag,
                   'first_' + tag]
        if why:
            self.fail(rnd, impl, 'tiny %d jobs (%s)' % (jobs, tag), why, metrics, node)
            return False
        reaped = wait_reaped(node.pid, 15, allowed=idle)
        cpu1, left = tree_cpu_seconds(node.pid)
        own1 = own_cpu_seconds(node.pid)
        if not reaped:
            self.notes.append('%s round %d %s: %d descendants (idle before: %d) still there '
                              '15 s after close (their CPU was added)'
                              % (impl, rnd + 1, tag, left, idle))
        total_jobs = data['jobs'] + data['warmup']
        self.put('tput_' + tag, impl, data['throughput'])
        self.put('cpu_' + tag, impl, (cpu1 - cpu0) / total_jobs * 1000.0)
        self.put('first_' + tag, impl, data['setup_s'] * 1000.0)
        self.put('cpuself_' + tag, impl, (own1 - own0) / total_jobs * 1000.0)
        self.put('cpukids_' + tag, impl, ((cpu1 - cpu0) - (own1 - own0)) / total_jobs * 1000.0)
        log('  %s tiny %s: %.1f jobs/s, %.3f ms CPU/job (setup %.2fs)' % (
            impl, tag, data['throughput'], (cpu1 - cpu0) / total_jobs * 1000.0,
            data['setup_s']))
        return True

    def latency(self, rnd, impl, node):
        data, why = self.client('latency', node, 'n=%d' % self.o.lat_n, timeout=150)
        if why:
            self.fail(rnd, impl, 'latency', why, ['lat_med', 'lat_p95'], node)
            return False
        s = sorted(data['samples_ms'])
        self.put('lat_med', impl, statistics.median(s))
        self.put('lat_p95', impl, percentile(s, 95))
        log('  %s latency: median %.2f ms, p95 %.2f ms' % (
            impl, statistics.median(s), percentile(s, 95)))
        return True

    def startlat(self, rnd, impl, node):
        data, why = self.client('startlat', node, 'reps=%d' % self.o.start_reps,
                                'bursts=%d' % self.o.bursts, 'burst=20', timeout=150)
        if why:
            self.fail(rnd, impl, 'job-start latency', why, ['start_1', 'start_20'], node)
            return False
        self.put('start_1', impl, statistics.median(data['single_ms']))
        self.put('start_20', impl, statistics.median(data['burst_ms']))
        log('  %s start latency: 1 job %.2f ms, last of 20 %.2f ms' % (
            impl, statistics.median(data['single_ms']), statistics.median(data['burst_ms'])))
        return True

    def memory(self, rnd, impl, node):
        with Sampler(lambda: tree_mem_kb(node.pid), 0.05) as s:
            data, why = self.client('memory', node, 'mb=100', 'jobs=2', 'sleep=2.0',
                                    timeout=150)
        metrics = ['mem_pss', 'mem_rss', 'mem_node']
        if why:
            self.fail(rnd, impl, 'memory (2 jobs, 100 MB setup)', why, metrics, node)
            return False
        if data.get('overlap_s', 0) <= 0:
            self.notes.append('%s round %d memory: the 2 jobs did not overlap (%.2fs)'
                              % (impl, rnd + 1, data.get('overlap_s', 0)))
        self.put('mem_pss', impl, s.peak['tree_pss'] / 1024.0)
        self.put('mem_rss', impl, s.peak['tree_rss'] / 1024.0)
        self.put('mem_node', impl, s.peak['node_rss'] / 1024.0)
        log('  %s memory: tree PSS %.1f MB, tree RSS %.1f MB, node RSS %.1f MB, %d procs, '
            '%d samples' % (impl, s.peak['tree_pss'] / 1024.0, s.peak['tree_rss'] / 1024.0,
                            s.peak['node_rss'] / 1024.0, s.peak['procs'], s.samples))
        return True

    def file(self, rnd, impl, node):
        """The former measurement (JobCluster() to first result), kept to show
        why it disagreed with the issue's harness (see bench/README.md)."""
        with Sampler(lambda: {'rss': status_kb(node.pid, 'VmRSS')}, 0.02) as s:
            data, why = self.client('file', node, str(self.bigfile), 'wait=180', timeout=240)
        metrics = ['file_mbs', 'file_rss']
        if why:
            self.fail(rnd, impl, 'file transfer', why, metrics, node)
            return False
        self.put('file_mbs', impl, data['mb_per_s'])
        self.put('file_rss', impl, s.peak['rss'] / 1024.0)
        log('  %s file: %.1f MB/s, node peak RSS %.1f MB (HWM %s kB)' % (
            impl, data['mb_per_s'], s.peak['rss'] / 1024.0, status_kb(node.pid, 'VmHWM')))
        return True

    def xfer(self, rnd, impl, node, mode, path, key):
        """One direction of a file transfer (bench/clients/xfer.py): MB/s,
        node CPU (node + descendants) and peak RSS (node process; for
        'out' also the job process that sends, by its own VmHWM)."""
        size_mb = os.path.getsize(str(path)) / 1048576.0
        reps = self.o.xfer_repeat
        paths = []
        for i in range(reps):      # distinct names: the node must not have it yet
            link = self.tmp / ('%s-%s-%d-%s' % (impl, key, i, path.name))
            if not link.exists():
                os.link(str(path), str(link))
            paths.append(str(link))
        with Sampler(lambda: {'rss': status_kb(node.pid, 'VmRSS')}, 0.02) as s:
            data, why = self.client('xfer', node, str(node.pid), ','.join(paths),
                                    'mode=' + mode, 'wait=%d' % (60 + size_mb / 20),
                                    timeout=int(120 + reps * (size_mb / 10 + 2)))
        metrics = [key + '_mbs', key + '_cpu', key + '_rss']
        if why:
            self.fail(rnd, impl, 'file %s (%s)' % (mode, key), why, metrics, node)
            return False
        rss = s.peak.get('rss', 0) / 1024.0
        if mode == 'out':
            rss = max(rss, data.get('job_hwm_kb', 0) / 1024.0)
        self.put(key + '_mbs', impl, data['mb_per_s'])
        self.put(key + '_cpu', impl, data['cpu_s'])
        self.put(key + '_rss', impl, rss)
        log('  %s %s: %.0f MB/s, node CPU %.3f s, peak RSS %.1f MB (median of %d: %s MB/s)'
            % (impl, key, data['mb_per_s'], data['cpu_s'], rss, len(data['runs']),
               ', '.join('%.0f' % r['mb_per_s'] for r in data['runs'])))
        return True

    def leak(self, rnd, impl, node):
        data, why = self.client('leak', node, str(node.pid), 'warmup=%d' % self.o.leak_warmup,
                                'jobs=%d' % self.o.leak_jobs, 'stall=30',
                                timeout=self.o.leak_timeout)
        metrics = ['leak_node', 'leak_tree']
        if why:
            snaps = (data or {}).get('snapshots') or []
            self.fail(rnd, impl, 'leak check (%d jobs)' % self.o.leak_jobs,
                      '%s; snapshots %s' % (why, snaps), metrics, node)
            return False
        snaps = {s['after']: s for s in data['snapshots']}
        w, a = snaps['warmup'], snaps['all']
        time.sleep(0.5)
        after_close = status_kb(node.pid, 'VmRSS')
        self.put('leak_node', impl, a['node_rss_kb'] - w['node_rss_kb'])
        self.put('leak_tree', impl, a['tree_rss_kb'] - w['tree_rss_kb'])
        self.leak_detail.setdefault(impl, []).append(
            'node RSS kB after warm-up %d / half %d / all %d / after close %s; tree RSS kB '
            '%d / %d / %d' % (w['node_rss_kb'], snaps['half']['node_rss_kb'], a['node_rss_kb'],
                              after_close, w['tree_rss_kb'], snaps['half']['tree_rss_kb'],
                              a['tree_rss_kb']))
        log('  %s leak: %s' % (impl, self.leak_detail[impl][-1]))
        return True

    # -- rounds
    def round(self, rnd, impl):
        o = self.o
        log('round %d/%d: %s (load %s)' % (rnd + 1, o.rounds, impl, loadavg()))
        if not o.files_only:
            self.round_jobs(rnd, impl)
        # node B: file transfers, no size limit
        node = self.start_node(impl, ['-c', '2', '--max_file_size', '0'])
        try:
            steps = [lambda n: self.xfer(rnd, impl, n, 'in', self.bigfile, 'fin'),
                     lambda n: self.xfer(rnd, impl, n, 'out', self.bigfile, 'fout')]
            if o.big:
                steps += [lambda n: self.xfer(rnd, impl, n, 'in', self.hugefile, 'fin2g'),
                          lambda n: self.xfer(rnd, impl, n, 'out', self.hugefile, 'fout2g')]
            if o.old_file:
                steps.append(lambda n: self.file(rnd, impl, n))
            for step in steps:
                if not step(node):
                    self.stop_node(node)
                    node = self.start_node(impl, ['-c', '2', '--max_file_size', '0'])
        finally:
            self.stop_node(node)
        if o.files_only:
            return
        # node C: one CPU
        node = self.start_node(impl, ['-c', '1'])
        try:
            self.tiny(rnd, impl, node, o.tiny_jobs, 'c1')
        finally:
            self.stop_node(node)
        # node D: leak check (first rounds only)
        if rnd < o.leak_rounds:
            node = self.start_node(impl, ['-c', '2'])
            try:
                self.leak(rnd, impl, node)
            finally:
                self.stop_node(node)

    def round_jobs(self, rnd, impl):
        o = self.o
        # node A (-c 2): idle RSS, tiny, latency, start latency, memory
        if impl == 'ours':
            script_node = self.start_node(impl, ['-c', '2'], self.ours_script_launcher)
            time.sleep(1.0)
            self.put('idle_rss_script', impl, status_kb(script_node.pid, 'VmRSS') / 1024.0)
            self.stop_node(script_node)
        node = self.start_node(impl, ['-c', '2'])
        try:
            time.sleep(1.0)
            self.put('idle_rss', impl, status_kb(node.pid, 'VmRSS') / 1024.0)
            steps = [lambda n: self.tiny(rnd, impl, n, o.tiny_jobs, 'c2'),
                     lambda n: self.latency(rnd, impl, n),
                     lambda n: self.startlat(rnd, impl, n),
                     lambda n: self.memory(rnd, impl, n)]
            for step in steps:
                if not step(node):      # the node may be stuck: use a fresh one
                    self.stop_node(node)
                    node = self.start_node(impl, ['-c', '2'])
        finally:
            self.stop_node(node)

    def round_alt(self, rnd):
        """Our node on the second interpreter: the tiny-job runs and latency."""
        o = self.o
        log('round %d/%d: ours on Python %s (load %s)' % (rnd + 1, o.rounds, self.alt_version,
                                                        loadavg()))
        for cpus, tag in (('2', 'c2'), ('1', 'c1')):
            node = self.start_node('ours', ['-c', cpus], self.alt_launcher)
            node.impl = ALT         # its logs, if kept, are not the main run's
            try:
                if self.tiny(rnd, ALT, node, o.tiny_jobs, tag) and tag == 'c2':
                    self.latency(rnd, ALT, node)
            finally:
                self.stop_node(node)

    def job_cost(self, rnd):
        """bench/jobcost.py on each interpreter of ours: where a tiny job's
        CPU goes in the worker (perf profile in the first round)."""
        pythons = [(self.ours_version, self.ours_python)]
        if self.alt_python:
            pythons.append((self.alt_version, self.alt_python))
        for version, python in pythons:
            cmd = [python, str(BENCH / 'jobcost.py'), '--repo', str(self.ours_script.parent),
                   '--python', python, '--jobs', '1000' if self.o.quick else '3000']
            if rnd == 0:
                cmd.append('--perf')
            what = 'jobcost on Python %s' % version
            # its own session, so that a timeout ends perf, the drive and its
            # worker too, not only jobcost.py
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    start_new_session=True)
            try:
                out, err = proc.communicate(timeout=JOBCOST_TIMEOUT)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.communicate()
                self.failures.append((rnd, 'ours', what, 'no result in %d s' % JOBCOST_TIMEOUT))
                continue
            results = []
            for line in out.decode(errors='replace').splitlines():
                try:
                    results.append(json.loads(line))
                except ValueError:
                    pass
            errors = ['%s: %s' % (r.get('what'), r['error']) for r in results if 'error' in r]
            missing = {'floor', 'drive'} - {r.get('what') for r in results if 'error' not in r}
            if proc.returncode or missing or errors:
                why = ('exit status %d; ' % proc.returncode if proc.returncode else '') \
                    + ('no %s result; ' % ', '.join(sorted(missing)) if missing else '') \
                    + '; '.join(errors) + ' ' + err.decode(errors='replace')[-300:]
                self.failures.append((rnd, 'ours', what, ' '.join(why.split())))
            self.jobcost.setdefault(version, []).extend(r for r in results if 'error' not in r
                                                        or r.get('what') == 'perf')
            drive = next((r for r in results if r.get('what') == 'drive' and 'error' not in r),
                         None)
            if drive:
                log('  jobcost %s: worker %.3f + job processes %.3f ms/job' % (
                    version, drive['worker_ms'], drive['jobs_ms']))

    def ceiling(self, rnd):
        """The loopback limit for file transfers, measured in the same round."""
        files = [(self.bigfile, '')] + ([(self.hugefile, '2g')] if self.o.big else [])
        for path, suffix in files:
            for mode in ('f2s', 's2f', 'f2f'):
                try:
                    mbs = loopback_copy(path, self.tmp / 'ceiling.bin', mode)
                except (OSError, RuntimeError) as exc:
                    self.fail(rnd, 'ceiling', 'loopback copy ' + mode, exc,
                              ['ceil_%s%s' % (mode, suffix)])
                    continue
                self.put('ceil_%s%s' % (mode, suffix), 'ceiling', mbs)
                log('  ceiling %s%s: %.0f MB/s' % (mode, suffix, mbs))

    def run(self):
        o = self.o
        self.leak_detail = {}
        self.bigfile = self.tmp / ('big-%dMB.bin' % o.file_mb)
        block = os.urandom(1 << 20)
        with open(str(self.bigfile), 'wb') as fh:
            for _ in range(o.file_mb):
                fh.write(block)
        self.hugefile = None
        if o.big:
            self.hugefile = self.tmp / 'huge-2048MB.bin'
            with open(str(self.hugefile), 'wb') as fh:
                for _ in range(2048):
                    fh.write(block)
        impls = [o.only] if o.only else list(IMPLS)
        self.t0 = time.time()
        self.load_start = loadavg()
        for rnd in range(o.rounds):
            order = impls if rnd % 2 == 0 else impls[::-1]
            self.ceiling(rnd)
            for impl in order:
                try:
                    self.round(rnd, impl)
                except RuntimeError as exc:   # a node that won't start
                    self.failures.append((rnd, impl, 'node start', str(exc)[:400]))
                    log('FAILED %s round %d: %s' % (impl, rnd + 1, exc))
            if 'ours' in impls and not o.files_only:
                self.job_cost(rnd)
                if self.alt_python:
                    try:
                        self.round_alt(rnd)
                    except RuntimeError as exc:
                        self.failures.append((rnd, ALT, 'node start', str(exc)[:400]))
                        log('FAILED %s round %d: %s' % (ALT, rnd + 1, exc))
        self.load_end = loadavg()
        self.elapsed = time.time() - self.t0


# ---------------------------------------------------------------- ceiling

def _write_all(fd, view):
    while view:
        view = view[os.write(fd, view):]


def loopback_copy(src, dst, mode):
    """One plain copy over a loopback TCP connection, timed from connect()
    until the receiving end has everything (and, writing, closed its file).

    mode 'f2s' file -> socket: sock.sendfile() of src, the receiver
    discards; 's2f' socket -> file: the sender sends a reused 1 MiB buffer,
    the receiver recv_into()s a reused 1 MiB buffer and writes it to dst;
    'f2f' both: sendfile() of src, received into dst.  Returns MB/s."""
    import socket
    os.sync()       # no writeback of earlier copies during this one
    size = os.path.getsize(str(src))
    lsock = socket.socket()
    lsock.bind(('127.0.0.1', 0))
    lsock.listen(1)
    err = []

    def send():
        try:
            with socket.create_connection(lsock.getsockname()) as s:
                if mode == 's2f':
                    block = memoryview(bytearray(1 << 20))
                    left = size
                    while left:
                        s.sendall(block[:min(left, len(block))])
                        left -= min(left, len(block))
                else:
                    with open(str(src), 'rb') as fh:
                        s.sendfile(fh)
        except OSError as exc:
            err.append(exc)
    t0 = time.monotonic()
    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    conn, _ = lsock.accept()
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    got = 0
    fd = os.open(str(dst), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600) \
        if mode != 'f2s' else None
    try:
        while got < size:
            n = conn.recv_into(view)
            if not n:
                break
            if fd is not None:
                _write_all(fd, view[:n])
            got += n
    finally:
        if fd is not None:
            os.close(fd)
        conn.close()
        lsock.close()
    elapsed = time.monotonic() - t0
    sender.join(30)
    try:
        os.unlink(str(dst))
    except OSError:
        pass
    if err or got != size:
        raise RuntimeError('loopback copy %s: %d of %d bytes %s' % (mode, got, size, err))
    return size / 1048576.0 / elapsed


def percentile(sorted_vals, p):
    if not sorted_vals:
        return float('nan')
    k = (len(sorted_vals) - 1) * p / 100.0
    lo, hi = int(math.floor(k)), int(math.ceil(k))
    return sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (k - lo)


# ---------------------------------------------------------------- profile

def profile_ours(bench, tool):
    """One tiny-job run of our node under a profiler; returns Markdown lines."""
    o = bench.o
    spy = shutil.which('py-spy')
    if tool == 'auto':
        tool = 'py-spy' if spy else 'cprofile'
    if tool == 'py-spy' and not spy:
        return ['py-spy not found; use --profile-tool cprofile']
    out = bench.tmp / ('profile.%s' % ('txt' if tool == 'py-spy' else 'pstats'))
    if tool == 'cprofile':
        wrapper = bench.launcher('python-cprofile', [
            sys.executable, str(BENCH / 'cprofile_node.py'), str(out), str(bench.ours_script)])
        node = Node.start(impl='ours', prefix=bench.tmp / 'node-profile' / 'prefix',
                          args=['-c', '2'], debug=False, python=str(wrapper))
        bench.nodes.append(node)
        node.wait_ready(30)
    else:
        node = bench.start_node('ours', ['-c', '2'])
    spy_proc = None
    try:
        if tool == 'py-spy':
            spy_proc = subprocess.Popen(
                [spy, 'record', '--pid', str(node.pid), '--subprocesses', '--nonblocking',
                 '--gil', '--rate', '250', '--format', 'raw', '-o', str(out)],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            time.sleep(1.5)
        cpu0, _ = tree_cpu_seconds(node.pid)
        f0 = [int(x) for x in _stat_fields(node.pid)[11:15]]
        last = {}    # descendant pid -> (ppid, [utime, stime, cutime, cstime]) last seen

        def track():
            for p in descendants(node.pid):
                try:
                    f = _stat_fields(p)
                    last[p] = (int(f[1]), [int(x) for x in f[11:15]])
                except (OSError, IndexError, ValueError):
                    pass
            return None
        with Sampler(track, 0.05):
            data, why = bench.client('tiny', node, 'jobs=%d' % o.tiny_jobs,
                                     'wait=%s' % o.tiny_wait, timeout=int(o.tiny_wait + 90))
        wait_reaped(node.pid, 15, allowed=1)
        cpu1, _ = tree_cpu_seconds(node.pid)
        f1 = [int(x) for x in _stat_fields(node.pid)[11:15]]
        split = None
        if not why:
            n = float(data['jobs'] + data['warmup'])
            ms = lambda ticks: ticks * 1000.0 / CLK_TCK / n   # noqa: E731
            workers = [v for pid, (ppid, v) in last.items() if ppid == node.pid]
            w_user = sum(v[0] for v in workers)
            w_sys = sum(v[1] for v in workers)
            kids_user, kids_sys = f1[2] - f0[2], f1[3] - f0[3]
            split = ['', 'Node CPU per job in the profiled run, by process (ms; from /proc '
                     'stat: the node, its worker processes as last seen before they exited '
                     '(%d), and the job processes = reaped children minus the workers):'
                     % len(workers), '',
                     '| process | user | sys | total |', '|---|---:|---:|---:|']
            for label, u, sy in (('node process', f1[0] - f0[0], f1[1] - f0[1]),
                                 ('worker process', w_user, w_sys),
                                 ('job processes', kids_user - w_user, kids_sys - w_sys)):
                split.append('| %s | %.3f | %.3f | %.3f |' % (label, ms(u), ms(sy), ms(u + sy)))
        head = ['Profiled run (%s): %s' % (tool, why or '%.1f jobs/s, %.3f ms node CPU per job '
                                           '(slowed down by the profiler)' % (
                                               data['throughput'],
                                               (cpu1 - cpu0) * 1000.0 /
                                               (data['jobs'] + data['warmup'])))]
        if tool == 'py-spy':
            spy_proc.send_signal(signal.SIGINT)
            try:
                spy_out = spy_proc.communicate(timeout=30)[0].decode(errors='replace')
            except subprocess.TimeoutExpired:
                spy_proc.kill()
                spy_out = spy_proc.communicate()[0].decode(errors='replace')
            spy_proc = None
            bench.stop_node(node)
            node = None
            head += split or []
            if not out.exists():
                return head + ['py-spy wrote no profile: %s' % spy_out[-1000:]]
            return head + pyspy_report(out, o.profile_top)
        bench.stop_node(node)      # SIGINT: the wrapper dumps the stats on exit
        node = None
        head += split or []
        if not out.exists():
            return head + ['cProfile wrote no stats']
        return head + cprofile_report(out, o.profile_top)
    finally:
        if spy_proc is not None:
            spy_proc.kill()
            spy_proc.wait()
        if node is not None:
            bench.stop_node(node)


def _frame_name(frame):
    # "func (path/file.py:123)" -> "func (file.py)"
    name, _, loc = frame.partition(' (')
    loc = loc.rstrip(')')
    path = loc.rsplit(':', 1)[0]
    return '%s (%s)' % (name, os.path.basename(path)) if loc else name


def pyspy_report(path, top):
    """Top functions (self and inclusive samples) per process role from py-spy's
    raw (collapsed) output."""
    roles = {}
    for line in path.read_text(errors='replace').splitlines():
        stack, _, count = line.rpartition(' ')
        if not stack or not count.isdigit():
            continue
        count = int(count)
        frames = stack.split(';')
        procs = [i for i, f in enumerate(frames) if f.startswith('process ')]
        # py-spy nests the process frames by parentage: node; worker; job.
        # (The command line can't tell: py-spy may read it between fork and exec.)
        role = ('node', 'worker', 'job')[min(max(len(procs), 1), 3) - 1]
        py = frames[procs[-1] + 1:] if procs else frames
        py = [f for f in py if not f.startswith('thread ')]
        r = roles.setdefault(role, {'total': 0, 'self': {}, 'incl': {}, 'threads': {}})
        r['total'] += count
        if not py:
            continue
        names = [_frame_name(f) for f in py]
        r['self'][names[-1]] = r['self'].get(names[-1], 0) + count
        for n in set(names):
            r['incl'][n] = r['incl'].get(n, 0) + count
        # which thread function: the frame after threading's bootstrap/run
        tname = 'main'
        for n in names:
            if not n.endswith('(threading.py)'):
                tname = n if names[0].endswith('(threading.py)') else 'main: ' + names[0]
                break
        r['threads'][tname] = r['threads'].get(tname, 0) + count
    lines = ['', 'py-spy --gil samples at 250 Hz (only the thread holding the GIL, i.e. '
             'Python code and C calls made with the GIL held, not threads blocked in I/O), '
             'for the node, its worker and any job process caught:']
    for role in ('node', 'worker', 'job'):
        r = roles.get(role)
        if not r:
            continue
        tot = r['total']
        lines.append('')
        lines.append('**%s process**: %d samples (%.1f s of GIL-holding time)' % (
            role, tot, tot / 250.0))
        lines.append('')
        lines.append('| self % | function | | incl. % | function |')
        lines.append('|---:|---|---|---:|---|')
        selfs = sorted(r['self'].items(), key=lambda kv: -kv[1])[:top]
        incls = sorted(r['incl'].items(), key=lambda kv: -kv[1])[:top]
        for i in range(max(len(selfs), len(incls))):
            s = selfs[i] if i < len(selfs) else ('', 0)
            n = incls[i] if i < len(incls) else ('', 0)
            lines.append('| %s | %s | | %s | %s |' % (
                '%.1f' % (100.0 * s[1] / tot) if s[0] else '', s[0].replace('|', '/'),
                '%.1f' % (100.0 * n[1] / tot) if n[0] else '', n[0].replace('|', '/')))
        threads = sorted(r['threads'].items(), key=lambda kv: -kv[1])[:6]
        lines.append('')
        lines.append('by thread entry: ' + '; '.join('%s %.1f%%' % (t, 100.0 * c / tot)
                                                     for t, c in threads))
    return lines


def cprofile_report(path, top):
    import io
    import pstats
    buf = io.StringIO()
    st = pstats.Stats(str(path), stream=buf)
    st.sort_stats('tottime').print_stats(top)
    st.sort_stats('cumulative').print_stats(top)
    return ['', 'cProfile (node process, all threads that ended before exit):', '',
            '```'] + buf.getvalue().splitlines() + ['```']


# ---------------------------------------------------------------- report

METRICS = [
    # key, label, unit, better, target-ratio kind
    ('tput_c2', 'Tiny-job throughput, -c 2 (1,000 x `n*n`)', 'jobs/s', 'higher'),
    ('cpu_c2', 'Node CPU per job, -c 2 (node + reaped children)', 'ms', 'lower'),
    ('cpuself_c2', '... of which the node process itself', 'ms', 'lower'),
    ('cpukids_c2', '... of which its children (workers, job processes)', 'ms', 'lower'),
    ('tput_c1', 'Tiny-job throughput, -c 1', 'jobs/s', 'higher'),
    ('cpu_c1', 'Node CPU per job, -c 1', 'ms', 'lower'),
    ('lat_med', 'Round-trip latency, median of 100', 'ms', 'lower'),
    ('lat_p95', 'Round-trip latency, p95 of 100', 'ms', 'lower'),
    ('start_1', 'Job-start latency, 1 job', 'ms', 'lower'),
    ('start_20', 'Job-start latency, last of 20 queued', 'ms', 'lower'),
    ('first_c2', 'New computation: JobCluster() to first result (1 tiny job)', 'ms', 'lower'),
    ('fin_mbs', 'File to the node (200 MB job depends): submit to file on disk', 'MB/s',
     'higher'),
    ('fin_cpu', '... node CPU (node + children) for it', 's', 'lower'),
    ('fin_rss', '... node peak RSS', 'MB', 'lower'),
    ('fout_mbs', 'File to the client (200 MB `dispy_send_file`)', 'MB/s', 'higher'),
    ('fout_cpu', '... node CPU (node + children, the job sends) for it', 's', 'lower'),
    ('fout_rss', '... peak RSS (node process; sending job process)', 'MB', 'lower'),
    ('fin2g_mbs', 'File to the node, 2 GB', 'MB/s', 'higher'),
    ('fin2g_cpu', '... node CPU for it', 's', 'lower'),
    ('fin2g_rss', '... node peak RSS', 'MB', 'lower'),
    ('fout2g_mbs', 'File to the client, 2 GB', 'MB/s', 'higher'),
    ('fout2g_cpu', '... node CPU for it', 's', 'lower'),
    ('fout2g_rss', '... peak RSS (node; sending job)', 'MB', 'lower'),
    ('file_mbs', 'Former measure: `JobCluster(depends=[200 MB])` to first result', 'MB/s',
     'higher'),
    ('file_rss', '... node peak RSS', 'MB', 'lower'),
    ('idle_rss', 'Node RSS idle', 'MB', 'lower'),
    ('idle_rss_script', 'Node RSS idle, ours started as `python3 dispynode.py`', 'MB', 'lower'),
    ('mem_pss', 'Tree PSS, 2 jobs on 100 MB setup data', 'MB', 'lower'),
    ('mem_rss', 'Tree RSS sum, same', 'MB', 'lower'),
    ('mem_node', 'Node process RSS, same', 'MB', 'lower'),
    ('leak_node', 'Node RSS growth over the leak run', 'kB', 'lower'),
    ('leak_tree', 'Tree RSS growth over the leak run', 'kB', 'lower'),
]


def med(vals):
    ok = [v for v in vals if not isinstance(v, Fail)]
    return statistics.median(ok) if ok else None


def fmt(v, unit):
    if v is None:
        return 'n/a'
    if unit in ('kB',):
        return '%+d' % round(v)
    if abs(v) >= 100:
        return '%.0f' % v
    if abs(v) >= 10:
        return '%.1f' % v
    return '%.2f' % v if abs(v) >= 1 else '%.3f' % v


def targets(bench):
    """[(target text, met: True/False/None, detail)]"""
    V = bench.values

    def m(key, impl):
        return med(V.get(key, {}).get(impl, []))

    def ratio(key):
        a, b = m(key, 'ours'), m(key, 'original')
        return a / b if a is not None and b not in (None, 0) else None

    out = []

    def add(text, ok, detail):
        out.append((text, ok, detail))

    r = ratio('cpu_c2')
    add('CPU per job (-c 2): ours / original <= 0.35', None if r is None else r <= 0.35,
        'ratio %s' % fmt(r, ''))
    r = ratio('tput_c2')
    add('Throughput (-c 2): ours / original >= 1.5', None if r is None else r >= 1.5,
        'ratio %s' % fmt(r, ''))
    r = ratio('lat_med')
    add('Round-trip latency (median): ours / original <= 0.5',
        None if r is None else r <= 0.5, 'ratio %s' % fmt(r, ''))
    for key, what in (('fin', 'to the node, 200 MB'), ('fout', 'to the client, 200 MB'),
                      ('fin2g', 'to the node, 2 GB'), ('fout2g', 'to the client, 2 GB')):
        if key + '_mbs' not in V:
            continue
        r, c = ratio(key + '_mbs'), ratio(key + '_cpu')
        rss = m(key + '_rss', 'ours')
        ok = None if r is None or c is None or rss is None else (
            r >= 1.5 and c <= 1.0 and rss < 64)
        add('File %s: ours / original >= 1.5 at <= its node CPU, our peak RSS < 64 MB' % what,
            ok, 'throughput ratio %s, CPU ratio %s, our peak RSS %s MB' % (
                fmt(r, ''), fmt(c, ''), fmt(rss, 'MB')))
    a, b = m('idle_rss', 'ours'), m('idle_rss', 'original')
    add("Idle RSS: ours <= original's", None if a is None or b is None else a <= b,
        '%s MB vs %s MB' % (fmt(a, 'MB'), fmt(b, 'MB')))
    a = m('leak_node', 'ours')
    t = m('leak_tree', 'ours')
    add('No RSS growth over the leak run (ours; node growth <= 1 MiB, '
        'tree <= 2 MiB)', None if a is None or t is None else (a <= 1024 and t <= 2048),
        'node %s kB, tree %s kB' % (fmt(a, 'kB'), fmt(t, 'kB')))
    return out


CEILINGS = (('f2s', 'file -> socket (`sendfile`, receiver discards)'),
            ('s2f', 'socket -> file (`recv_into` a 1 MiB buffer + `write`)'),
            ('f2f', 'file -> socket -> file (both of the above)'))


def ceiling_lines(bench):
    """The loopback ceiling and how close each node's transfers come to it."""
    V = bench.values
    L = []
    for suffix, size in (('', '200 MB'), ('2g', '2 GB')):
        if 'ceil_f2f' + suffix not in V:
            continue
        if not L:
            L = ['## Loopback ceiling (same run)', '',
                 'A plain copy over one loopback TCP connection in the bench process '
                 '(Python %s), medians:' % '.'.join(map(str, sys.version_info[:3])), '']
        for mode, label in CEILINGS:
            L.append('- %s, %s: %s MB/s' % (
                label, size, fmt(med(V.get('ceil_%s%s' % (mode, suffix), {}).get(
                    'ceiling', [])), 'MB/s')))
        top = med(V['ceil_f2f' + suffix]['ceiling'])
        for key, what in (('fin', 'to the node'), ('fout', 'to the client')):
            key += suffix
            if key + '_mbs' not in V or not top:
                continue
            parts = []
            for impl in IMPLS:
                v = med(V[key + '_mbs'].get(impl, []))
                if v is not None:
                    parts.append('%s %.0f%%' % (impl, 100.0 * v / top))
            L.append('- file %s, %s, as a share of file -> socket -> file: %s' % (
                what, size, ', '.join(parts)))
    return L


ALT_METRICS = ('tput_c2', 'cpu_c2', 'cpuself_c2', 'cpukids_c2', 'tput_c1', 'cpu_c1', 'lat_med')


def alt_lines(bench):
    """Our node on the second interpreter beside the first (same rounds)."""
    V = bench.values
    if not bench.alt_python or not any(ALT in V.get(k, {}) for k in ALT_METRICS):
        return []
    main = bench.ours_version
    L = ['', '## Our node on Python %s (same run)' % bench.alt_version, '',
         'The same snapshot of our node on a plain venv of Python %s, run right after the '
         'A/B pair in each round (tiny jobs and latency only).' % bench.alt_version, '',
         '| measurement | unit | original | ours, %s | ours, %s | %s / original | %s / %s |'
         % (main, bench.alt_version, bench.alt_version, bench.alt_version, main),
         '|---|---|---:|---:|---:|---:|---:|']
    labels = {key: (label, unit) for key, label, unit, _ in METRICS}
    for key in ALT_METRICS:
        if key not in V:
            continue
        label, unit = labels[key]
        o, a, b = (med(V[key].get(impl, [])) for impl in ('original', 'ours', ALT))
        cells = []
        for impl, v in zip(('original', 'ours', ALT), (o, a, b)):
            vals = V[key].get(impl, [])
            cells.append('%s (%d/%d)' % (fmt(v, unit), sum(
                1 for x in vals if not isinstance(x, Fail)), len(vals)) if vals else '-')
        r1 = '%.2f' % (b / o) if b is not None and o else '-'
        r2 = '%.2f' % (b / a) if b is not None and a else '-'
        L.append('| %s | %s | %s | %s | %s | %s | %s |' % (label, unit, cells[0], cells[1],
                                                          cells[2], r1, r2))
    return L


PERF_CLASSES = jobcost.CLASSES


def jobcost_lines(bench):
    """Where the CPU of a tiny job goes in our worker (bench/jobcost.py)."""
    if not bench.jobcost:
        return []
    L = ['', "## Where a tiny job's CPU goes in our worker (same run)", '',
         '`bench/jobcost.py` on the snapshot, per interpreter, medians over rounds: one '
         'worker driven through its channel with tiny jobs two in flight (no node '
         'process, no client), and the fork + exit alone of a process of the same image '
         '(the worker: the interpreter, `dispynode` and the implicit job modules) and of a '
         'bare interpreter.  Definitions: bench/README.md.', '',
         '| Python | worker, ms/job | job processes, ms/job | total (median of the rounds) | '
         'minor faults/job (worker + jobs) | fork + exit alone, worker image: parent (fork + '
         'reap) + child (faults after the fork + exit) | child faults | the same from a bare '
         'interpreter | worker image anonymous memory |',
         '|---|---:|---:|---:|---:|---:|---:|---:|---:|']

    def m(results, what, key, **match):
        vals = [r[key] for r in results if r.get('what') == what and key in r
                and all(r.get(k) == v for k, v in match.items())]
        return statistics.median(vals) if vals else None
    profiles = []
    for version, results in sorted(bench.jobcost.items()):
        w, j, t = (m(results, 'drive', k) for k in ('worker_ms', 'jobs_ms', 'total_ms'))
        wf, jf = m(results, 'drive', 'worker_faults'), m(results, 'drive', 'job_faults')
        fl, bare = m(results, 'floor', 'total_ms', bare=False), m(results, 'floor', 'total_ms',
                                                                  bare=True)
        flp, flc = m(results, 'floor', 'parent_ms', bare=False), m(results, 'floor', 'child_ms',
                                                                   bare=False)
        anon = m(results, 'floor', 'anon_kb', bare=False)
        flf = m(results, 'floor', 'child_faults', bare=False)
        profiles += [(version, r) for r in results if r.get('what') == 'perf']
        if t is None or fl is None:
            continue
        L.append('| %s | %.3f | %.3f | %.3f | %.0f + %.0f | %.3f (%.3f + %.3f; %.0f%% of the '
                 'total) | %.0f | %s | %.1f MiB |' % (
                     version, w, j, t, wf, jf, fl, flp, flc, 100.0 * fl / t, flf,
                     '%.3f' % bare if bare is not None else '-', anon / 1024.0))
    for version, prof in profiles:
        if 'error' in prof:
            L += ['', 'perf profile on Python %s: not taken (%s)' % (
                version, ' '.join(str(prof['error']).split()))]
            continue
        L += ['', 'perf profile (`perf record -a -g` of the same drive, first round), Python '
              '%s: share of samples by what the call chain was doing:' % version, '',
              '| process | samples | ' + ' | '.join(PERF_CLASSES) + ' |',
              '|---|---:|' + '---:|' * len(PERF_CLASSES)]
        for role in ('worker', 'job processes'):
            cls = prof['classes'].get(role, {})
            L.append('| %s | %d | %s |' % (role, prof['samples'].get(role, 0), ' | '.join(
                '%.0f%%' % cls.get(c, 0.0) for c in PERF_CLASSES)))
    return L


def report(bench, cmdline, netns, profile_lines):
    o = bench.o
    V = bench.values
    try:
        commit = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=str(REPO),
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                timeout=10).stdout.decode().strip()
        dirty = subprocess.run(['git', 'status', '--porcelain', '--', 'dispynode.py',
                                'dispy_common.py'], cwd=str(REPO), stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, timeout=10).stdout.decode().strip()
        commit += ' + uncommitted changes to the node sources' if dirty else ''
    except (OSError, subprocess.SubprocessError):
        commit = '?'
    L = ['# dispynode benchmark: ours vs original dispynode 4.5.5', '',
         '- run: %s, `%s`' % (time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(bench.t0)),
                              cmdline),
         '- rounds: %d%s, A/B alternating; %s; leak run: %d jobs after %d warm-up jobs '
         '(%d round(s)); file %d MB' % (
             o.rounds, ' (quick)' if o.quick else '', 'only ' + o.only if o.only else
             'both nodes', o.leak_jobs, o.leak_warmup, min(o.leak_rounds, o.rounds),
             o.file_mb),
         '- ours: working tree at commit %s, snapshot taken at start (sha1 %s); on Python '
         '%s; original: legacy venv (Python 3.6, dispy 4.5.5, asyncoro 4.3.4); client: '
         'legacy dispy 4.5.5' % (
             commit, ', '.join('%s %s' % kv for kv in sorted(bench.ours_sha.items())),
             '%s (%s)' % (bench.ours_version,
                          'a plain venv' if o.ours_python == 'venv' else o.ours_python)),
         '- machine: %d CPUs; load average %s at start, %s at end; took %.0f s; %s' % (
             os.cpu_count() or 0, bench.load_start, bench.load_end, bench.elapsed, netns),
         '', 'Medians over rounds (successful rounds / rounds in brackets); '
         'ratio = ours / original.', '',
         '| measurement | unit | original | ours | ours / original | better |',
         '|---|---|---:|---:|---:|---|']
    for key, label, unit, better in METRICS:
        if key not in V:
            continue
        cells = []
        meds = {}
        for impl in IMPLS:
            vals = V[key].get(impl)
            if vals is None:
                cells.append('-')
                continue
            meds[impl] = med(vals)
            nok = sum(1 for v in vals if not isinstance(v, Fail))
            cells.append('%s (%d/%d)' % (fmt(meds[impl], unit), nok, len(vals)))
        a, b = meds.get('ours'), meds.get('original')
        if key.startswith('leak_') or a is None or not b:
            ratio = '-'
        else:
            ratio = '%.2f' % (a / b)
        L.append('| %s | %s | %s | %s | %s | %s |' % (label, unit, cells[0], cells[1], ratio,
                                                     better))
    ceil = ceiling_lines(bench)
    if ceil:
        L += [''] + ceil
    L += alt_lines(bench)
    L += jobcost_lines(bench)
    L += ['', '## Targets', '']
    for text, ok, detail in targets(bench):
        L.append('- %s %s: %s' % ({True: '**met**', False: '**NOT met**',
                                   None: '**not measured**'}[ok], text, detail))
    if bench.leak_detail:
        L += ['', '## Leak run detail', '']
        for impl in IMPLS:
            for d in bench.leak_detail.get(impl, []):
                L.append('- %s: %s' % (impl, d))
    if bench.failures:
        L += ['', '## Failed runs', '']
        for rnd, impl, what, why in bench.failures:
            L.append('- round %d, %s, %s: %s' % (rnd + 1, impl, what, why))
    if bench.notes:
        L += ['', '## Notes', '']
        L += ['- ' + n for n in bench.notes]
    L += ['', '## Raw values per round', '']
    for key, label, unit, better in METRICS:
        if key not in V:
            continue
        parts = []
        for impl in IMPLS + (ALT,):
            if impl in V[key]:
                parts.append('%s [%s]' % (impl, ', '.join(
                    'FAIL' if isinstance(v, Fail) else fmt(v, unit) for v in V[key][impl])))
        L.append('- %s (%s): %s' % (key, unit, '; '.join(parts)))
    for key in sorted(k for k in V if k.startswith('ceil_')):
        L.append('- %s (MB/s): %s' % (key, ', '.join(
            'FAIL' if isinstance(v, Fail) else fmt(v, 'MB/s') for v in V[key]['ceiling'])))
    if profile_lines:
        L += ['', '## Profile of our node (tiny-job run)', ''] + profile_lines
    L += ['', 'Definitions: bench/README.md.', '']
    return '\n'.join(L)


def chart(bench, path):
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except Exception:
        return False
    labels, ratios, colors = [], [], []
    for key, label, unit, better in METRICS:
        d = bench.values.get(key, {})
        a, b = med(d.get('ours', [])), med(d.get('original', []))
        if a is None or not b or key.startswith('leak_'):
            continue
        labels.append('%s (%s is better)' % (label.replace('`', ''), better))
        ratios.append(a / b)
        colors.append('tab:green' if (a / b >= 1) == (better == 'higher') else 'tab:red')
    if not ratios:
        return False
    fig, ax = plt.subplots(figsize=(10, 0.4 * len(ratios) + 1.5))
    # bars from 1 (parity) to the ratio; green where ours is better
    ax.barh(range(len(ratios)), [r - 1 for r in ratios], left=1, color=colors)
    ax.axvline(1.0, color='black', linewidth=1)
    ax.set_yticks(range(len(ratios)))
    ax.set_yticklabels(labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xscale('log')
    ax.set_xlabel('ours / original (median over rounds)')
    ax.set_title('dispynode vs dispynode 4.5.5')
    fig.tight_layout()
    fig.savefig(str(path), dpi=110)
    plt.close(fig)
    return True


def replot(json_path):
    """Draw the chart of a saved run next to its JSON."""
    class Saved:
        pass
    saved = Saved()
    raw = json.loads(json_path.read_text())['values']
    saved.values = {k: {impl: [Fail('failed') if v is None else v for v in vals]
                        for impl, vals in d.items()} for k, d in raw.items()}
    png = json_path.with_suffix('.png')
    if not chart(saved, png):
        sys.exit('no chart: matplotlib not importable, or no ratios in %s' % json_path)
    print(png)
    return 0


# ---------------------------------------------------------------- main

def python_version(python):
    """'3.11.7' for the interpreter ``python``."""
    return subprocess.run(
        [python, '-c', 'import sys; print("%d.%d.%d" % sys.version_info[:3])'],
        stdout=subprocess.PIPE, check=True, timeout=60).stdout.decode().strip()


def find_alt_python(choice):
    """The second interpreter, or None."""
    if choice == 'none':
        return None
    if choice != 'auto':
        return choice
    try:
        root = subprocess.run(['pyenv', 'root'], stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, timeout=30).stdout.decode().strip()
    except (OSError, subprocess.SubprocessError):
        root = ''
    root = root or os.path.expanduser('~/.pyenv')
    found = sorted(Path(root, 'versions').glob('3.13.*/bin/python3'),
                   key=lambda p: [int(x) for x in p.parent.parent.name.split('.')
                                  if x.isdigit()])
    return str(found[-1]) if found else shutil.which('python3.13')


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--rounds', type=int, default=None,
                   help='A/B rounds (default 5, or 1 with --quick; 0 = profile only)')
    p.add_argument('--quick', action='store_true',
                   help='smaller runs to validate the harness (200 tiny jobs, 50 MB file, '
                        '1,000-job leak run)')
    p.add_argument('--only', choices=IMPLS, help='measure one node only')
    p.add_argument('--ours-python', default='venv',
                   help="interpreter for our node: 'venv' (default: a plain venv of this "
                        "python, as the original runs from its venv), 'system' (this "
                        "python itself) or a path")
    p.add_argument('--alt-python', default='auto',
                   help="a second interpreter for our node's tiny-job runs, reported beside "
                        "(default 'auto': the newest pyenv CPython 3.13 if there is one; "
                        "'none': skip)")
    p.add_argument('--profile', action='store_true',
                   help='add one profiled tiny-job run of our node and print the top functions')
    p.add_argument('--profile-tool', choices=('auto', 'py-spy', 'cprofile'), default='auto')
    p.add_argument('--profile-top', type=int, default=15)
    p.add_argument('--leak-rounds', type=int, default=1,
                   help='rounds that include the (long) leak run (default 1)')
    p.add_argument('--big', action='store_true', default=None,
                   help='also transfer a 2 GB file each way (the default, except '
                        'with --quick)')
    p.add_argument('--no-big', dest='big', action='store_false',
                   help='no 2 GB transfers')
    p.add_argument('--old-file', action='store_true',
                   help='also run the former file measurement (JobCluster() to first '
                        'result, depends of the cluster)')
    p.add_argument('--xfer-repeat', type=int, default=3,
                   help='transfers per direction per round (median taken; default 3)')
    p.add_argument('--files-only', action='store_true',
                   help='only the file transfers and the loopback ceiling')
    p.add_argument('--no-write', action='store_true', help='print only; write no files')
    p.add_argument('--chart', metavar='JSON',
                   help='only draw the PNG chart of a results/<timestamp>.json (e.g. with '
                        'a Python that has matplotlib) and exit')
    o = p.parse_args(argv)
    if o.chart:
        return o
    if o.rounds is None:
        o.rounds = 1 if o.quick else 5
    if o.big is None:
        o.big = not o.quick
    if o.rounds < 0 or (o.rounds == 0 and not o.profile):
        p.error('--rounds must be positive (0 only with --profile)')
    o.alt_python = find_alt_python(o.alt_python)
    o.tiny_jobs = 200 if o.quick else 1000
    o.tiny_wait = 120.0
    o.lat_n = 30 if o.quick else 100
    o.start_reps = 5 if o.quick else 10
    o.bursts = 1 if o.quick else 3
    o.file_mb = 50 if o.quick else 200
    o.leak_warmup = 100 if o.quick else 500
    o.leak_jobs = 1000 if o.quick else 5000
    o.leak_timeout = 200 if o.quick else 600
    return o


def main(argv=None):
    o = parse_args(sys.argv[1:] if argv is None else argv)
    if o.chart:
        return replot(Path(o.chart))
    cmdline = 'python3 bench/run.py ' + ' '.join(sys.argv[1:] if argv is None else argv)
    try:
        ensure_legacy_venv()      # pip needs the network: before unsharing it
    except LegacyUnavailable as exc:
        sys.exit('bench: legacy dispy 4.5.5 stack unavailable: %s' % exc.reason)
    netns = isolate_network()
    log('network: %s' % netns)
    tmp = Path(tempfile.mkdtemp(prefix='dispybench-'))
    bench = Bench(o, tmp)
    bench.stamp = time.strftime('%Y%m%d-%H%M%S')

    def on_term(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_term)
    profile_lines = []
    try:
        bench.run()
        if o.profile:
            log('profiling our node (%s)' % o.profile_tool)
            try:
                profile_lines = profile_ours(bench, o.profile_tool)
            except Exception as exc:
                profile_lines = ['profiling failed: %r' % (exc,)]
    except KeyboardInterrupt:
        log('interrupted: stopping nodes')
        bench.stop_all()
        shutil.rmtree(str(tmp), ignore_errors=True)
        return 130
    finally:
        bench.stop_all()
    text = report(bench, cmdline, netns, profile_lines)
    print(text)
    if not o.no_write:
        RESULTS.mkdir(exist_ok=True)
        md = RESULTS / ('%s.md' % bench.stamp)
        md.write_text(text)
        (BENCH / 'LATEST.md').write_text(text)
        raw = {k: {impl: [None if isinstance(v, Fail) else v for v in vals]
                   for impl, vals in d.items()} for k, d in bench.values.items()}
        (RESULTS / ('%s.json' % bench.stamp)).write_text(json.dumps(
            {'values': raw, 'failures': bench.failures, 'notes': bench.notes,
             'leak_detail': bench.leak_detail, 'jobcost': bench.jobcost,
             'cmdline': cmdline}, indent=1))
        png = RESULTS / ('%s.png' % bench.stamp)
        if chart(bench, png):
            shutil.copyfile(str(png), str(BENCH / 'LATEST.png'))
            log('chart: %s (and bench/LATEST.png)' % png)
        else:
            log('no chart (matplotlib not importable; later: python-with-matplotlib '
                'bench/run.py --chart %s)' % png.with_suffix('.json'))
        log('wrote %s and %s' % (md, BENCH / 'LATEST.md'))
    shutil.rmtree(str(tmp), ignore_errors=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())
