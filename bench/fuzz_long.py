#!/usr/bin/env python3
"""Long fuzz campaign: the hypothesis properties of tests/test_fuzz.py with
many more (and random, not derandomized) examples.

    python3 bench/fuzz_long.py [--examples 20000] [--repeat 1] [-k EXPR]

Runs pytest on tests/test_fuzz.py with DISPYTEST_FUZZ_EXAMPLES and
DISPYTEST_FUZZ_RANDOM=1 (so every repeat explores new inputs); hypothesis
prints the falsifying example of any failure.  Exit code: pytest's.
"""

import argparse
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--examples', type=int, default=20000, help='examples per property')
    p.add_argument('--repeat', type=int, default=1, help='campaigns to run')
    p.add_argument('-k', default=None, help='pytest -k expression (e.g. node_tcp)')
    opts = p.parse_args()
    env = dict(os.environ, DISPYTEST_FUZZ_EXAMPLES=str(opts.examples),
               DISPYTEST_FUZZ_RANDOM='1')
    cmd = [sys.executable, '-m', 'pytest', os.path.join(REPO, 'tests', 'test_fuzz.py'),
           '-q', '-x', '-p', 'no:cacheprovider', '--durations=5']
    if opts.k:
        cmd += ['-k', opts.k]
    rc = 0
    for i in range(opts.repeat):
        t0 = time.monotonic()
        print('campaign %d/%d: %d examples per property' % (i + 1, opts.repeat, opts.examples),
              flush=True)
        rc = subprocess.call(cmd, cwd=REPO, env=env)
        print('campaign %d finished in %.0fs with exit code %d'
              % (i + 1, time.monotonic() - t0, rc), flush=True)
        if rc:
            break
    return rc


if __name__ == '__main__':
    sys.exit(main())
