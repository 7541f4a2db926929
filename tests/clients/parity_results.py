"""Jobs whose results or provisional results a Python 3.6 client cannot
load or the node cannot pickle, and provisional results then an exception.

argv: node_port client_port [cases=a,b,...]
Each case is one job (run one after another, so a stuck job shows):
  zoneinfo     returns zoneinfo.ZoneInfo('UTC')
  group        returns an ExceptionGroup instance
  plain        returns 42
  prov_zone    dispy_provisional_result(ZoneInfo) -> its return value, then 'done'
  prov_lambda  dispy_provisional_result(a lambda) -> its return value, then 'done'
  prov_raise   two provisional results (1, 2), then raises ValueError
"""


def compute(case):
    import time
    if case == 'zoneinfo':
        import zoneinfo
        return zoneinfo.ZoneInfo('UTC')
    if case == 'group':
        return ExceptionGroup('two', [ValueError(1), KeyError(2)])
    if case == 'plain':
        return 42
    if case == 'prov_zone':
        import zoneinfo
        return ['done', dispy_provisional_result(zoneinfo.ZoneInfo('UTC'))]
    if case == 'prov_lambda':
        return ['done', dispy_provisional_result(lambda: 0)]
    if case == 'prov_raise':
        dispy_provisional_result(1)
        time.sleep(0.2)
        dispy_provisional_result(2)
        time.sleep(0.2)
        raise ValueError('after provisional results')
    return None


if __name__ == '__main__':
    import _common as c

    def main():
        node_port, client_port, extra = c.ports()
        o = c.options(extra, cases='zoneinfo,plain')
        cluster = c.cluster(compute, node_port, client_port)
        jobs = []
        c.STATE['_jobs'] = jobs
        res = {'jobs': []}
        for case in o['cases'].split(','):
            job = cluster.submit(case)
            job.id = case
            jobs.append(job)
            final = c.wait_final([job], 20)
            res['jobs'].append(c.job_info(job, case=case, final=final))
            if not final:
                break
        res['all_final'] = all(j['final'] for j in res['jobs'])
        c.finish(res, cluster)

    c.run(main, timeout=100)
