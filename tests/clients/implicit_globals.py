"""Job code that uses modules it never imports (time, os, socket, sys, ...):
the 4.5.5 node's jobs saw the modules the node process had imported.

argv: node_port client_port
Job 0 uses the names; job 1 reports which module names its globals hold and
which other names (not user code) it sees.
"""


def compute(n):
    if n == 0:
        t = time.time()
        return [t > 0, os.getpid() > 0, socket.gethostname() != '',
                sys.version_info[0], pickle.dumps(1) != b'', len(traceback.format_stack()) > 0,
                subprocess.PIPE, signal.SIGTERM.value if hasattr(signal.SIGTERM, 'value') else 15,
                threading.current_thread() is not None, tempfile.gettempdir() != '',
                shutil.which('sh') is not None, io.StringIO('x').read(), glob.escape('a'),
                functools.reduce(lambda a, b: a + b, [1, 2]), marshal.loads(marshal.dumps(2)),
                logging.getLogger('x').name, stat.S_IFREG, inspect.isfunction(compute)]
    g = globals()
    mods = sorted(k for k, v in g.items() if type(v).__name__ == 'module')
    other = sorted(k for k, v in g.items() if type(v).__name__ != 'module'
                   and k not in ('compute', '__builtins__'))
    return {'modules': mods, 'other': other}


if __name__ == '__main__':
    import _common as c

    def main():
        node_port, client_port, extra = c.ports()
        cluster = c.cluster(compute, node_port, client_port)
        jobs = c.submit(cluster, [(0,), (1,)])
        c.finish(c.collect(cluster, jobs, wait=40), cluster)

    c.run(main, timeout=60)
