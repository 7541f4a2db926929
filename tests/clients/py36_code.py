"""A computation valid only on Python 3.6: it uses ``async`` as a name
(Python 3.7 made it a keyword).  This file is Python 3.6 syntax on purpose:
only the legacy client runs it.

argv: node_port client_port [jobs=2]
"""


def compute(n):
    async = n + 1
    return async * 2


if __name__ == '__main__':
    import _common as c

    def main():
        node_port, client_port, extra = c.ports()
        o = c.options(extra, jobs=2)
        cluster = c.cluster(compute, node_port, client_port)
        jobs = c.submit(cluster, [(n,) for n in range(o['jobs'])])
        c.finish(c.collect(cluster, jobs, wait=40, give_up=15), cluster)

    c.run(main, timeout=90)
