"""A depends file whose content each job reads; jobs report where the node
put it (absolute path) and its content. Used to check removal at close.

argv: node_port client_port dep_file [jobs=3] [dest_path=] [cleanup=1]
      [force_dest_path=] [give_up=0] [write=1]
write: jobs also write a file out-<n>-<dep name> in their cwd.
force_dest_path: sent verbatim (bypasses the client's stripping of '/').
give_up > 0: cancel all jobs if none is scheduled within that many seconds.
"""


def compute(name, n, write):
    import os
    with open(name) as f:
        content = f.read()
    out = 'out-%d-%s' % (n, name)
    if write:
        with open(out, 'w') as f:
            f.write('written by job %d\n' % n)
    return {'dep_path': os.path.abspath(name), 'content': content, 'cwd': os.getcwd(),
            'out_path': os.path.abspath(out)}


if __name__ == '__main__':
    import os
    import _common as c

    def main():
        node_port, client_port, extra = c.ports()
        dep = extra[0]
        o = c.options(extra[1:], jobs=3, dest_path='', cleanup=True, force_dest_path='',
                      give_up=0.0, write=True)
        if o['force_dest_path']:
            c.force_dest_path(o['force_dest_path'])
        kw = {}
        if o['dest_path']:
            kw['dest_path'] = o['dest_path']
        cluster = c.cluster(compute, node_port, client_port, depends=[dep],
                            cleanup=o['cleanup'], **kw)
        jobs = c.submit(cluster, [(os.path.basename(dep), n, o['write'])
                                  for n in range(o['jobs'])])
        c.finish(c.collect(cluster, jobs, wait=60, give_up=o['give_up']), cluster)

    c.run(main, timeout=90)
