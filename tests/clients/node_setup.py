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
    import _common as c

    def main():
        node_port, client_port, extra = c.ports()
        data_file = extra[0]
        o = c.options(extra[1:], jobs=10)
        cluster = c.cluster(compute, node_port, client_port, depends=[data_file],
                            setup=functools.partial(setup, os.path.basename(data_file)),
                            cleanup=cleanup)
        jobs = c.submit(cluster, [(n,) for n in range(o['jobs'])])
        c.finish(c.collect(cluster, jobs, wait=60), cluster)

    c.run(main, timeout=90)
