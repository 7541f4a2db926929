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
    import _common as c

    def main():
        node_port, client_port, extra = c.ports()
        o = c.options(extra, jobs=10)
        cluster = c.cluster(compute, node_port, client_port, depends=[], setup=setup,
                            cleanup=cleanup)
        ks = list(range(1, o['jobs'] + 1))
        jobs = c.submit(cluster, [(k,) for k in ks], ids=ks)
        c.finish(c.collect(cluster, jobs, wait=60), cluster)

    c.run(main, timeout=90)
