"""File transfer as a user waits for it, one direction per run.

argv: node_port client_port node_pid path[,path...] mode=in|out [wait=300]

One transfer per path (the same size; hard links of one file under
different names, so the node can't answer "have it"); the result holds
each run and the medians of elapsed, cpu_s and mb_per_s.

A warm-up job first sets the computation up (discovery, COMPUTE, the
node's worker), so the measured window holds the transfer alone:

- ``in``: ``submit(..., dispy_job_depends=[path])``; the time is from just
  before ``submit()`` until the node's copy is complete on its disk: the
  job returns its copy's ``st_ctime`` (set by the last metadata change the
  node makes when the bytes are all written: the original's chmod, our
  rename; the same clock on one machine).
- ``out``: the job hard-links ``path`` into its directory as a result file
  and times ``dispy_send_file()`` of it, which returns once the client has
  written every byte and acknowledged; the client's copy is checked and
  deleted.

Node CPU: ``utime+stime+cutime+cstime`` of the node and its live
descendants (as ``bench/run.py`` counts it) just before ``submit()`` and
after the job's process has been reaped.
"""


def compute(mode, arg):
    import os
    import time
    if mode == 'warm':
        return 0
    if mode == 'in':
        st = os.stat(arg)
        return {'size': st.st_size, 'ctime': st.st_ctime, 'start': time.time()}
    name = 'result-' + os.path.basename(arg)
    try:
        os.link(arg, name)
    except OSError:
        import shutil
        shutil.copyfile(arg, name)
    t0 = time.time()
    status = dispy_send_file(name)  # noqa: F821 (the node provides it)
    t1 = time.time()
    hwm = 0
    with open('/proc/self/status') as fh:
        for line in fh:
            if line.startswith('VmHWM:'):
                hwm = int(line.split()[1])
    os.unlink(name)
    return {'status': status, 'send_s': t1 - t0, 'job_hwm_kb': hwm, 'name': name}


def tree_ticks(pid):
    import os
    import _bench as b
    total = 0
    for p in b.tree(pid):
        try:
            with open('/proc/%d/stat' % p, 'rb') as fh:
                data = fh.read()
        except (IOError, OSError):
            continue
        f = data[data.rfind(b')') + 2:].split()
        total += sum(int(x) for x in f[11:15])
    return total / float(os.sysconf('SC_CLK_TCK'))


if __name__ == '__main__':
    import os
    import sys
    import time
    import dispy
    import _bench as b

    def main():
        node_pid, paths = int(sys.argv[3]), sys.argv[4].split(',')
        sys.argv[3:5] = []
        node_port, client_port, o = b.args(mode='in', wait=300.0)
        size = os.path.getsize(paths[0])
        cluster = dispy.JobCluster(compute, nodes=['127.0.0.1'], ip_addr='127.0.0.1',
                                   node_port=node_port, port=client_port)
        warm = cluster.submit('warm', None)
        if not warm.finish.wait(60) or warm.status != b.FINISHED:
            b.finish({'error': 'warm-up job: status %s %s' % (warm.status, warm.exception),
                      'hang': warm.status != b.FINISHED}, cluster, 10)
        runs = []
        b.STATE['runs'] = runs
        for path in paths:
            run = measure(cluster, node_pid, path, size, o)
            runs.append(run)
            if 'error' in run:
                b.finish({'error': run['error'], 'hang': run.get('hang', False),
                          'runs': runs}, cluster, 10)
        res = {'size': size, 'runs': runs}
        for key in ('elapsed', 'cpu_s', 'mb_per_s'):
            res[key] = sorted(r[key] for r in runs)[len(runs) // 2]
        res['job_hwm_kb'] = max(r.get('job_hwm_kb', 0) for r in runs)
        b.finish(res, cluster)

    def measure(cluster, node_pid, path, size, o):
        # Start every transfer with no dirty pages: the writeback of the last
        # one (2 GB) would otherwise throttle this one's writes, and penalize
        # whichever node runs second.
        os.sync()
        time.sleep(0.3)     # let the node settle (our node refills its spare worker)
        procs0 = len(b.tree(node_pid))
        cpu0 = tree_ticks(node_pid)
        t0 = time.time()
        if o['mode'] == 'in':
            job = cluster.submit('in', os.path.basename(path), dispy_job_depends=[path])
        else:
            job = cluster.submit('out', path)
        if not job.finish.wait(o['wait']):
            return {'error': 'no result in %ss' % o['wait'], 'hang': True}
        t_result = time.time()
        # the job process exits and is reaped: its CPU moves to its parent
        deadline = time.time() + 5
        while len(b.tree(node_pid)) > procs0 and time.time() < deadline:
            time.sleep(0.01)
        cpu1 = tree_ticks(node_pid)
        res = {'cpu_s': cpu1 - cpu0, 'to_result_s': t_result - t0}
        r = job.result
        if job.status != b.FINISHED or not isinstance(r, dict):
            res['error'] = 'job failed: status %s result %r exception %s' % (
                job.status, r, (job.exception or '')[-1500:])
        elif o['mode'] == 'in':
            res['elapsed'] = r['ctime'] - t0
            if r['size'] != size or res['elapsed'] <= 0:
                res['error'] = 'bad copy: %r (t0 %.3f)' % (r, t0)
        else:
            res['elapsed'] = r['send_s']
            res['job_hwm_kb'] = r['job_hwm_kb']
            got = os.path.join(os.getcwd(), r['name'])
            have = os.path.getsize(got) if os.path.exists(got) else None
            if r['status'] != 0 or have != size:
                res['error'] = 'dispy_send_file returned %s; client copy %s of %d bytes' % (
                    r['status'], have, size)
            if have is not None:
                os.unlink(got)
        if 'error' not in res:
            res['mb_per_s'] = size / 1048576.0 / res['elapsed']
        return res

    b.run(main)
