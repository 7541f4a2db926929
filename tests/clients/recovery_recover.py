"""Collect the results of a dead client with dispy.recover_jobs.

argv: node_port client_port recover_file=PATH [timeout=20]

recover_jobs binds the dead client's port (from the recover file) and asks
every node in it to resend; prints RESULT with the jobs it got back and
whether the recover file was removed (it is when all results arrived).
"""

if __name__ == '__main__':
    import os
    import time
    import dispy
    import _common as c

    def main():
        node_port, client_port, extra = c.ports()
        o = c.options(extra, recover_file='', timeout=20.0)
        t0 = time.time()
        jobs = dispy.recover_jobs(o['recover_file'], timeout=o['timeout'])
        t1 = time.time()
        left = [ext for ext in ('', '.db', '.bak', '.dat', '.dir')
                if os.path.isfile(o['recover_file'] + ext)]
        c.emit({'jobs': [c.job_info(j) for j in jobs], 'elapsed': t1 - t0,
                'recover_files_left': left})
        os._exit(0)

    c.run(main, timeout=60)
