"""Adapted from dispy's examples/obj_instances.py: instances of a depends
class are sent as job arguments; with mode=return the job also returns an
instance of that class (this hangs the original 4.5.5 node).

argv: node_port client_port [jobs=6] [mode=args|return]
"""


class C:
    def __init__(self, i, n):
        self.i = i
        self.n = n

    def show(self):
        print('%s: %.2f' % (self.i, self.n))


def compute(obj, mode):
    import time
    time.sleep(obj.n)
    obj.show()
    if mode == 'return':
        return C(obj.i * 10, obj.n * 2)
    return obj.n


if __name__ == '__main__':
    import _common as c

    def main():
        node_port, client_port, extra = c.ports()
        o = c.options(extra, jobs=6, mode='args')
        cluster = c.cluster(compute, node_port, client_port, depends=[C])
        jobs = c.submit(cluster, [(C(i, 0.1 + 0.05 * i), o['mode']) for i in range(o['jobs'])])
        res = {'all_final': c.wait_final(jobs, 40)}
        infos = []
        for j in jobs:
            info = c.job_info(j)
            r = j.result
            info['result_type'] = type(r).__name__
            info['result_class_module'] = type(r).__module__
            if isinstance(r, C):
                info['result'] = {'i': r.i, 'n': r.n}
            infos.append(info)
        res['jobs'] = infos
        c.finish(res, cluster)

    c.run(main, timeout=70)
