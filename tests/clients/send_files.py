"""Each job writes a file of a given size with deterministic content and
sends it back with dispy_send_file; the client saves it under its cwd.

argv: node_port client_port [sizes=102400,204800,307200,409600]
"""


def compute(n, size):
    import hashlib
    import os
    name = 'result-%d.bin' % n
    block = hashlib.sha256(b'dispy-%d' % n).digest()
    data = (block * (size // len(block) + 1))[:size]
    with open(name, 'wb') as f:
        f.write(data)
    status = dispy_send_file(name)
    return {'name': name, 'size': size, 'sha256': hashlib.sha256(data).hexdigest(),
            'send_status': status}


if __name__ == '__main__':
    import hashlib
    import os
    import _common as c

    def main():
        node_port, client_port, extra = c.ports()
        o = c.options(extra, sizes='102400,204800,307200,409600')
        sizes = [int(s) for s in o['sizes'].split(',')]
        cluster = c.cluster(compute, node_port, client_port)
        jobs = c.submit(cluster, list(enumerate(sizes)))
        res = c.collect(cluster, jobs, {'cwd': os.getcwd()}, wait=60)
        received = {}
        for n in range(len(sizes)):
            name = 'result-%d.bin' % n
            if os.path.exists(name):
                with open(name, 'rb') as f:
                    data = f.read()
                received[name] = {'size': len(data),
                                  'sha256': hashlib.sha256(data).hexdigest()}
        res['received'] = received
        c.finish(res, cluster)

    c.run(main, timeout=90)
