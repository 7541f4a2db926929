"""Jobs for the observability and limits tests.

argv: node_port client_port [mode=sleep] [jobs=1] [seconds=0.0] [mb=0] [wait=60]

mode: sleep  - sleep ``seconds`` (in Python), return n
      shell  - run ``sleep <seconds>`` in a child shell (a process tree)
      alloc  - allocate ``mb`` MB in one block, then return its length
      env    - return the job's thread variables (OMP_NUM_THREADS...)
"""


def compute(n, mode, seconds, mb):
    import os
    import time
    if mode == 'sleep':
        time.sleep(seconds)
        return n
    if mode == 'shell':
        os.system('sleep %s' % seconds)
        return n
    if mode == 'alloc':
        block = bytearray(mb * 1024 * 1024)
        return len(block)
    if mode == 'env':
        return dict((k, os.environ.get(k)) for k in (
            'OMP_NUM_THREADS', 'OPENBLAS_NUM_THREADS', 'MKL_NUM_THREADS',
            'NUMEXPR_NUM_THREADS', 'VECLIB_MAXIMUM_THREADS'))
    raise ValueError('unknown mode %r' % mode)


if __name__ == '__main__':
    import time
    import _common as c

    def main():
        node_port, client_port, extra = c.ports()
        o = c.options(extra, mode='sleep', jobs=1, seconds=0.0, mb=0, wait=60.0)
        cluster = c.cluster(compute, node_port, client_port)
        jobs = c.submit(cluster, [(n, o['mode'], o['seconds'], o['mb'])
                                  for n in range(o['jobs'])])
        t0 = time.time()
        res = {'all_final': c.wait_final(jobs, o['wait'])}
        res['elapsed'] = time.time() - t0
        res['jobs'] = [c.job_info(j) for j in jobs]
        c.finish(res, cluster)

    c.run(main, timeout=100)
