"""Cancel a running job that spawned a child process.

The job starts `sleep 600`, reports (its pid, the child's pid) as a
provisional result, then waits. The client cancels it, measures how long both
pids take to disappear, waits for the job's final status, then runs a new job
on the same cluster.

argv: node_port client_port
"""


def compute(kind):
    import os
    import subprocess
    import time
    if kind == 'sleeper':
        child = subprocess.Popen(['sleep', '600'])
        dispy_provisional_result({'pid': os.getpid(), 'child': child.pid})
        time.sleep(600)
        return 'not cancelled'
    return 'after-cancel %d' % os.getpid()


def pid_alive(pid):
    import os
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open('/proc/%d/stat' % pid) as f:
            state = f.read().rsplit(')', 1)[1].split()[0]
        return state not in ('Z', 'X')
    except (OSError, IndexError):
        return False


if __name__ == '__main__':
    import time
    import dispy
    import _common as c

    def main():
        node_port, client_port, extra = c.ports()
        cluster = dispy.JobCluster(compute, nodes=['127.0.0.1'], ip_addr='127.0.0.1',
                                   node_port=node_port, port=client_port)
        job = cluster.submit('sleeper')
        job.id = 'sleeper'
        c.STATE['_jobs'] = [job]
        res = {}
        c.STATE['res'] = res
        deadline = time.time() + 30
        while time.time() < deadline and not (job.status == dispy.DispyJob.ProvisionalResult
                                              and isinstance(job.result, dict)):
            time.sleep(0.05)
        res['provisional'] = c.jsonable(job.result)
        res['status_before_cancel'] = job.status
        if not isinstance(job.result, dict):
            res['no_provisional'] = True
            c.finish(res)   # exits without close: the job never reported
        pids = [job.result['pid'], job.result['child']]
        res['alive_before_cancel'] = [pid_alive(p) for p in pids]
        t0 = time.time()
        res['cancel_return'] = c.jsonable(cluster.cancel(job))
        gone_after = None
        while time.time() - t0 < 10:
            if not any(pid_alive(p) for p in pids):
                gone_after = time.time() - t0
                break
            time.sleep(0.02)
        res['pids_gone_after'] = gone_after
        res['alive_after'] = [pid_alive(p) for p in pids]
        # cancel() sets status Cancelled at once; the node's reply for the
        # terminated job then makes it Terminated
        deadline = time.time() + 20
        while time.time() < deadline and job.status != dispy.DispyJob.Terminated:
            time.sleep(0.05)
        res['sleeper_terminated'] = job.status == dispy.DispyJob.Terminated
        res['sleeper'] = c.job_info(job)
        job2 = cluster.submit('quick')
        job2.id = 'quick'
        c.STATE['_jobs'] = [job, job2]
        res['quick_final'] = c.wait_final([job2], 30)
        res['quick'] = c.job_info(job2)
        c.finish(res, cluster)

    c.run(main, timeout=90)
