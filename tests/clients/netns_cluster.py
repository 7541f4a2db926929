"""A JobCluster on a real (namespace) network: discovery, job spreading,
node failures.

argv: key=value options (no node_port/client_port: the defaults 51348 and
51347 are used unless given):
  ip_addr=       client address (JobCluster ip_addr); '' = not given
  nodes=         JSON list for JobCluster nodes= ('' = not given: '*',
                 i.e. broadcast discovery); [host, port] items become tuples
  node_port=0 port=0   0 = dispy's defaults
  expect_nodes=0 wait until this many nodes were initialized before
                 submitting (node_wait seconds at most)
  node_wait=20
  jobs=6 sleep=0.2     jobs compute(n, sleep) -> n*n+1
  pulse_interval=0 reentrant=false ping_interval=0 (0 = not given)
  debug=false    JobCluster loglevel DEBUG (to stderr)
  marker_dir=    writes files there: 'started' (cluster created),
                 'node-<ip>' (node initialized), 'submitted',
                 'running-<ip>' (first job running on ip)
  wait=60        seconds for all jobs to become final
Prints RESULT: {nodes: {ip: {name, cpus}}, jobs: [...], ran_on: {id: [ips]},
all_final, closed, ...}.
"""


def compute(n, sleep):
    import time
    time.sleep(sleep)
    return n * n + 1


if __name__ == '__main__':
    import json
    import os
    import threading
    import time
    import dispy
    import _common as c

    def main():
        o = c.options(c.sys.argv[1:], ip_addr='', nodes='', node_port=0, port=0,
                      expect_nodes=0, node_wait=20.0, jobs=6, sleep=0.2, pulse_interval=0.0,
                      reentrant=False, ping_interval=0.0, debug=False,
                      marker_dir='', wait=60.0, secret='')
        lock = threading.Lock()
        nodes = {}
        ran_on = {}
        events = []
        running_marked = set()

        def mark(name):
            if o['marker_dir']:
                path = os.path.join(o['marker_dir'], name)
                with open(path + '.tmp', 'w') as f:
                    f.write('%f\n' % time.time())
                os.rename(path + '.tmp', path)

        def status_cb(status, node, job):
            with lock:
                events.append((time.time(), status, node.ip_addr if node else None,
                               job.args[0] if job is not None else None))
                if status == dispy.DispyNode.Initialized:
                    new = node.ip_addr not in nodes
                    nodes[node.ip_addr] = {'name': node.name, 'cpus': node.cpus}
                    if new:
                        mark('node-%s' % node.ip_addr)
                elif status == dispy.DispyJob.Running and job is not None:
                    # job.id is set only after submit() returns, which
                    # may be after the job started: key by its argument n
                    ran_on.setdefault(job.args[0], []).append(node.ip_addr)
                    if node.ip_addr not in running_marked:
                        running_marked.add(node.ip_addr)
                        mark('running-%s' % node.ip_addr)

        kw = {'cluster_status': status_cb, 'secret': o['secret']}
        if o['ip_addr']:
            kw['ip_addr'] = o['ip_addr']
        if o['nodes']:
            kw['nodes'] = [tuple(n) if isinstance(n, list) else n
                           for n in json.loads(o['nodes'])]
        if o['node_port']:
            kw['node_port'] = o['node_port']
        if o['port']:
            kw['port'] = o['port']
        if o['ping_interval']:
            kw['ping_interval'] = o['ping_interval']
        if o['debug']:
            import logging
            kw['loglevel'] = logging.DEBUG
        if o['pulse_interval']:
            kw['pulse_interval'] = o['pulse_interval']
            kw['reentrant'] = o['reentrant']
        t0 = time.time()
        cluster = dispy.JobCluster(compute, **kw)
        mark('started')
        res = {'t0': t0, 'nodes': nodes, 'ran_on': ran_on}
        c.STATE.update(res)
        if o['expect_nodes']:
            deadline = time.time() + o['node_wait']
            while time.time() < deadline:
                with lock:
                    if len(nodes) >= o['expect_nodes']:
                        break
                time.sleep(0.05)
            with lock:
                res['nodes_before_submit'] = sorted(nodes)
        jobs = c.submit(cluster, [(n, o['sleep']) for n in range(o['jobs'])])
        mark('submitted')
        res['all_final'] = c.wait_final(jobs, o['wait'])
        res['t1'] = time.time()
        with lock:
            res['jobs'] = [c.job_info(j) for j in jobs]
            res['nodes'] = dict(nodes)
            res['ran_on'] = dict((str(k), v) for k, v in ran_on.items())
            res['events'] = list(events)
        try:
            res['status_nodes'] = [{'ip_addr': n.ip_addr, 'name': n.name, 'cpus': n.cpus,
                                    'jobs_done': n.jobs_done}
                                   for n in cluster.status().nodes]
        except Exception as exc:
            res['status_nodes_error'] = repr(exc)
        c.finish(res, cluster)

    c.run(main, timeout=120)
