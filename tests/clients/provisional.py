"""Jobs send 5 provisional results before the final one; a callback records
every status it sees.

argv: node_port client_port [jobs=3]
"""


def compute(n):
    import time
    for i in range(5):
        dispy_provisional_result((n, i))
        time.sleep(0.1)
    return (n, 'final')


if __name__ == '__main__':
    import threading
    import time
    import _common as c

    seen = {}
    lock = threading.Lock()

    def callback(job):
        with lock:
            seen.setdefault(str(job.id), []).append([job.status, c.jsonable(job.result)])

    def main():
        node_port, client_port, extra = c.ports()
        o = c.options(extra, jobs=3)
        cluster = c.cluster(compute, node_port, client_port, callback=callback)
        jobs = c.submit(cluster, [(n,) for n in range(o['jobs'])])
        res = {'all_final': c.wait_final(jobs, 60)}
        time.sleep(0.3)   # let the last callbacks run
        res['jobs'] = [c.job_info(j) for j in jobs]
        with lock:
            res['callbacks'] = dict(seen)
        c.finish(res, cluster)

    c.run(main, timeout=90)
