"""Tiny jobs submitted as results come in, ``depth`` at a time (the bounded
soak of issue 21).  Each finished job frees the client's internal job
object, whose id() is the uid the next job gets at once: the pattern that
once lost a reply in the node's courier.

argv: node_port client_port [jobs=3000] [depth=2] [wait=60]
res: 'done' (jobs that ended Finished with the right result), 'bad' (up to
20 [n, status, result]), 'all_final'.
"""


def compute(n):
    return n * 2 + 1


if __name__ == '__main__':
    import threading
    import _common as c

    def main():
        node_port, client_port, extra = c.ports()
        o = c.options(extra, jobs=3000, depth=2, wait=60.0)
        final = (c.status().Finished, c.status().Terminated, c.status().Cancelled,
                 c.status().Abandoned)
        ended = threading.Semaphore(0)
        lock = threading.Lock()
        outcome = {}        # n -> (status, result), from the callback

        def callback(job):
            if job.status in final:
                with lock:
                    outcome[job.args[0]] = (job.status, job.result)
                ended.release()

        cluster = c.cluster(compute, node_port, client_port, callback=callback)
        jobs = []
        c.STATE['_jobs'] = jobs
        res = {'stalled_at': None}
        for n in range(o['jobs']):
            if n >= o['depth'] and not ended.acquire(timeout=o['wait']):
                res['stalled_at'] = n      # a job never ended
                break
            job = cluster.submit(n)
            if job is not None:     # None: it ended before submit returned (4.5.5)
                jobs.append(job)
        res['all_final'] = c.wait_until(lambda: len(outcome) >= o['jobs'], o['wait'])
        with lock:
            res['done'] = sum(1 for n, (s, r) in outcome.items()
                              if s == c.status().Finished and r == n * 2 + 1)
            res['bad'] = [[n, s, r] for n, (s, r) in sorted(outcome.items())
                          if s != c.status().Finished or r != n * 2 + 1][:20]
        res['missing'] = [n for n in range(o['jobs']) if n not in outcome][:20]
        c.finish(res, cluster, close_timeout=10)

    c.run(main, timeout=200)
