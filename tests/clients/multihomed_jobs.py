"""A client that announces one address (ip_addr=..., where its own servers
listen) while its requests to the node come from another source address.

argv: node_port client_port [ip_addr=127.0.0.2] [node=127.0.0.1] [jobs=4]
      [cancel=0] (cancel=1: one extra long job, cancelled while it runs)
      [ext_ip_addr=] (JobCluster ext_ip_addr: the client's NAT address)
      [ping_interval=0] (0 = not given)
"""


def setup():
    global FACTOR
    FACTOR = 3
    return 0


def compute(n):
    import os
    import time
    time.sleep(0.05)
    if n < 0:
        time.sleep(30)
    # this script itself was sent as a dependency (FILEXFER)
    return [n * FACTOR, os.path.isfile('multihomed_jobs.py')]


if __name__ == '__main__':
    import time
    import _common as c

    def main():
        node_port, client_port, extra = c.ports()
        o = c.options(extra, ip_addr='127.0.0.2', node='127.0.0.1', jobs=4, cancel=0,
                      ext_ip_addr='', ping_interval=0.0)
        kw = {}
        if o['ext_ip_addr']:
            kw['ext_ip_addr'] = o['ext_ip_addr']
        if o['ping_interval']:
            kw['ping_interval'] = o['ping_interval']
        cluster = c.cluster(compute, node_port, client_port, nodes=[o['node']],
                            ip_addr=o['ip_addr'], setup=setup, depends=[__file__], **kw)
        jobs = c.submit(cluster, [(n,) for n in range(o['jobs'])])
        res = {}
        c.give_up_if_unscheduled(cluster, jobs, 20, res)
        if o['cancel']:
            long_job = cluster.submit(-1)
            long_job.id = -1
            c.wait_until(lambda: long_job.status == c.status().Running, 20)
            time.sleep(0.3)
            cluster.cancel(long_job)
            jobs.append(long_job)
        c.finish(c.collect(cluster, jobs, res, wait=40), cluster)

    c.run(main, timeout=80)
