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
    import dispy
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
        cluster = dispy.JobCluster(compute, nodes=['127.0.0.1'], ip_addr='127.0.0.1',
                                   node_port=node_port, port=client_port, depends=[dep],
                                   cleanup=o['cleanup'], **kw)
        jobs = []
        for n in range(o['jobs']):
            job = cluster.submit(os.path.basename(dep), n, o['write'])
            job.id = n
            jobs.append(job)
        c.STATE['_jobs'] = jobs
        res = {}
        if o['give_up'] > 0:
            c.give_up_if_unscheduled(cluster, jobs, o['give_up'], res)
        res['all_final'] = c.wait_final(jobs, 60)
        res['jobs'] = [c.job_info(j) for j in jobs]
        c.finish(res, cluster)

    c.run(main, timeout=90)
