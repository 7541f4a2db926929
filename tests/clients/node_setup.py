"""Adapted from dispy's examples/node_setup.py: a depends data file read by a
functools.partial setup into globals; cleanup deletes them.

argv: node_port client_port data_file [jobs=10]
data_file is a name relative to the client's cwd; setup gets only the base
name so the node must read its transferred copy.
"""


def setup(data_file):
    global data, algorithms
    import hashlib
    import sys
    data = open(data_file, 'rb').read()
    algorithms = sorted(a for a in hashlib.algorithms_guaranteed if not a.startswith('shake'))
    return 0


def cleanup():
    global data, algorithms
    del data, algorithms


def compute(n):
    import hashlib
    alg = algorithms[n % len(algorithms)]
    csum = getattr(hashlib, alg)()
    csum.update(data)
    return (alg, csum.hexdigest())


if __name__ == '__main__':
    import functools
    import os
    import dispy
    import _common as c

    def main():
        node_port, client_port, extra = c.ports()
        data_file = extra[0]
        o = c.options(extra[1:], jobs=10)
        cluster = dispy.JobCluster(compute, nodes=['127.0.0.1'], ip_addr='127.0.0.1',
                                   node_port=node_port, port=client_port, depends=[data_file],
                                   setup=functools.partial(setup, os.path.basename(data_file)),
                                   cleanup=cleanup)
        jobs = []
        for n in range(o['jobs']):
            job = cluster.submit(n)
            job.id = n
            jobs.append(job)
        c.STATE['_jobs'] = jobs
        res = {'all_final': c.wait_final(jobs, 60)}
        res['jobs'] = [c.job_info(j) for j in jobs]
        c.finish(res, cluster)

    c.run(main, timeout=90)
