"""Jobs that end in different ways, for the operating tests (drain,
control commands, terminated reasons, job log lines).

argv: node_port client_port [modes=sleep] [seconds=1.0] [mb=600]
      [nodes=127.0.0.1] [wait=60] [say_running=0]

One job per comma-separated mode (job.id is its index):
  sleep   - sleep ``seconds``, return n
  raise   - raise ValueError
  signal  - the job process kills itself with SIGKILL
  exit    - the job process calls os._exit(3)
  alloc   - allocate ``mb`` MB (a --job_memory node refuses it)
  timeout - sleep 60 s (a --job_timeout node ends it)
  cancel  - report a provisional result, then sleep 60 s; the client
            cancels it once it has reported
With say_running=1 the client prints ``RUNNING:<count>`` once every job is
Running (or reported).  RESULT holds each job's info.
"""


def compute(n, mode, seconds, mb):
    import os
    import signal
    import time
    if mode == 'sleep':
        time.sleep(seconds)
        return n
    if mode == 'raise':
        raise ValueError('boom-%d' % n)
    if mode == 'signal':
        os.kill(os.getpid(), signal.SIGKILL)
    if mode == 'exit':
        os._exit(3)
    if mode == 'alloc':
        return len(bytearray(mb * 1024 * 1024))
    if mode == 'timeout':
        time.sleep(60)
        return n
    if mode == 'cancel':
        dispy_provisional_result('running')
        time.sleep(60)
        return n
    raise ValueError('unknown mode %r' % mode)


if __name__ == '__main__':
    import _common as c

    def main():
        node_port, client_port, extra = c.ports()
        o = c.options(extra, modes='sleep', seconds=1.0, mb=600, nodes='127.0.0.1',
                      wait=60.0, say_running=0)
        modes = o['modes'].split(',')
        cluster = c.cluster(compute, node_port, client_port, nodes=o['nodes'].split(','))
        jobs = c.submit(cluster, [(n, m, o['seconds'], o['mb']) for n, m in enumerate(modes)])
        s = c.status()
        cancels = [j for j, m in zip(jobs, modes) if m == 'cancel']
        for job in cancels:
            c.wait_until(lambda: job.status == s.ProvisionalResult, 30, 0.02)
            cluster.cancel(job)
        if o['say_running']:
            c.wait_until(lambda: all(j.status in (s.Running, s.ProvisionalResult)
                                     for j in jobs), 30)
            c.say('RUNNING', len(jobs))
        res = c.collect(cluster, jobs, wait=o['wait'])
        res['modes'] = modes
        c.finish(res, cluster)

    c.run(main, timeout=100)
