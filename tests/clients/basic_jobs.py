"""N function jobs: result, stdout, stderr, timing, ip_addr.

argv: node_port client_port [jobs=20] [secret=...] [wait=60] [give_up=0]
give_up > 0: if no job has been scheduled after that many seconds, cancel
all jobs and report (used for the wrong-secret scenario).
"""


def compute(n):
    import sys
    import time
    time.sleep(0.05)
    print('out-%d' % n)
    sys.stderr.write('err-%d\n' % n)
    return n * n + 1


if __name__ == '__main__':
    import time
    import dispy
    import _common as c

    def main():
        node_port, client_port, extra = c.ports()
        o = c.options(extra, jobs=20, secret='', wait=60.0, give_up=0.0)
        t0 = time.time()
        cluster = dispy.JobCluster(compute, nodes=['127.0.0.1'], ip_addr='127.0.0.1',
                                   node_port=node_port, port=client_port, secret=o['secret'])
        jobs = []
        for n in range(o['jobs']):
            job = cluster.submit(n)
            job.id = n
            jobs.append(job)
        c.STATE['_jobs'] = jobs
        res = {'t0': t0}
        if o['give_up'] > 0:
            c.give_up_if_unscheduled(cluster, jobs, o['give_up'], res)
        res['all_final'] = c.wait_final(jobs, o['wait'])
        res['jobs'] = [c.job_info(j) for j in jobs]
        res['t1'] = time.time()
        c.finish(res, cluster)

    c.run(main, timeout=100)
