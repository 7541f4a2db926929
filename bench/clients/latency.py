"""Round-trip latency: ``n`` sequential submit -> result, after warmup jobs.

argv: node_port client_port [n=100] [warmup=3] [wait=30]
Each sample is the client's time from cluster.submit() until the job's
finish event (result received), in ms.
"""


def compute(n):
    return n * n


if __name__ == '__main__':
    import time
    import dispy
    import _bench as b

    def main():
        node_port, client_port, o = b.args(n=100, warmup=3, wait=30.0)
        cluster = dispy.JobCluster(compute, nodes=['127.0.0.1'], ip_addr='127.0.0.1',
                                   node_port=node_port, port=client_port)
        for i in range(o['warmup']):
            job = cluster.submit(i)
            if not job.finish.wait(60 if i == 0 else o['wait']):
                b.finish({'error': 'warmup job %d not done' % i, 'hang': True}, cluster, 10)
        samples = []
        b.STATE['samples_ms'] = samples
        for i in range(o['n']):
            t0 = time.time()
            job = cluster.submit(i)
            if not job.finish.wait(o['wait']):
                b.finish({'error': 'job %d not done in %ss' % (i, o['wait']), 'hang': True,
                          'samples_ms': samples}, cluster, 10)
            samples.append((time.time() - t0) * 1000.0)
            if job.status != b.FINISHED or job.result != i * i:
                b.finish({'error': 'job %d failed: %s %r' % (i, job.status, job.exception),
                          'samples_ms': samples}, cluster, 10)
        b.finish({'samples_ms': samples}, cluster)

    b.run(main)
