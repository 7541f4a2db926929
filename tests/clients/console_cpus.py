"""One job that waits for a file; meanwhile the node's CPU count is lowered
from its console.

argv: node_port client_port flag=<path> [wait=20]

Prints ``RUNNING:<cpus>`` (the node's CPU count as the client knows it)
once the job runs, then polls cluster.status() until the count changes
(at most ``wait`` s) and creates nothing itself: the test creates ``flag``
so the job returns.  RESULT: {'before', 'after', 'job'}.
"""


def compute(flag):
    import os
    import time
    deadline = time.time() + 60
    while not os.path.exists(flag) and time.time() < deadline:
        time.sleep(0.05)
    return 'done'


if __name__ == '__main__':
    import time
    import dispy
    import _common as c

    def node_cpus(cluster):
        nodes = list(cluster.status().nodes)
        return nodes[0].cpus if nodes else None

    def main():
        node_port, client_port, extra = c.ports()
        o = c.options(extra, flag='', wait=20.0)
        cluster = c.cluster(compute, node_port, client_port)
        job, = c.submit(cluster, [(o['flag'],)])
        c.wait_until(lambda: job.status == dispy.DispyJob.Running, o['wait'], 0.02)
        before = node_cpus(cluster)
        c.say('RUNNING', before)
        deadline = time.time() + o['wait']
        after = before
        while time.time() < deadline and after == before:
            time.sleep(0.05)
            after = node_cpus(cluster)
        res = {'before': before, 'after': after, 'all_final': c.wait_final([job], o['wait'])}
        res['job'] = c.job_info(job)
        c.finish(res, cluster, close_timeout=10)

    c.run(main, timeout=60)
