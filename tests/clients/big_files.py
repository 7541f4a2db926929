"""Multi-megabyte files both ways, optionally over TLS: a cluster depends
file (to the node) whose copy each job hashes, and a per-job depends file
(``dispy_job_depends``); each job then sends a file of its own back with
``dispy_send_file``, which the client saves under its cwd.

argv: node_port client_port dep=PATH jobdep=PATH [back=5000000] [jobs=2]
      [certfile=PATH] [keyfile=PATH] [wait=60]
"""


def compute(n, dep, jobdep, back):
    import hashlib
    import os

    def digest(path):
        h = hashlib.sha256()
        with open(path, 'rb') as f:
            for block in iter(lambda: f.read(1 << 20), b''):
                h.update(block)
        return h.hexdigest()
    name = 'back-%d.bin' % n
    block = hashlib.sha256(b'back-%d' % n).digest() * 4096
    with open(name, 'wb') as f:
        left = back
        while left:
            f.write(block[:left])
            left -= min(left, len(block))
    return {'dep': digest(dep), 'jobdep': digest(jobdep), 'name': name,
            'back_sha256': digest(name), 'send_status': dispy_send_file(name)}


if __name__ == '__main__':
    import hashlib
    import os
    import _common as c

    def digest(path):
        with open(path, 'rb') as f:      # files of a few MB: read whole
            return hashlib.sha256(f.read()).hexdigest()

    def main():
        node_port, client_port, extra = c.ports()
        o = c.options(extra, dep='', jobdep='', back=5000000, jobs=2, certfile='',
                      keyfile='', wait=60.0)
        if o['certfile']:
            from tls_jobs import fix_asyncoro_connect_race
            fix_asyncoro_connect_race()
        cluster = c.cluster(compute, node_port, client_port, depends=[o['dep']],
                            certfile=o['certfile'] or None, keyfile=o['keyfile'] or None)
        jobs = c.submit(cluster, [(n, os.path.basename(o['dep']), os.path.basename(o['jobdep']),
                                   o['back']) for n in range(o['jobs'])],
                        dispy_job_depends=[o['jobdep']])
        res = c.collect(cluster, jobs, wait=o['wait'])
        res.update(dep=digest(o['dep']), jobdep=digest(o['jobdep']))
        res['received'] = dict((name, {'size': os.path.getsize(name), 'sha256': digest(name)})
                               for name in os.listdir('.') if name.startswith('back-'))
        c.finish(res, cluster)

    c.run(main, timeout=100)
