"""Jobs that leave short-lived orphans: each job forks a child that
outlives the job by a moment (then exits), and returns the child's pid.

argv: node_port client_port [jobs=10] [linger=0.2] [secret=] [wait=60]
"""


def compute(n, linger):
    import os
    import time
    pid = os.fork()
    if pid == 0:        # the orphan: ends after the job did
        time.sleep(linger)
        os._exit(0)
    return pid


if __name__ == '__main__':
    import _common as c

    def main():
        node_port, client_port, extra = c.ports()
        o = c.options(extra, jobs=10, linger=0.2, secret='', wait=60.0)
        cluster = c.cluster(compute, node_port, client_port, secret=o['secret'])
        jobs = c.submit(cluster, [(n, o['linger']) for n in range(o['jobs'])])
        c.finish(c.collect(cluster, jobs, wait=o['wait']), cluster)

    c.run(main, timeout=100)
