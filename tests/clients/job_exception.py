"""Jobs that raise (odd n) and jobs that succeed (even n).

argv: node_port client_port [jobs=4]
"""


def compute(n):
    if n % 2:
        raise ValueError('boom-%d' % n)
    return n


if __name__ == '__main__':
    import _common as c

    def main():
        node_port, client_port, extra = c.ports()
        o = c.options(extra, jobs=4)
        cluster = c.cluster(compute, node_port, client_port)
        jobs = c.submit(cluster, [(n,) for n in range(o['jobs'])])
        c.finish(c.collect(cluster, jobs, wait=60), cluster)

    c.run(main, timeout=90)
