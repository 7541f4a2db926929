"""Leak check: RSS of the node (and of its process tree) after a warm-up batch
and after each half of ``jobs`` tiny jobs, all in one computation.

argv: node_port client_port node_pid [warmup=500] [jobs=5000] [stall=30]
A batch whose next job takes longer than ``stall`` seconds counts as a hang.
"""


def compute(n):
    return n * n


if __name__ == '__main__':
    import sys
    import time
    import dispy
    import _bench as b

    def main():
        node_pid = int(sys.argv[3])
        sys.argv[3:4] = []
        node_port, client_port, o = b.args(warmup=500, jobs=5000, stall=30.0)
        cluster = dispy.JobCluster(compute, nodes=['127.0.0.1'], ip_addr='127.0.0.1',
                                   node_port=node_port, port=client_port)
        snaps = []
        b.STATE['snapshots'] = snaps

        def batch(label, n, stall):
            jobs = [cluster.submit(i) for i in range(n)]
            done = b.wait_jobs(jobs, stall=stall)
            if done < n:
                b.finish(dict(b.STATE, error='batch %r: only %d of its %d jobs done (no '
                              'progress for %ss)' % (label, done, n, stall), hang=True),
                         cluster, 10)
            bad = b.bad_jobs(jobs, lambda i: i * i)
            if bad:
                b.finish(dict(b.STATE, error='%s: %d jobs failed' % (label, len(bad)),
                              bad=bad[:3]), cluster, 10)
            time.sleep(0.5)
            node, tree, nprocs = b.tree_rss_kb(node_pid)
            snaps.append({'after': label, 'node_rss_kb': node, 'tree_rss_kb': tree,
                          'procs': nprocs})

        batch('warmup', o['warmup'], 60)
        half = o['jobs'] // 2
        batch('half', half, o['stall'])          # snapshot after the first half
        batch('all', o['jobs'] - half, o['stall'])   # ... and after all jobs
        b.finish({'snapshots': snaps, 'jobs': o['jobs']}, cluster)

    b.run(main)
