"""Shared helpers for legacy (dispy 4.5.5, Python 3.6) client scripts.

Every client script takes ``node_port client_port [extra args...]`` and prints
one JSON object on its last stdout line, prefixed with ``RESULT:``.
"""

import json
import os
import sys
import threading
import time
import traceback

FINAL = (8, 9, 10, 11)   # Cancelled, Terminated, Abandoned, Finished
STATUS_NAMES = {5: 'Created', 6: 'Running', 7: 'ProvisionalResult', 8: 'Cancelled',
                9: 'Terminated', 10: 'Abandoned', 11: 'Finished'}

_out_lock = threading.Lock()
_emitted = [False]
STATE = {}    # partial results; the watchdog reports them


def ports():
    """(node_port, client_port, extra argv)."""
    return int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]


def options(extra, **defaults):
    """Parse ``key=value`` extra arguments over defaults (typed like the default)."""
    opts = dict(defaults)
    for a in extra:
        k, _, v = a.partition('=')
        d = defaults.get(k)
        if isinstance(d, bool):
            v = v.lower() in ('1', 'true', 'yes')
        elif isinstance(d, int):
            v = int(v)
        elif isinstance(d, float):
            v = float(v)
        opts[k] = v
    return opts


def jsonable(v):
    if isinstance(v, bytes):
        return {'__bytes__': v.decode('latin-1')}
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    if isinstance(v, dict):
        return dict((str(k), jsonable(x)) for k, x in v.items())
    return {'__repr__': repr(v)}


def job_info(job, **extra):
    d = {
        'id': jsonable(getattr(job, 'id', None)),
        'status': job.status,
        'result': jsonable(job.result),
        'stdout': jsonable(job.stdout),
        'stderr': jsonable(job.stderr),
        'exception': jsonable(job.exception),
        'ip_addr': job.ip_addr,
        'start_time': job.start_time,
        'end_time': job.end_time,
    }
    d.update(extra)
    return d


def wait_final(jobs, timeout):
    """Poll job.status until every job is final (job() returns at the first
    provisional result). Returns True if all became final in time."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if all(job.status in FINAL for job in jobs):
            return True
        time.sleep(0.05)
    return all(job.status in FINAL for job in jobs)


def give_up_if_unscheduled(cluster, jobs, seconds, res):
    """If no job leaves status Created within ``seconds``, cancel them all and
    set res['gave_up'] (the node refused or never answered)."""
    def started():
        return any(j.status != 5 for j in jobs)
    deadline = time.time() + seconds
    while time.time() < deadline and not started():
        time.sleep(0.1)
    res['gave_up'] = not started()
    if res['gave_up']:
        res['statuses_before_cancel'] = [j.status for j in jobs]
        for j in jobs:
            try:
                cluster.cancel(j)
            except Exception:
                res.setdefault('cancel_errors', []).append(traceback.format_exc())
    return res['gave_up']


def force_dest_path(dest_path):
    """Make the legacy client send ``dest_path`` verbatim in its computation
    (JobCluster itself strips a leading '/')."""
    import dispy
    orig = dispy._Node.setup

    def setup(self, compute, coro=None):
        compute.dest_path = dest_path
        return orig(self, compute, coro=coro)
    dispy._Node.setup = setup


def emit(obj):
    with _out_lock:
        if _emitted[0]:
            return
        _emitted[0] = True
        sys.stdout.write('\nRESULT:' + json.dumps(jsonable(obj)) + '\n')
        sys.stdout.flush()


def finish(result, cluster=None, close_timeout=30):
    """Close the cluster (bounded), add 'closed' to result, emit it and exit
    at once (asyncoro's exit handlers can hang)."""
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
        t.start()
        result['closed'] = done.wait(close_timeout) and not err
        if err:
            result['close_error'] = err[0]
    emit(result)
    sys.stderr.flush()
    os._exit(0)


def watchdog(seconds):
    """If the script is still running after ``seconds``, emit STATE with
    'watchdog': True and exit with code 3."""
    def _fire():
        res = dict(STATE)
        res['watchdog'] = True
        try:
            jobs = STATE.get('_jobs') or []
            res['job_statuses'] = [j.status for j in jobs]
        except Exception:
            pass
        res.pop('_jobs', None)
        emit(res)
        sys.stderr.write('client watchdog fired after %ss\n' % seconds)
        sys.stderr.flush()
        os._exit(3)
    t = threading.Timer(seconds, _fire)
    t.daemon = True
    t.start()
    return t


def run(main, timeout=90):
    """Run main() under a watchdog; an uncaught exception is reported as
    {'error': traceback}. The harness sets DISPYTEST_CLIENT_WATCHDOG (a bit
    under its own timeout), which takes precedence."""
    timeout = float(os.environ.get('DISPYTEST_CLIENT_WATCHDOG') or timeout)
    watchdog(timeout)
    try:
        main()
    except SystemExit:
        raise
    except BaseException:
        res = dict(STATE)
        res.pop('_jobs', None)
        res['error'] = traceback.format_exc()
        emit(res)
        os._exit(2)
