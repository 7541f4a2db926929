"""SharedJobCluster through a dispyscheduler: N function jobs.

argv: node_port client_port scheduler_port=P [jobs=6] [tag=a] [wait=40]

(node_port is unused by the client: the scheduler talks to the node.)
"""


def compute(n, tag):
    import os
    import time
    time.sleep(0.1)
    print('shared-%s-%d' % (tag, n))
    return {'n': n, 'tag': tag, 'value': n * 3 + 1, 'pid': os.getpid()}


if __name__ == '__main__':
    import dispy
    import _common as c

    def main():
        node_port, client_port, extra = c.ports()
        o = c.options(extra, scheduler_port=0, jobs=6, tag='a', wait=40.0)
        cluster = dispy.SharedJobCluster(compute, nodes=['127.0.0.1'],
                                         scheduler_node='127.0.0.1',
                                         scheduler_port=o['scheduler_port'],
                                         ip_addr='127.0.0.1', port=client_port)
        jobs = c.submit(cluster, [(n, o['tag']) for n in range(o['jobs'])])
        c.finish(c.collect(cluster, jobs, wait=o['wait']), cluster, close_timeout=20)

    c.run(main, timeout=60)
