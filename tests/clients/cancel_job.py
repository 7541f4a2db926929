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


if __name__ == '__main__':
    import time
    import dispy
    import _common as c

    def main():
        node_port, client_port, extra = c.ports()
        cluster = c.cluster(compute, node_port, client_port)
        job, = c.submit(cluster, [('sleeper',)], ids=['sleeper'])
        res = {}
        c.STATE['res'] = res
        c.wait_provisional_dicts([job], 30)
        res['provisional'] = c.jsonable(job.result)
        res['status_before_cancel'] = job.status
        if not isinstance(job.result, dict):
            res['no_provisional'] = True
            c.finish(res)   # exits without close: the job never reported
        pids = [job.result['pid'], job.result['child']]
        res['alive_before_cancel'] = [c.pid_alive(p) for p in pids]
        t0 = time.time()
        res['cancel_return'] = c.jsonable(cluster.cancel(job))
        gone = c.wait_until(lambda: not any(c.pid_alive(p) for p in pids), 10, 0.02)
        res['pids_gone_after'] = time.time() - t0 if gone else None
        res['alive_after'] = [c.pid_alive(p) for p in pids]
        # cancel() sets status Cancelled at once; the node's reply for the
        # terminated job then makes it Terminated
        res['sleeper_terminated'] = c.wait_until(
            lambda: job.status == dispy.DispyJob.Terminated, 20)
        res['sleeper'] = c.job_info(job)
        job2, = c.submit(cluster, [('quick',)], ids=['quick'])
        c.STATE['_jobs'] = [job, job2]
        res['quick_final'] = c.wait_final([job2], 30)
        res['quick'] = c.job_info(job2)
        c.finish(res, cluster)

    c.run(main, timeout=90)
