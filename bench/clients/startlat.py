"""Job-start latency, from the client's submit() to the node's start time of
the job (job.start_time, which the node sets when it starts the job; the
client and the node share this machine's clock).

argv: node_port client_port [reps=10] [burst=20] [bursts=3] [wait=60]
- single: one job submitted to an idle (warmed-up) node; ``reps`` samples.
- burst: ``burst`` jobs submitted back to back; the sample is the start
  latency of the job that started last (it waited behind burst-1 queued
  jobs, with the node's CPU count of jobs in flight).  ``bursts`` samples.
Jobs are ``return n*n``.  Times in ms.
"""


def compute(n):
    return n * n


if __name__ == '__main__':
    import time
    import dispy
    import _bench as b

    def main():
        node_port, client_port, o = b.args(reps=10, burst=20, bursts=3, wait=60.0)
        cluster = dispy.JobCluster(compute, nodes=['127.0.0.1'], ip_addr='127.0.0.1',
                                   node_port=node_port, port=client_port)
        job = cluster.submit(0)
        if not job.finish.wait(60):
            b.finish({'error': 'warmup job not done', 'hang': True}, cluster, 10)
        single, burst = [], []
        b.STATE.update(single_ms=single, burst_ms=burst)
        for r in range(o['reps']):
            time.sleep(0.05)
            t0 = time.time()
            job = cluster.submit(r)
            if not job.finish.wait(o['wait']) or job.status != b.FINISHED:
                b.finish(dict(b.STATE, error='single job %d failed' % r, hang=True), cluster, 10)
            single.append((job.start_time - t0) * 1000.0)
        for r in range(o['bursts']):
            time.sleep(0.05)
            t0 = time.time()
            jobs = [cluster.submit(i) for i in range(o['burst'])]
            if b.wait_jobs(jobs, deadline=time.time() + o['wait']) < len(jobs):
                b.finish(dict(b.STATE, error='burst %d not done' % r, hang=True), cluster, 10)
            if b.bad_jobs(jobs):
                b.finish(dict(b.STATE, error='burst %d: failed jobs' % r), cluster, 10)
            burst.append((max(j.start_time for j in jobs) - t0) * 1000.0)
        b.finish({'single_ms': single, 'burst_ms': burst, 'burst': o['burst']}, cluster)

    b.run(main)
