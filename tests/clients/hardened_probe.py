"""Jobs that report what a hardened service lets them do: write in their
directory and in /tmp, write elsewhere (/etc, the node's own files), change
their user id, and fork.

argv: node_port client_port [jobs=3] [secret=] [wait=60]
"""


def compute(n):
    import errno
    import os

    def attempt(action):
        try:
            action()
        except OSError as exc:
            return errno.errorcode.get(exc.errno, str(exc.errno))
        return 'ok'

    def write(path):
        with open(path, 'w') as fh:
            fh.write('x')
        os.unlink(path)

    def child():
        pid = os.fork()
        if pid == 0:
            os._exit(7)
        if os.waitpid(pid, 0)[1] >> 8 != 7:
            raise OSError(errno.ECHILD, 'child status')

    return {'cwd': attempt(lambda: write('job-%d.txt' % n)),
            'tmp': attempt(lambda: write('/tmp/dispy-job-%d-%d' % (n, os.getpid()))),
            'etc': attempt(lambda: write('/etc/dispy-job-%d' % n)),
            'setuid': attempt(lambda: os.setuid(65534)),
            'fork': attempt(child)}


if __name__ == '__main__':
    import _common as c

    def main():
        node_port, client_port, extra = c.ports()
        o = c.options(extra, jobs=3, secret='', wait=60.0)
        cluster = c.cluster(compute, node_port, client_port, secret=o['secret'])
        jobs = c.submit(cluster, [(n,) for n in range(o['jobs'])])
        c.finish(c.collect(cluster, jobs, wait=o['wait']), cluster)

    c.run(main, timeout=100)
