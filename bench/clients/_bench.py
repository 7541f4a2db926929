"""Helpers for the benchmark's legacy client scripts (run by the legacy venv's
Python 3.6 with dispy 4.5.5; keep this file Python 3.6 compatible).

Every script takes ``node_port client_port [key=value ...]`` and prints one
JSON object on its last stdout line, prefixed with ``RESULT:``.  A script
never waits without a bound: a watchdog (env DISPYBENCH_WATCHDOG seconds)
reports what it has and exits.
"""

import json
import os
import sys
import threading
import time
import traceback

FINISHED = 11
FINAL = (8, 9, 10, 11)
STATE = {}
_lock = threading.Lock()
_emitted = [False]


def args(**defaults):
    """(node_port, client_port, options) from argv; options typed like defaults."""
    node_port, client_port = int(sys.argv[1]), int(sys.argv[2])
    opts = dict(defaults)
    for a in sys.argv[3:]:
        k, _, v = a.partition('=')
        d = defaults.get(k)
        if isinstance(d, bool):
            v = v.lower() in ('1', 'true', 'yes')
        elif isinstance(d, int):
            v = int(v)
        elif isinstance(d, float):
            v = float(v)
        opts[k] = v
    return node_port, client_port, opts


def emit(obj):
    with _lock:
        if _emitted[0]:
            return
        _emitted[0] = True
        sys.stdout.write('\nRESULT:' + json.dumps(obj) + '\n')
        sys.stdout.flush()


def finish(result, cluster=None, close_timeout=30.0):
    """Close the cluster (bounded), emit the result and exit at once (asyncoro's
    exit handlers can hang)."""
    if cluster is not None:
        done = threading.Event()
        err = []

        def _close():
            try:
                cluster.close()
            except Exception:
                err.append(traceback.format_exc())
            done.set()
        t = threading.Thread(target=_close)
        t.daemon = True
        t0 = time.time()
        t.start()
        result['closed'] = bool(done.wait(close_timeout) and not err)
        result['close_s'] = time.time() - t0
        if err:
            result['close_error'] = err[0][-2000:]
    emit(result)
    sys.stderr.flush()
    os._exit(0)


def wait_jobs(jobs, deadline=None, stall=None):
    """Wait for jobs in order, each at most until ``deadline`` (time.time())
    and at most ``stall`` seconds after the previous one finished.  Returns the
    number of jobs finished in order before giving up."""
    for i, job in enumerate(jobs):
        limits = []
        if deadline is not None:
            limits.append(deadline - time.time())
        if stall is not None:
            limits.append(stall)
        timeout = max(0.0, min(limits)) if limits else None
        if not job.finish.wait(timeout):
            return i
    return len(jobs)


def bad_jobs(jobs, expect=None):
    """Descriptions of jobs that didn't finish with the expected result."""
    bad = []
    for i, job in enumerate(jobs):
        if job.status != FINISHED or (expect is not None and job.result != expect(i)):
            bad.append({'i': i, 'status': job.status, 'result': repr(job.result)[:200],
                        'exception': (job.exception or '')[-500:]})
    return bad


def run(main, timeout=None):
    """Run main() under a watchdog; an exception is reported as {'error': ...}."""
    timeout = float(os.environ.get('DISPYBENCH_WATCHDOG') or timeout or 300)

    def _fire():
        res = dict(STATE)
        res['error'] = 'client watchdog fired after %ss' % timeout
        res['hang'] = True
        emit(res)
        os._exit(3)
    t = threading.Timer(timeout, _fire)
    t.daemon = True
    t.start()
    try:
        main()
    except SystemExit:
        raise
    except BaseException:
        res = dict(STATE)
        res['error'] = traceback.format_exc()[-3000:]
        emit(res)
        os._exit(2)


# -------------------------------------------------------------- /proc readers

def _children_map():
    children = {}
    for entry in os.listdir('/proc'):
        if not entry.isdigit():
            continue
        try:
            with open('/proc/%s/stat' % entry, 'rb') as fh:
                data = fh.read()
        except (IOError, OSError):
            continue
        ppid = int(data[data.rfind(b')') + 2:].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    return children


def tree(pid):
    """pid and all its descendants."""
    children = _children_map()
    found, todo = [pid], [pid]
    while todo:
        for child in children.get(todo.pop(), ()):
            found.append(child)
            todo.append(child)
    return found


def rss_kb(pid):
    """VmRSS of one process in kB (None if gone)."""
    try:
        with open('/proc/%d/status' % pid) as fh:
            for line in fh:
                if line.startswith('VmRSS:'):
                    return int(line.split()[1])
    except (IOError, OSError):
        return None
    return 0


def tree_rss_kb(pid):
    """(node VmRSS, sum of VmRSS over pid and its descendants, process count)."""
    pids = tree(pid)
    vals = [rss_kb(p) or 0 for p in pids]
    return vals[0], sum(vals), len(pids)
