"""A program computation: JobCluster('<prog>') with args; result = exit code.

argv: node_port client_port prog_file
Each job gets args (tag, exit_code); the programs used by the tests print
their arguments to stdout and a line to stderr, then exit with exit_code.
"""

if __name__ == '__main__':
    import dispy
    import _common as c

    def main():
        node_port, client_port, extra = c.ports()
        prog = extra[0]
        cases = [('alpha', 0), ('beta two', 3), ('gamma', 7), ('delta', 0)]
        cluster = dispy.JobCluster(prog, nodes=['127.0.0.1'], ip_addr='127.0.0.1',
                                   node_port=node_port, port=client_port)
        jobs = []
        for i, (tag, code) in enumerate(cases):
            job = cluster.submit(tag, str(code))
            job.id = i
            jobs.append(job)
        c.STATE['_jobs'] = jobs
        res = {'all_final': c.wait_final(jobs, 60), 'cases': cases}
        res['jobs'] = [c.job_info(j) for j in jobs]
        c.finish(res, cluster)

    c.run(main, timeout=90)
