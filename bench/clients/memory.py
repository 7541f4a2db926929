"""Memory while jobs share setup data: setup allocates a ``mb`` MB bytearray
global; ``jobs`` jobs (run concurrently on a 2-CPU node) each read it and
sleep ``sleep`` seconds.  The benchmark samples the node's process tree
(RSS and PSS) while this runs.

argv: node_port client_port [mb=100] [jobs=2] [sleep=2.0]
"""


def setup(mb):
    global data
    data = bytearray(b'\x01') * (mb * 1024 * 1024)   # touched: resident
    return 0


def cleanup():
    global data
    del data


def compute(n, sleep):
    import time
    total = sum(data[::4096])    # read every page of the shared data
    time.sleep(sleep)
    return total


if __name__ == '__main__':
    import functools
    import time
    import dispy
    import _bench as b

    def main():
        node_port, client_port, o = b.args(mb=100, jobs=2, sleep=2.0)
        t0 = time.time()
        cluster = dispy.JobCluster(compute, nodes=['127.0.0.1'], ip_addr='127.0.0.1',
                                   node_port=node_port, port=client_port,
                                   setup=functools.partial(setup, o['mb']), cleanup=cleanup)
        jobs = [cluster.submit(i, o['sleep']) for i in range(o['jobs'])]
        done = b.wait_jobs(jobs, deadline=time.time() + 90)
        res = {'done': done, 'elapsed': time.time() - t0}
        expect = o['mb'] * 1024 * 1024 // 4096
        bad = b.bad_jobs(jobs, lambda i: expect)
        if done < len(jobs):
            res.update(error='only %d of %d jobs done' % (done, len(jobs)), hang=True)
        elif bad:
            res.update(error='jobs failed', bad=bad)
        else:
            spans = [(j.start_time, j.end_time) for j in jobs]
            res['overlap_s'] = min(e for s, e in spans) - max(s for s, e in spans)
        b.finish(res, cluster)

    b.run(main)
