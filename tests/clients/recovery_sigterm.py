"""Jobs that start a long-running child; the node is stopped under them.

argv: node_port client_port [jobs=2] [wait=25] [closed_wait=10]

Each job starts ``sleep 600`` and sends its own pid and the child's as a
provisional result, then sleeps.  Once every job has reported, the client
prints ``PIDS:<json>`` and waits for the jobs to end (the test sends
SIGTERM to the node) and for its cluster_status callback to report the
node as Closed.  RESULT holds the job statuses and every cluster_status
event as [status, node ip, job id].
"""


def compute(n):
    import os
    import subprocess
    import time
    child = subprocess.Popen(['sleep', '600'])
    dispy_provisional_result({'n': n, 'job_pid': os.getpid(), 'child_pid': child.pid})
    time.sleep(600)
    return 'not reached'


if __name__ == '__main__':
    import threading
    import time
    import dispy
    import _common as c

    events = []
    lock = threading.Lock()

    def status_cb(status, node, job):
        with lock:
            events.append([status, getattr(node, 'ip_addr', None),
                           getattr(job, 'id', None) if job is not None else None,
                           time.time()])

    def main():
        node_port, client_port, extra = c.ports()
        o = c.options(extra, jobs=2, wait=25.0, closed_wait=10.0)
        cluster = c.cluster(compute, node_port, client_port, cluster_status=status_cb)
        jobs = c.submit(cluster, [(n,) for n in range(o['jobs'])])
        pids = c.wait_provisional_dicts(jobs, o['wait'])
        c.STATE['pids'] = pids
        c.say('PIDS', pids)
        res = {'pids': pids, 'all_final': c.wait_final(jobs, o['wait'])}
        def node_closed():
            with lock:
                return any(e[0] == dispy.DispyNode.Closed for e in events)
        c.wait_until(node_closed, o['closed_wait'])
        time.sleep(0.3)   # let late callbacks arrive
        res['jobs'] = [c.job_info(j) for j in jobs]
        with lock:
            res['events'] = list(events)
        res['t_end'] = time.time()
        c.finish(res, cluster, close_timeout=10)

    c.run(main, timeout=60)
