"""Many tiny function jobs (load and stability runs).

argv: node_port client_port [jobs=200] [secret=...] [wait=100] [give_up=0]
Reports compact results: res['results'] = [[id, status, result], ...] and
res['bad'] = the full info of up to 10 jobs that did not finish correctly.
"""


def compute(n):
    return n * 2 + 1


if __name__ == '__main__':
    import _common as c

    def main():
        node_port, client_port, extra = c.ports()
        o = c.options(extra, jobs=200, secret='', wait=100.0, give_up=0.0)
        cluster, jobs, res = c.numbered(compute, node_port, client_port, o, detail=False)
        res['results'] = [[j.id, j.status, j.result] for j in jobs]
        res['bad'] = [c.job_info(j) for j in jobs
                      if j.status != c.status().Finished or j.result != j.id * 2 + 1][:10]
        c.finish(res, cluster)

    c.run(main, timeout=300)
