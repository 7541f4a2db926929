"""Submit jobs, then freeze (SIGSTOP to itself) like a hung client.

argv: node_port client_port [jobs=1] [secs=1.0] [wait=20]

Once every job is Running it prints ``SUBMITTED:<json>`` and stops itself;
the test later kills it.  While stopped it sends no pulses, so the node must
declare the computation a zombie and free itself.
"""


def compute(n, secs):
    import time
    time.sleep(secs)
    return n + 100


if __name__ == '__main__':
    import os
    import signal
    import _common as c

    def main():
        node_port, client_port, extra = c.ports()
        o = c.options(extra, jobs=1, secs=1.0, wait=20.0)
        cluster = c.cluster(compute, node_port, client_port)
        jobs = c.submit(cluster, [(n, o['secs']) for n in range(o['jobs'])])
        c.wait_until(lambda: all(j.status == c.status().Running for j in jobs), o['wait'],
                     0.02)
        c.say('SUBMITTED', [j.status for j in jobs])
        os.kill(os.getpid(), signal.SIGSTOP)
        # resumed (the test normally SIGKILLs us instead)
        c.finish({'resumed': True, 'statuses': [j.status for j in jobs]})

    c.run(main, timeout=60)
