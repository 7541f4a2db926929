"""N function jobs: result, stdout, stderr, timing, ip_addr.

argv: node_port client_port [jobs=20] [secret=...] [wait=60] [give_up=0]
give_up > 0: if no job has been scheduled after that many seconds, cancel
all jobs and report (used for the wrong-secret scenario).
"""


def compute(n):
    import sys
    import time
    time.sleep(0.05)
    print('out-%d' % n)
    sys.stderr.write('err-%d\n' % n)
    return n * n + 1


if __name__ == '__main__':
    import _common as c

    def main():
        node_port, client_port, extra = c.ports()
        o = c.options(extra, jobs=20, secret='', wait=60.0, give_up=0.0)
        cluster, jobs, res = c.numbered(compute, node_port, client_port, o)
        c.finish(res, cluster)

    c.run(main, timeout=100)
