"""Module code that forges the worker's 'done' message (issue 20).

argv: node_port client_port

A class sent as a dependency runs code in the worker process when the
computation is loaded: it starts a thread that finds the Worker object,
waits for a job to run and sends a 'done' message for it on the worker's
channel, whose limit and reason names try to inject lines into /metrics.
The job itself sleeps 3 s and returns 'real'.  RESULT holds the job.
"""


class Forger(object):
    import threading as _threading

    def _forge():
        import gc
        import sys
        import time
        deadline = time.time() + 20
        while time.time() < deadline:
            workers = [o for o in gc.get_objects()
                       if type(o).__name__ == 'Worker' and hasattr(o, 'jobs')]
            for w in workers:
                for job in list(w.jobs.values()):
                    dc = sys.modules['dispy_common']
                    reply = dc.JobReply(uid=job.uid, hash=job.hash, ip_addr=w.cfg['ip_addr'],
                                        status=9, exception='forged', start_time=time.time(),
                                        end_time=time.time())
                    w.send(('done', job.uid, dc.dumps(reply), 9,
                            'x"} 1\nevil_limit_metric 1\n# x', 'y"} 1\nevil_reason_metric 1'))
                    return
            time.sleep(0.02)

    _threading.Thread(target=_forge, daemon=True).start()


def compute(n):
    import time
    time.sleep(3)
    return 'real'


if __name__ == '__main__':
    import _common as c

    def main():
        node_port, client_port, extra = c.ports()
        cluster = c.cluster(compute, node_port, client_port, depends=[Forger])
        jobs = c.submit(cluster, [(0,)])
        c.finish(c.collect(cluster, jobs, wait=30), cluster)

    c.run(main, timeout=60)
