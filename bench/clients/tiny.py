"""Tiny-job throughput: ``jobs`` jobs of ``return n*n`` after ``warmup`` jobs.

argv: node_port client_port [jobs=1000] [warmup=1] [wait=120]
Throughput = jobs / (time from the first submit of the batch until the last
job of the batch finished, as seen by the client).  A batch not done within
``wait`` seconds is reported with hang=True.
"""


def compute(n):
    return n * n


if __name__ == '__main__':
    import time
    import dispy
    import _bench as b

    def main():
        node_port, client_port, o = b.args(jobs=1000, warmup=1, wait=120.0)
        t_create = time.time()
        cluster = dispy.JobCluster(compute, nodes=['127.0.0.1'], ip_addr='127.0.0.1',
                                   node_port=node_port, port=client_port)
        warm = [cluster.submit(i) for i in range(o['warmup'])]
        if b.wait_jobs(warm, deadline=time.time() + 60) < len(warm):
            b.finish({'error': 'warmup jobs not done in 60 s', 'hang': True}, cluster, 10)
        t_ready = time.time()
        jobs = []
        for i in range(o['jobs']):
            jobs.append(cluster.submit(i))
        t_submitted = time.time()
        b.STATE['submitted'] = len(jobs)
        done = b.wait_jobs(jobs, deadline=t_ready + o['wait'])
        t_end = time.time()
        res = {'jobs': o['jobs'], 'warmup': o['warmup'], 'done': done,
               'setup_s': t_ready - t_create, 'submit_s': t_submitted - t_ready,
               'elapsed': t_end - t_ready}
        if done < len(jobs):
            res['hang'] = True
            res['error'] = 'only %d of %d jobs done after %ss' % (done, len(jobs), o['wait'])
            res['statuses'] = sorted(set(j.status for j in jobs))
            b.finish(res, cluster, 10)
        bad = b.bad_jobs(jobs, lambda i: i * i)
        if bad:
            res['error'] = '%d jobs failed' % len(bad)
            res['bad'] = bad[:5]
        res['throughput'] = o['jobs'] / res['elapsed']
        b.finish(res, cluster)

    b.run(main)
