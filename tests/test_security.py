"""Secrets: DISPYNODE_SECRET and --secret_file with a legacy client, and the
secret never leaking into the node's log (-d), its files, or its command line.
"""

import hashlib
import os
import threading
from pathlib import Path

import pytest

from dispy_common import DispyJob

from legacy import CLIENTS, free_port, run_client
from driver import raw_ping
from nodes import run_to_exit

pytestmark = [pytest.mark.interop]

FINISHED, CREATED = DispyJob.Finished, DispyJob.Created
SECRET = 'Sup3r-s3cret-%d' % os.getpid()


def _ping_sign(port):
    return raw_ping(port, reply_port=free_port(), timeout=5)['sign']


class PrefixWatcher:
    """Reads every file under ``prefix`` every 50 ms while running and
    remembers any that contained one of ``needles``."""

    def __init__(self, prefix, needles):
        self.prefix = Path(prefix)
        self.needles = [n.encode() for n in needles]
        self.hits = set()
        self.seen = set()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(5)
        self.scan()

    def scan(self):
        if not self.prefix.exists():
            return
        # os.walk, not rglob: the node prunes directories meanwhile.
        paths = [Path(root) / name for root, _, names in os.walk(str(self.prefix))
                 for name in names]
        for p in paths:
            try:
                if not p.is_file():
                    continue
                data = p.read_bytes()
            except OSError:
                continue
            self.seen.add(str(p.relative_to(self.prefix)))
            if any(n in data for n in self.needles):
                self.hits.add(str(p))

    def _run(self):
        while not self.stop.wait(0.05):
            self.scan()


def _client(node, tmp_path, secret, name, jobs=5, give_up=20):
    d = tmp_path / name
    d.mkdir()
    return run_client(CLIENTS / 'basic_jobs.py', node.port, free_port(), 'jobs=%d' % jobs,
                      'secret=%s' % secret, 'give_up=%s' % give_up, timeout=60, cwd=d)


def _assert_served(res, node, jobs):
    msg = res.describe() + '\n--- node log ---\n' + node.log()[-6000:]
    assert res.data is not None and 'error' not in res.data, msg
    assert not res.data.get('gave_up') and res.data['all_final'], msg
    assert [j['status'] for j in res.data['jobs']] == [FINISHED] * jobs, msg
    assert [j['result'] for j in res.data['jobs']] == [n * n + 1 for n in range(jobs)], msg


def _assert_refused(res, node):
    msg = res.describe() + '\n--- node log ---\n' + node.log()[-6000:]
    assert res.data is not None and res.data.get('gave_up') is True, msg
    assert set(res.data['statuses_before_cancel']) == {CREATED}, msg


@pytest.mark.parametrize('how', ['env', 'secret_file'])
def test_secret_sources(how, node_factory, legacy_python, tmp_path):
    """The node takes its secret from $DISPYNODE_SECRET or --secret_file (a
    trailing newline is not part of it): a client with that secret is
    served, one with a wrong secret is not.  The secret is on no command
    line, never in the -d log (nor the node's auth token), and in no file
    under the prefix while the computation runs or after."""
    env, args = {}, ['--msg_timeout', '3']
    if how == 'env':
        env['DISPYNODE_SECRET'] = SECRET
    else:
        sf = tmp_path / 'secret.txt'
        sf.write_text(SECRET + '\n')
        os.chmod(str(sf), 0o600)
        args += ['--secret_file', str(sf)]
    node = node_factory(args=tuple(args), env=env)
    sign = _ping_sign(node.port)
    auth = hashlib.sha1((SECRET + sign).encode()).hexdigest()
    with PrefixWatcher(node.prefix, [SECRET, auth]) as watch:
        res = _client(node, tmp_path, SECRET, 'right', jobs=5)
        _assert_served(res, node, 5)
        res = _client(node, tmp_path, SECRET + 'x', 'wrong', jobs=2, give_up=5)
        _assert_refused(res, node)
    assert watch.seen, 'the watcher never saw a file under the prefix'
    assert not watch.hits, 'secret or auth token written to %s' % sorted(watch.hits)
    log = node.log()
    assert 'computation' in log and 'DEBUG' in log, log[-3000:]
    assert SECRET not in log, 'the secret is in the node log'
    assert auth not in log, "the node's auth token is in the node log"
    with open('/proc/%d/cmdline' % node.pid, 'rb') as fh:
        assert SECRET.encode() not in fh.read()
    assert node.alive()


def test_secret_option_not_logged(node_factory, legacy_python, tmp_path):
    """With -s on the command line too (visible in ps, as its help says),
    the -d log and the prefix still never contain the secret."""
    node = node_factory(args=('-s', SECRET))
    sign = _ping_sign(node.port)
    auth = hashlib.sha1((SECRET + sign).encode()).hexdigest()
    with PrefixWatcher(node.prefix, [SECRET, auth]) as watch:
        res = _client(node, tmp_path, SECRET, 'right', jobs=3)
        _assert_served(res, node, 3)
    assert not watch.hits, sorted(watch.hits)
    log = node.log()        # the node's output only (its command line is node.cmd)
    assert SECRET not in log and auth not in log


def test_bad_secret_file_exit_2(tmp_path):
    """A missing --secret_file: one-line error, exit code 2."""
    r = run_to_exit(['-i', '127.0.0.1', '-p', str(free_port()),
                     '--secret_file', str(tmp_path / 'missing')], tmp_path, timeout=30)
    err = r.stderr
    assert r.returncode == 2, (r.returncode, err)
    assert len(err.strip().splitlines()) == 1 and err.startswith('dispynode: error:'), err
