"""Shared helpers for legacy (dispy 4.5.5, Python 3.6) client scripts.

Every client script takes ``node_port client_port [extra args...]`` and prints
one JSON object on its last stdout line, prefixed with ``RESULT:``.  This
module runs under Python 3.6 and imports only the standard library (and
dispy, lazily).  The usual skeleton::

    cluster = c.cluster(compute, node_port, client_port, depends=[...])
    jobs = c.submit(cluster, [(n,) for n in range(o['jobs'])])
    c.finish(c.collect(cluster, jobs, wait=60), cluster)
"""

import json
import os
import sys
import threading
import time
import traceback


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


def wait_until(predicate, timeout, interval=0.05):
    """Poll ``predicate()`` until it is true or ``timeout`` seconds pass;
    returns its last value."""
    deadline = time.time() + timeout
    while not predicate() and time.time() < deadline:
        time.sleep(interval)
    return predicate()


def status():
    """dispy.DispyJob, whose attributes name the job statuses (imported
    late: the harness imports this module without dispy)."""
    import dispy
    return dispy.DispyJob


def wait_final(jobs, timeout):
    """Poll job.status until every job is final (job() returns at the first
    provisional result). Returns True if all became final in time."""
    s = status()
    final = (s.Cancelled, s.Terminated, s.Abandoned, s.Finished)
    return wait_until(lambda: all(job.status in final for job in jobs), timeout)


def wait_provisional_dicts(jobs, timeout):
    """Wait until every job has reported a dict as its provisional result
    (the scripts' jobs report their pids so); returns those dicts."""
    provisional = status().ProvisionalResult
    wait_until(lambda: all(j.status == provisional and isinstance(j.result, dict)
                           for j in jobs), timeout, 0.02)
    return [j.result for j in jobs if isinstance(j.result, dict)]


def say(tag, value):
    """One ``TAG:<json>`` stdout line the harness waits for while we run."""
    sys.stdout.write('\n%s:%s\n' % (tag, json.dumps(value)))
    sys.stdout.flush()


def pid_alive(pid):
    """True if a process with this pid exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open('/proc/%d/stat' % pid) as f:
            state = f.read().rsplit(')', 1)[1].split()[0]
        return state not in ('Z', 'X')
    except (OSError, IndexError):
        return True


# ---------------------------------------------------------------- the skeleton

def cluster(compute, node_port, client_port, **kw):
    """A JobCluster with the tests' defaults: the node at 127.0.0.1 on
    ``node_port``, the client on 127.0.0.1:``client_port``."""
    import dispy
    kw.setdefault('nodes', ['127.0.0.1'])
    kw.setdefault('ip_addr', '127.0.0.1')
    return dispy.JobCluster(compute, node_port=node_port, port=client_port, **kw)


def submit(cluster, arg_tuples, ids=None, **kw):
    """One job per tuple of arguments; job.id is its index (or ids[i]); the
    jobs become STATE['_jobs'] (the watchdog reports their statuses)."""
    jobs = []
    for i, args in enumerate(arg_tuples):
        job = cluster.submit(*args, **kw)
        job.id = ids[i] if ids else i
        jobs.append(job)
    STATE['_jobs'] = jobs
    return jobs


def numbered(compute, node_port, client_port, o, detail=True, **kw):
    """o['jobs'] jobs compute(0), compute(1), ... on a cluster with secret
    o['secret'] (and ``kw``), collected (o['wait'], o['give_up']) between the
    times 't0' and 't1'.  Returns (cluster, jobs, result)."""
    t0 = time.time()
    job_cluster = cluster(compute, node_port, client_port, secret=o['secret'], **kw)
    jobs = submit(job_cluster, [(n,) for n in range(o['jobs'])])
    res = collect(job_cluster, jobs, {'t0': t0}, o['wait'], o['give_up'], detail)
    res['t1'] = time.time()
    return job_cluster, jobs, res


def collect(cluster, jobs, res=None, wait=60, give_up=0, detail=True):
    """Into ``res``: 'gave_up' (with give_up > 0, see give_up_if_unscheduled),
    'all_final' after waiting up to ``wait`` seconds, and (with ``detail``)
    'jobs', the job_info of each job.  Returns res."""
    res = {} if res is None else res
    if give_up > 0:
        give_up_if_unscheduled(cluster, jobs, give_up, res)
    res['all_final'] = wait_final(jobs, wait)
    if detail:
        res['jobs'] = [job_info(j) for j in jobs]
    return res


def give_up_if_unscheduled(cluster, jobs, seconds, res):
    """If no job leaves status Created within ``seconds``, cancel them all and
    set res['gave_up'] (the node refused or never answered)."""
    def started():
        return any(j.status != status().Created for j in jobs)
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
