"""SharedJobCluster through a dispyscheduler on this host (namespace
networks): N jobs spread over the scheduler's nodes.

argv: key=value: ip_addr= (this host's address; the scheduler's too)
  scheduler_port=51349 port=0 (0: dispy's default) jobs=12 sleep=0.3 wait=60
Prints RESULT: {jobs: [...], all_final, closed}.
"""


def compute(n, sleep):
    import time
    time.sleep(sleep)
    return n * n + 1


if __name__ == '__main__':
    import dispy
    import _common as c

    def main():
        o = c.options(c.sys.argv[1:], ip_addr='', scheduler_port=51349, port=0, jobs=12,
                      sleep=0.3, wait=60.0)
        kw = {'port': o['port']} if o['port'] else {}
        cluster = dispy.SharedJobCluster(compute, scheduler_node=o['ip_addr'],
                                         scheduler_port=o['scheduler_port'],
                                         ip_addr=o['ip_addr'], **kw)
        jobs = c.submit(cluster, [(n, o['sleep']) for n in range(o['jobs'])])
        c.finish(c.collect(cluster, jobs, wait=o['wait']), cluster, close_timeout=20)

    c.run(main, timeout=120)
