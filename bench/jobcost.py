#!/usr/bin/env python3
"""Where the CPU of a tiny job goes in our node's worker, measured directly.

    python3 bench/jobcost.py --repo DIR [--jobs N] [--perf] [--python PY]

Three measurements, each printed as one JSON object on stdout (run.py
calls this with the snapshot of the node and each interpreter it
benchmarks):

- ``floor``: the fork and exit of a process of the worker's image and
  nothing else.  The image is this interpreter with ``dispynode`` and the
  implicit job modules imported (what a spare worker holds); a bare
  interpreter is measured beside it.  Every fork-per-job node pays this
  for each job, before any work.
- ``drive``: one worker process of DIR's node driven through its own
  channel, as the node does, with N jobs of ``x * x`` kept two in flight:
  CPU per job of the worker process and of the job processes it forked
  (``/proc`` stat of the worker: own and reaped-children ticks), and their
  minor page faults.  No node process and no client: their CPU is not in
  it.
- ``perf`` (with --perf, if ``perf`` is installed): the same drive under
  ``perf record -a -g``; each sample of the worker and of its job
  processes is put into one class by its call chain (fork, exit,
  copy-on-write fault, file-page fault, other fault, system call,
  user code), which is what shows why a job costs what it costs.
"""

import argparse
import collections
import json
import os
import pickle
import re
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time

CLK_TCK = os.sysconf('SC_CLK_TCK')


def anon_kb():
    with open('/proc/self/smaps_rollup') as fh:
        return int(re.search(r'Anonymous:\s+(\d+)', fh.read()).group(1))


def floor(repo, forks, bare):
    """CPU of fork + _exit + waitpid from this process, per fork (ms)."""
    if bare:    # the same libc fork as the worker's (no at-fork callbacks to run)
        import ctypes
        fork = ctypes.PyDLL(None).fork
    else:
        sys.path.insert(0, repo)
        import dispynode
        dispynode.import_implicit_modules()
        fork = dispynode._Forker().fork        # what the worker forks with
    anon = anon_kb()
    s0, c0 = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(
        resource.RUSAGE_CHILDREN)
    for _ in range(forks):
        pid = fork()
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)
    s1, c1 = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(
        resource.RUSAGE_CHILDREN)
    parent = (s1.ru_utime + s1.ru_stime - s0.ru_utime - s0.ru_stime) * 1000.0 / forks
    child = (c1.ru_utime + c1.ru_stime - c0.ru_utime - c0.ru_stime) * 1000.0 / forks
    return {'what': 'floor', 'bare': bare, 'anon_kb': anon, 'parent_ms': parent,
            'child_ms': child, 'total_ms': parent + child,
            'child_faults': (c1.ru_minflt - c0.ru_minflt) / forks,
            'python': '.'.join(map(str, sys.version_info[:3]))}


def _stat(pid):
    with open('/proc/%d/stat' % pid) as fh:
        f = fh.read().rsplit(')', 1)[1].split()
    # minflt cminflt utime stime cutime cstime
    return [int(f[7]), int(f[8]), int(f[11]), int(f[12]), int(f[13]), int(f[14])]


