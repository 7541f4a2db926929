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
    import json
    import os
    import signal
    import sys
    import time
    import dispy
    import _common as c

    def main():
        node_port, client_port, extra = c.ports()
        o = c.options(extra, jobs=1, secs=1.0, wait=20.0)
        cluster = dispy.JobCluster(compute, nodes=['127.0.0.1'], ip_addr='127.0.0.1',
                                   node_port=node_port, port=client_port)
        jobs = [cluster.submit(n, o['secs']) for n in range(o['jobs'])]
        c.STATE['_jobs'] = jobs
        deadline = time.time() + o['wait']
        while time.time() < deadline and not all(j.status == 6 for j in jobs):
            time.sleep(0.02)
        sys.stdout.write('\nSUBMITTED:%s\n' % json.dumps([j.status for j in jobs]))
        sys.stdout.flush()
        os.kill(os.getpid(), signal.SIGSTOP)
        # resumed (the test normally SIGKILLs us instead)
        c.finish({'resumed': True, 'statuses': [j.status for j in jobs]})

    c.run(main, timeout=60)
