#!/usr/bin/env python3
"""How often an unmodified dispy 4.5.5 client completes 5 TLS jobs against
our node, with and without the client-side asyncoro fix
(tests/clients/asyncoro_tls_fix.py).

    python3 bench/tls_reliability.py [--runs N] [--jobs 5]

Each run starts a fresh node of ours with a shared self-signed certificate
(the dispy 4.5 TLS model) and runs tests/clients/tls_jobs.py with the real
legacy client (Python 3.6 venv of tests/legacy.py), race_fix=0 then
race_fix=1, alternating so both see the same machine load.  A run succeeds
when every job is Finished with the right result; one that fails, gives up
or hangs (bounded) counts as a failure.  Runs in a private network
namespace as bench/run.py does (needs root; DISPYBENCH_NO_NETNS=1 to use the
host loopback).  Prints the success counts and writes nothing else.
"""

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / 'tests'))

from run import isolate_network  # noqa: E402  (bench/run.py)
from legacy import CLIENTS, Node, free_port, run_client  # noqa: E402


def make_cert(directory):
    cert, key = directory / 'cert.pem', directory / 'key.pem'
    subprocess.run(['openssl', 'req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-days', '2',
                    '-subj', '/CN=dispybench', '-keyout', str(key), '-out', str(cert)],
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True, timeout=60)
    return cert, key


def one_run(tmp, n, cert, key, fix, jobs):
    """'ok', or a short reason for the failure."""
    prefix = tmp / ('run%d-%s' % (n, 'fix' if fix else 'plain')) / 'prefix'
    node = Node.start('ours', prefix=prefix, args=('--certfile', str(cert), '--keyfile', str(key)),
                      debug=False)
    try:
        node.wait_ready()
        res = run_client(CLIENTS / 'tls_jobs.py', node.port, free_port(), 'certfile=%s' % cert,
                         'keyfile=%s' % key, 'jobs=%d' % jobs, 'race_fix=%d' % fix,
                         'give_up=10', 'wait=30', timeout=60, cwd=prefix.parent)
    finally:
        node.stop(timeout=5)
    data = res.data
    if not data:
        return 'no result (exit %s)' % res.returncode
    if data.get('watchdog'):
        return 'hung'
    if data.get('error'):
        return 'client error'
    if data.get('gave_up'):
        return 'no job scheduled'
    got = [(j['status'], j['result']) for j in data.get('jobs', [])]
    if got != [(11, k * 3 + 1) for k in range(jobs)]:
        return 'wrong outcome'
    return 'ok'


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--runs', type=int, default=100, help='runs per variant (default 100)')
    p.add_argument('--jobs', type=int, default=5, help='jobs per run (default 5)')
    opts = p.parse_args(argv)
    where = isolate_network()
    tmp = Path(tempfile.mkdtemp(prefix='dispy-tlsbench-'))
    cert, key = make_cert(tmp)
    outcomes = {0: {}, 1: {}}
    t0 = time.time()
    for n in range(opts.runs):
        for fix in ((0, 1) if n % 2 == 0 else (1, 0)):
            why = one_run(tmp, n, cert, key, fix, opts.jobs)
            outcomes[fix][why] = outcomes[fix].get(why, 0) + 1
        sys.stderr.write('\r%d/%d runs' % (n + 1, opts.runs))
        sys.stderr.flush()
    sys.stderr.write('\n')
    print('TLS reliability: %d runs of %d jobs per variant, our node %s, %s, %.0f s'
          % (opts.runs, opts.jobs, 'dispynode.py', where, time.time() - t0))
    for fix, label in ((0, 'unmodified client'), (1, 'client + asyncoro_tls_fix')):
        ok = outcomes[fix].get('ok', 0)
        rest = ', '.join('%s: %d' % kv for kv in sorted(outcomes[fix].items()) if kv[0] != 'ok')
        print('  %-26s %3d/%d succeeded%s' % (label, ok, opts.runs, ' (%s)' % rest if rest else ''))
    return 0


if __name__ == '__main__':
    sys.exit(main())
