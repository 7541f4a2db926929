"""A program computation: JobCluster('<prog>') with args; result = exit code.

argv: node_port client_port prog_file
Each job gets args (tag, exit_code); the programs used by the tests print
their arguments to stdout and a line to stderr, then exit with exit_code.
"""

if __name__ == '__main__':
    import _common as c

    def main():
        node_port, client_port, extra = c.ports()
        prog = extra[0]
        cases = [('alpha', 0), ('beta two', 3), ('gamma', 7), ('delta', 0)]
        cluster = c.cluster(prog, node_port, client_port)
        jobs = c.submit(cluster, [(tag, str(code)) for tag, code in cases])
        c.finish(c.collect(cluster, jobs, {'cases': cases}, wait=60), cluster)

    c.run(main, timeout=90)
