"""Jobs of ``secs`` seconds; the test kills the computation's worker
process while they run.

argv: node_port client_port [jobs=12] [secs=1.0] [setup=0] [wait=40]

Each job returns {'n', 'worker': os.getppid()} (the process it was forked
from).  Once a job runs, the client prints ``RUNNING:<json>``.  RESULT
holds every job (c.job_info), whether all became final, and the
cluster_status events as [status, job id].  With setup=1 the cluster has a
setup function (whose state a new worker could not have).
"""


def setup():
    global base
    base = 1000
    return 0


def compute(n, secs):
    import os
    import time
    time.sleep(secs)
    return {'n': n, 'worker': os.getppid(), 'base': globals().get('base')}


if __name__ == '__main__':
    import threading
    import _common as c

    events = []
    lock = threading.Lock()

    def status_cb(status, node, job):
        with lock:
            events.append([status, getattr(job, 'id', None) if job is not None else None])

    def main():
        node_port, client_port, extra = c.ports()
        o = c.options(extra, jobs=12, secs=1.0, setup=0, wait=40.0)
        kw = {'setup': setup} if o['setup'] else {}
        cluster = c.cluster(compute, node_port, client_port, cluster_status=status_cb, **kw)
        jobs = c.submit(cluster, [(n, o['secs']) for n in range(o['jobs'])])
        s = c.status()
        c.wait_until(lambda: any(j.status == s.Running for j in jobs), o['wait'])
        c.say('RUNNING', [j.status for j in jobs])
        res = c.collect(cluster, jobs, wait=o['wait'])
        with lock:
            res['events'] = list(events)
        c.finish(res, cluster, close_timeout=10)

    c.run(main, timeout=90)