def drive(repo, jobs, python):
    """N tiny jobs through one worker of the node in ``repo``."""
    sys.path.insert(0, repo)
    import dispy_common as dc
    import dispynode
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    cmd = dispynode.worker_command('node.worker_main(%d)' % theirs.fileno())
    cmd[0] = python
    work = tempfile.mkdtemp(prefix='dispy-jobcost-')
    proc = subprocess.Popen(cmd, pass_fds=(theirs.fileno(),), cwd=work,
                            stdin=subprocess.DEVNULL)
    theirs.close()
    ours.settimeout(60)
    code = 'def f(x):\n    return x * x\n'
    comp = dc.Compute(type=dc.Compute.func_type, name='f', id=1, code=code, dest_path=work,
                      xfer_files=[], reentrant=False, setup=None, cleanup=None,
                      scheduler_ip_addr='127.0.0.1', scheduler_port=9, auth='x',
                      job_result_port=9, pulse_interval=None)

    def send(msg):
        dc.send_msg(ours, dc.dumps_plain(msg))

    def submit(uid):
        send(('job', uid, 'h%d' % uid, pickle.dumps((uid,), 2), pickle.dumps({}, 2), ''))

    def done():
        msg = dc.loads_plain(dc.recv_msg(ours, 1 << 24))
        if msg[0] != 'done' or msg[3] != dc.DispyJob.Finished:
            raise RuntimeError('unexpected answer from the worker: %r' % (msg[:2],))
    try:
        send(('init', {
            'compute_id': 1, 'name': 'f', 'type': comp.type, 'code': code, 'program': None,
            'compute_bytes': dc.dumps(comp), 'has_cleanup': False, 'cwd': work,
            'ip_addr': '127.0.0.1', 'reply_addr': ['127.0.0.1', 9], 'certfile': None,
            'msg_timeout': 5, 'max_file_size': 0, 'job_timeout': 0, 'job_memory': 0,
            'job_memory_text': '', 'cgroup': None}))
        for uid in range(1, 51):            # warm up: namespace loaded, caches filled
            submit(uid)
            done()
        time.sleep(0.1)     # the last warm-up job process reaped
        before, t0 = _stat(proc.pid), time.monotonic()
        submit(1000)
        submit(1001)
        for i in range(jobs - 2):
            done()
            submit(1002 + i)
        done()
        done()
        elapsed = time.monotonic() - t0
        time.sleep(0.2)     # the last job process reaped
        after = _stat(proc.pid)
    finally:
        ours.close()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(work, ignore_errors=True)
    d = [b - a for a, b in zip(before, after)]
    tick_ms = 1000.0 / CLK_TCK / jobs
    worker_ms, jobs_ms = (d[2] + d[3]) * tick_ms, (d[4] + d[5]) * tick_ms
    return {'what': 'drive', 'jobs': jobs, 'worker_ms': worker_ms, 'jobs_ms': jobs_ms,
            'total_ms': worker_ms + jobs_ms,
            'worker_faults': d[0] / jobs, 'job_faults': d[1] / jobs, 'jobs_per_s': jobs / elapsed,
            'worker_pid': proc.pid, 'driver_pid': os.getpid(),
            'python': '.'.join(map(str, sys.version_info[:3]))}


# --------------------------------------------------------------- perf

CLASSES = ('fork', 'exit', 'COW fault', 'file-page fault', 'other fault', 'system call',
           'other kernel', 'user space')
KERNEL_ADDRESSES = 0xffff800000000000     # x86-64 and arm64: the upper half


def _base(symbol):
    """A kernel symbol without the compiler's suffix (``.isra.0``, ...)."""
    return symbol.split('.', 1)[0]


def classify(stack, in_kernel=None):
    """One class for a sample's call chain (symbols, innermost first).
    ``in_kernel``: whether the sample's own address is the kernel's (by
    default, whether its innermost frame names a kernel function we know)."""
    frames = {_base(f) for f in stack}
    if frames & {'copy_process', 'dup_mmap', 'kernel_clone', '_do_fork'}:
        return 'fork'
    if frames & {'do_exit', 'exit_mmap', 'do_group_exit'}:
        return 'exit'
    if frames & {'asm_exc_page_fault', 'exc_page_fault', 'handle_mm_fault'}:
        # a write to a page shared with the parent, or to a private file page
        if frames & {'do_wp_page', 'wp_page_copy', 'do_cow_fault'}:
            return 'COW fault'
        if frames & {'filemap_map_pages', 'do_read_fault', 'next_uptodate_folio',
                     'filemap_fault'}:
            return 'file-page fault'
        return 'other fault'
    if any(f.startswith(('entry_SYSCALL', 'do_syscall')) for f in frames):
        return 'system call'
    if in_kernel is None:
        in_kernel = False
    return 'other kernel' if in_kernel else 'user space'


def parse_perf_script(text):
    """``perf script -F comm,pid,ip,sym`` output -> [(comm, pid, in_kernel,
    [symbols, innermost first])].  A header line ends with the pid (a comm
    may hold spaces and digits); frame lines are indented ``ip symbol``."""
    samples, cur = [], None
    for line in text.splitlines():
        if not line.strip():
            if cur is not None:
                samples.append(cur)
            cur = None
        elif not line[:1].isspace():
            head = line.rsplit(None, 1)
            if len(head) == 2 and head[1].isdigit():
                cur = (head[0].strip(), int(head[1]), None, [])
        elif cur is not None:
            parts = line.split(None, 1)
            if len(parts) == 2:
                if cur[2] is None:      # the innermost frame: where the sample was taken
                    try:
                        cur = cur[:2] + (int(parts[0], 16) >= KERNEL_ADDRESSES, cur[3])
                    except ValueError:
                        cur = cur[:2] + (False, cur[3])
                cur[3].append(parts[1].split(' (', 1)[0].strip())
    if cur is not None:
        samples.append(cur)
    return samples


