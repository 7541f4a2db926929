"""Adapted from dispy's examples/node_shvars.py: setup creates a shared
multiprocessing Value; every job adds to it under its lock.

Job k adds k (k = 1..jobs) instead of a random number, so with a truly shared
value the results are distinct and the largest is 1 + sum(1..jobs).

argv: node_port client_port [jobs=10]
"""


def setup():
    import multiprocessing
    import multiprocessing.sharedctypes
    global shvar
    lock = multiprocessing.Lock()
    shvar = multiprocessing.sharedctypes.Value('i', 1, lock=lock)
    return 0


def cleanup():
    global shvar
    del shvar


def compute(k):
    import time
    global shvar
    # the Value's own accessors take its (non-recursive) lock, so update the
    # raw object while holding the lock
    with shvar.get_lock():
        raw = shvar.get_obj()
        raw.value += k
        value = raw.value
    time.sleep(0.05)
    return value


if __name__ == '__main__':
    import dispy
    import _common as c

    def main():
        node_port, client_port, extra = c.ports()
        o = c.options(extra, jobs=10)
        cluster = dispy.JobCluster(compute, nodes=['127.0.0.1'], ip_addr='127.0.0.1',
                                   node_port=node_port, port=client_port, depends=[],
                                   setup=setup, cleanup=cleanup)
        jobs = []
        for k in range(1, o['jobs'] + 1):
            job = cluster.submit(k)
            job.id = k
            jobs.append(job)
        c.STATE['_jobs'] = jobs
        res = {'all_final': c.wait_final(jobs, 60)}
        res['jobs'] = [c.job_info(j) for j in jobs]
        c.finish(res, cluster)

    c.run(main, timeout=90)
