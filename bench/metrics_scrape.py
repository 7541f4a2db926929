"""How long a /metrics scrape takes beside idle and slow connections.

    python3 bench/metrics_scrape.py                       # this checkout's node
    python3 bench/metrics_scrape.py --node old/dispynode.py   # another copy

(the other copy needs its dispy_common.py next to it).  Starts the node on
127.0.0.1 with --metrics, then times one scrape alone, one beside three
idle TCP connections, and one beside a connection that sends a byte a
second (given up after --give_up seconds).  The test suite only checks
that the fast scrape is answered while the others are connected
(tests/test_operate.py); the numbers belong here.
"""

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def scrape(port, timeout):
    t0 = time.monotonic()
    try:
        with urllib.request.urlopen('http://127.0.0.1:%d/metrics' % port, timeout=timeout) as r:
            r.read()
        return '%.3f s' % (time.monotonic() - t0)
    except OSError as exc:
        return 'no answer after %.1f s (%s)' % (time.monotonic() - t0, type(exc).__name__)


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--node', default=os.path.join(HERE, '..', 'dispynode.py'))
    p.add_argument('--give_up', type=float, default=15.0)
    args = p.parse_args()
    port, mport = free_port(), free_port()
    prefix = tempfile.mkdtemp(prefix='dispynode-bench-metrics-')
    proc = subprocess.Popen([sys.executable, args.node, '-i', '127.0.0.1', '-p', str(port),
                             '--dest_path_prefix', prefix, '--daemon', '--metrics', str(mport)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                socket.create_connection(('127.0.0.1', mport), 0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        time.sleep(2.5)     # the probe connection above is past its deadline
        print('scrape alone                      %s' % scrape(mport, args.give_up))
        idle = [socket.create_connection(('127.0.0.1', mport)) for _ in range(3)]
        print('beside 3 idle connections         %s' % scrape(mport, args.give_up))
        for s in idle:
            s.close()
        time.sleep(2.5)
        slow = socket.create_connection(('127.0.0.1', mport))
        stop = threading.Event()

        def trickle():
            while not stop.wait(1.0):
                try:
                    slow.sendall(b'x')
                except OSError:
                    return
        slow.sendall(b'G')
        threading.Thread(target=trickle, daemon=True).start()
        print('beside a byte-a-second client     %s' % scrape(mport, args.give_up))
        stop.set()
        slow.close()
    finally:
        proc.terminate()
        proc.wait(15)


if __name__ == '__main__':
    main()
