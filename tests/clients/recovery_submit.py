"""Submit jobs with a fixed recover_file, then die without closing.

argv: node_port client_port recover_file=PATH [jobs=2] [secs=1.5] [wait=20]

Waits until every job is Running (the node ACKed it), prints RESULT with
the statuses and exits with os._exit(0): no close(), so the node keeps the
computation and stores the results it cannot deliver.
"""


def compute(n, secs):
    import os
    import time
    time.sleep(secs)
    print('recovered-out-%d' % n)
    return {'n': n, 'value': n * n + 7, 'pid': os.getpid()}


if __name__ == '__main__':
    import os
    import time
    import _common as c

    def main():
        node_port, client_port, extra = c.ports()
        o = c.options(extra, recover_file='', jobs=2, secs=1.5, wait=20.0)
        cluster = c.cluster(compute, node_port, client_port, recover_file=o['recover_file'])
        jobs = c.submit(cluster, [(n, o['secs']) for n in range(o['jobs'])])
        c.wait_until(lambda: all(j.status == c.status().Running for j in jobs), o['wait'],
                     0.02)
        statuses = [j.status for j in jobs]
        c.emit({'statuses': statuses, 'submitted_at': time.time(),
                'recover_file': o['recover_file']})
        os._exit(0)    # die: no close(), no atexit

    c.run(main, timeout=40)
