"""Jobs that act on files, as the node's job user (issue 20: --job_user
separates clients).

argv: node_port client_port [dest_path=] [actions=JSON] [wait=40]

``actions`` is a JSON list of [action, path]; job i runs probe(*actions[i]):
'write' writes ``path`` (relative: in the job's directory) and returns its
absolute path; 'read' returns 'read:' + its text, 'list' the names in a
directory; 'replace' moves it into the job's directory, 'overwrite' writes
over it.  A refused step returns the exception's name.  Prints RESULT with
the jobs, then closes the cluster.
"""


def probe(action, path):
    import os
    try:
        if action == 'write':
            with open(path, 'w') as fh:
                fh.write('the first client\'s data\n')
            return os.path.abspath(path)
        if action == 'read':
            with open(path) as fh:
                return 'read:' + fh.read()
        if action == 'list':
            return 'listed:%s' % sorted(os.listdir(path))
        if action == 'replace':
            os.replace(path, os.path.basename(path))
            return 'replaced'
        if action == 'overwrite':
            with open(path, 'wb') as fh:
                fh.write(b'forged')
            return 'overwritten'
        return 'unknown action'
    except OSError as exc:
        return type(exc).__name__


if __name__ == '__main__':
    import json
    import _common as c

    def main():
        node_port, client_port, extra = c.ports()
        o = c.options(extra, dest_path='', actions='[]', wait=40.0)
        kw = {'dest_path': o['dest_path']} if o['dest_path'] else {}
        cluster = c.cluster(probe, node_port, client_port, **kw)
        jobs = c.submit(cluster, [tuple(a) for a in json.loads(o['actions'])])
        c.finish(c.collect(cluster, jobs, wait=o['wait']), cluster)

    c.run(main, timeout=80)
