"""File transfer: one job of a computation that depends on a big file.

argv: node_port client_port path [wait=180]
MB/s = file size / time from JobCluster() (which starts the transfer once the
node is found) until the first (only) result.  The job returns the size of
its copy of the file.
"""


def compute(name):
    import os
    return os.path.getsize(name)


if __name__ == '__main__':
    import os
    import sys
    import time
    import dispy
    import _bench as b

    def main():
        path = sys.argv[3]
        sys.argv[3:4] = []
        node_port, client_port, o = b.args(wait=180.0)
        size = os.path.getsize(path)
        t0 = time.time()
        cluster = dispy.JobCluster(compute, nodes=['127.0.0.1'], ip_addr='127.0.0.1',
                                   node_port=node_port, port=client_port, depends=[path])
        job = cluster.submit(os.path.basename(path))
        if not job.finish.wait(o['wait']):
            b.finish({'error': 'no result in %ss' % o['wait'], 'hang': True}, cluster, 10)
        t1 = time.time()
        res = {'size': size, 'elapsed': t1 - t0}
        if job.status != b.FINISHED or job.result != size:
            res['error'] = 'job failed: status %s result %r exception %s' % (
                job.status, job.result, (job.exception or '')[-1500:])
        else:
            res['mb_per_s'] = size / 1048576.0 / (t1 - t0)
        b.finish(res, cluster)

    b.run(main)