def perf_profile(repo, jobs, python, perf):
    """The drive under ``perf record -a -g``; returns the share of each
    class.  System-wide (-a) because a per-process recording, which would
    follow the drive's children by itself, loses the samples of a job
    process's exit, the largest part of its cost."""
    fd, data = tempfile.mkstemp(prefix='dispy-jobcost-', suffix='.perf')
    os.close(fd)
    cmd = [perf, 'record', '-q', '-a', '-g', '-F', '2000', '-o', data, '--',
           python, os.path.abspath(__file__), '--repo', repo, '--jobs', str(jobs),
           '--python', python, '--only', 'drive']
    try:
        run = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             timeout=300)
        if run.returncode != 0:
            return {'what': 'perf', 'error': run.stderr.decode(errors='replace')[-300:]}
        script = subprocess.run([perf, 'script', '-i', data, '-F', 'comm,pid,ip,sym'],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=300)
        if script.returncode != 0:
            return {'what': 'perf', 'error': 'perf script: ' + script.stderr.decode(
                errors='replace')[-300:]}
    except subprocess.TimeoutExpired as exc:
        return {'what': 'perf', 'error': 'timed out: %s' % exc}
    finally:
        try:
            os.unlink(data)
        except OSError:
            pass
    try:
        pids = json.loads(run.stdout.decode().strip().splitlines()[-1])
        worker, driver = pids['worker_pid'], pids['driver_pid']
    except (ValueError, KeyError, IndexError):
        return {'what': 'perf', 'error': 'the drive under perf printed no result'}
    samples = parse_perf_script(script.stdout.decode(errors='replace'))
    comm = next((c for c, pid, _, _ in samples if pid == worker), None)
    if comm is None:
        return {'what': 'perf', 'error': 'no samples of the worker'}
    # job processes: the other processes of the worker's name, but the
    # drive and this one (the bench runs nothing else meanwhile)
    others = (worker, driver, os.getpid())
    result = {'what': 'perf', 'samples': {}, 'classes': {}}
    for role, pick in (('worker', lambda c, p: p == worker),
                       ('job processes', lambda c, p: c == comm and p not in others)):
        counts = collections.Counter(classify(st, kernel) for c, pid, kernel, st in samples
                                     if pick(c, pid))
        total = sum(counts.values())
        result['samples'][role] = total
        result['classes'][role] = {c: counts.get(c, 0) * 100.0 / total if total else 0.0
                                   for c in CLASSES}
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--repo', required=True, help='directory of dispynode.py')
    p.add_argument('--jobs', type=int, default=3000)
    p.add_argument('--forks', type=int, default=2000)
    p.add_argument('--python', default=sys.executable, help='interpreter of the worker')
    p.add_argument('--perf', action='store_true', help='also profile with perf, if installed')
    p.add_argument('--only', choices=('floor', 'bare', 'drive'))
    o = p.parse_args(argv)
    if o.jobs < 2 or o.forks < 1:
        p.error('--jobs must be at least 2 and --forks at least 1')
    repo = os.path.abspath(o.repo)
    if o.only == 'drive':
        print(json.dumps(drive(repo, o.jobs, o.python)))
        return 0
    if o.only in ('floor', 'bare'):
        print(json.dumps(floor(repo, o.forks, o.only == 'bare')))
        return 0
    # each measurement in a fresh process, so one's memory is not in another's image
    me = [o.python, os.path.abspath(__file__), '--repo', repo, '--python', o.python,
          '--jobs', str(o.jobs), '--forks', str(o.forks)]
    for what in ('bare', 'floor', 'drive'):
        try:
            run = subprocess.run(me + ['--only', what], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, timeout=300)
        except subprocess.TimeoutExpired:
            print(json.dumps({'what': what, 'error': 'no result in 300 s'}))
            continue
        if run.returncode != 0:
            print(json.dumps({'what': what, 'error': 'exit status %d: %s' % (
                run.returncode, run.stderr.decode(errors='replace')[-300:])}))
            continue
        sys.stdout.write(run.stdout.decode())
        sys.stdout.flush()
    if o.perf:
        perf = shutil.which('perf')
        out = perf_profile(repo, o.jobs, o.python, perf) if perf else \
            {'what': 'perf', 'error': 'perf is not installed'}
        print(json.dumps(out))
    return 0


if __name__ == '__main__':
    sys.exit(main())
