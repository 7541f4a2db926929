"""A job whose processes try to outlive it (issue 20).

The job forks; the child calls setsid() and forks again; the grandchild
renames itself (comm ``tag``), optionally closes every descriptor it has
(``closefds=1``), and sleeps.  The job process names itself ``tag`` too,
reports both pids as a provisional result, then:

- ``end=wait``: sleeps (the node's limit, a cancel or a stop ends it);
- ``end=return``: returns at once, leaving the grandchild running.

``how``: ``timeout`` (wait for the node's --job_timeout), ``cancel``
(cluster.cancel), ``return``, ``stop`` (print PROVISIONAL and wait for the
job to end: the test stops the node).  Then (except for ``stop``) one more
job runs on the same cluster.

argv: node_port client_port tag=... how=... [closefds=0]
"""


def compute(tag, closefds, wait):
    import ctypes
    import os
    import time
    libc = ctypes.CDLL(None)

    def name(text):
        libc.prctl(15, ctypes.c_char_p(text.encode()), 0, 0, 0)    # PR_SET_NAME
    if tag == 'quick':
        return 'next job ran'
    r, w = os.pipe()
    child = os.fork()
    if child == 0:
        os.setsid()
        if os.fork() == 0:
            name(tag)
            os.write(w, str(os.getpid()).encode())
            if closefds:
                os.closerange(0, 4096)
            while True:
                time.sleep(1)
        os._exit(0)
    os.waitpid(child, 0)
    grandchild = int(os.read(r, 32))
    name(tag)
    dispy_provisional_result({'pid': os.getpid(), 'grandchild': grandchild})
    if wait:
        time.sleep(600)
    return 'returned'


if __name__ == '__main__':
    import time
    import dispy
    import _common as c

    def main():
        node_port, client_port, extra = c.ports()
        o = c.options(extra, tag='dtescape', how='timeout', closefds=0)
        cluster = c.cluster(compute, node_port, client_port)
        wait = o['how'] != 'return'
        job, = c.submit(cluster, [(o['tag'], o['closefds'], wait)], ids=['escape'])
        res = {}
        c.STATE['res'] = res
        c.wait_provisional_dicts([job], 30)
        res['provisional'] = c.jsonable(job.result)
        c.say('PROVISIONAL', res['provisional'])
        if o['how'] == 'cancel':
            res['cancel_return'] = c.jsonable(cluster.cancel(job))
        t0 = time.time()
        res['final'] = c.wait_until(lambda: job.status in (
            dispy.DispyJob.Terminated, dispy.DispyJob.Finished, dispy.DispyJob.Abandoned,
            dispy.DispyJob.Cancelled) and (o['how'] != 'cancel' or
                                           job.status != dispy.DispyJob.Cancelled), 40)
        res['waited'] = time.time() - t0
        res['job'] = c.job_info(job)
        if o['how'] == 'stop':
            c.finish(res)
        job2, = c.submit(cluster, [('quick', 0, False)], ids=['quick'])
        c.STATE['_jobs'] = [job, job2]
        res['quick_final'] = c.wait_final([job2], 30)
        res['quick'] = c.job_info(job2)
        c.finish(res, cluster)

    c.run(main, timeout=120)
