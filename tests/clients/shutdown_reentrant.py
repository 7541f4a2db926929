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
    import threading
    import time
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
        nodes = o['nodes'].split(',')
        reent = c.cluster(compute, node_port, client_port, nodes=nodes, reentrant=True,
                          cluster_status=callback('reent'))
        plain = c.cluster(compute, node_port, client_port, nodes=nodes, reentrant=False,
                          cluster_status=callback('plain'))
        jobs = c.submit(reent, [(1, o['flag'])], ids=[1]) + \
            c.submit(plain, [(2, o['flag'])], ids=[2])
        c.STATE['_jobs'] = jobs
        running = c.wait_provisional_dicts(jobs, o['wait'])
        c.say('RUNNING', running)
        res = {'running': running, 'all_final': c.wait_final(jobs, o['wait'])}
        time.sleep(0.3)   # late callbacks
        res['jobs'] = [c.job_info(j) for j in jobs]
        with lock:
            res['events'] = list(events)
        plain.close()
        c.finish(res, reent, close_timeout=10)

    c.run(main, timeout=90)
