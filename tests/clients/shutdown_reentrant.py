"""A reentrant and a non-reentrant cluster; the node running their jobs
is stopped under them and a second node takes over.

argv: node_port client_port flag=<path> [nodes=127.0.0.1,127.0.0.2] [wait=40]

Two JobClusters (reentrant=True and reentrant=False) in one client, one job
each.  A job reports {'n', 'job_pid'} as a provisional result, then waits
(at most 60 s) for the file ``flag`` to exist and returns n * 10.  Once
both jobs have reported, the client prints ``RUNNING:<json>``.  RESULT
holds both jobs (reentrant first), whether they became final and every
cluster_status event as [cluster, status, node ip, job id].
"""


def compute(n, flag):
    import os
    import time
    dispy_provisional_result({'n': n, 'job_pid': os.getpid()})
    deadline = time.time() + 60
    while not os.path.exists(flag) and time.time() < deadline:
        time.sleep(0.05)
    return n * 10


if __name__ == '__main__':
    import json
    import sys
    import threading
    import time
    import dispy
    import _common as c

    events = []
    lock = threading.Lock()

    def callback(name):
        def status_cb(status, node, job):
            with lock:
                events.append([name, status, getattr(node, 'ip_addr', None),
                               getattr(job, 'id', None) if job is not None else None])
        return status_cb

    def main():
        node_port, client_port, extra = c.ports()
        o = c.options(extra, flag='', nodes='127.0.0.1,127.0.0.2', wait=40.0)
        kw = dict(nodes=o['nodes'].split(','), ip_addr='127.0.0.1', node_port=node_port,
                  port=client_port)
        reent = dispy.JobCluster(compute, reentrant=True, cluster_status=callback('reent'),
                                 **kw)
        plain = dispy.JobCluster(compute, reentrant=False, cluster_status=callback('plain'),
                                 **kw)
        jobs = []
        for n, cluster in ((1, reent), (2, plain)):
            job = cluster.submit(n, o['flag'])
            job.id = n
            jobs.append(job)
        c.STATE['_jobs'] = jobs
        deadline = time.time() + o['wait']
        while time.time() < deadline and not all(
                j.status == 7 and isinstance(j.result, dict) for j in jobs):
            time.sleep(0.02)
        running = [j.result for j in jobs if isinstance(j.result, dict)]
        sys.stdout.write('\nRUNNING:%s\n' % json.dumps(running))
        sys.stdout.flush()
        res = {'running': running, 'all_final': c.wait_final(jobs, o['wait'])}
        time.sleep(0.3)   # late callbacks
        res['jobs'] = [c.job_info(j) for j in jobs]
        with lock:
            res['events'] = list(events)
        plain.close()
        c.finish(res, reent, close_timeout=10)

    c.run(main, timeout=90)
