"""Jobs that raise (odd n) and jobs that succeed (even n).

argv: node_port client_port [jobs=4]
"""


def compute(n):
    if n % 2:
        raise ValueError('boom-%d' % n)
    return n


if __name__ == '__main__':
    import time
    import dispy
    import _common as c

    def main():
        node_port, client_port, extra = c.ports()
        o = c.options(extra, jobs=4)
        cluster = dispy.JobCluster(compute, nodes=['127.0.0.1'], ip_addr='127.0.0.1',
                                   node_port=node_port, port=client_port)
        jobs = []
        for n in range(o['jobs']):
            job = cluster.submit(n)
            job.id = n
            jobs.append(job)
        c.STATE['_jobs'] = jobs
        res = {'all_final': c.wait_final(jobs, 60)}
        res['jobs'] = [c.job_info(j) for j in jobs]
        c.finish(res, cluster)

    c.run(main, timeout=90)
