"""The one way the tests run a dispy node process.

``NodeProc.start`` runs our ``dispynode.py`` or the original dispy 4.5.5 node
(``python -m dispy.dispynode`` from the legacy venv), on this machine, inside
a ``netns.Host``, or from a copy of the two deployment files
(``dispynode.py`` + ``dispy_common.py``, optionally renamed) in a folder of
their own.  Every way shares:

- the defaults: ``-i 127.0.0.1`` (``ip_addr=None`` passes none), ``-p`` a free
  port, ``--dest_path_prefix <workdir>/prefix-<port>``, ``-d``; cwd is the
  workdir (the deploy folder for a copy); the log is
  ``<workdir>/node-<port>.log`` (stdout and stderr; read it with ``log()``);
- one readiness rule (``wait_ready``): the node's ``serving N cpus at`` log
  line, then a TCP connect to its port that succeeds (from inside its
  namespace for a host; our node drops such a probe without a refusal);
- one stop path: ``stop(sig)`` signals the node (SIGINT by default, which
  both implementations take as "shut down"), waits, then SIGKILLs its
  process group (jobs included); ``kill()`` SIGKILLs at once.

``run_to_exit(args, workdir)`` runs our node to completion (option errors,
``--help``, ``--version``) and returns the CompletedProcess (text).

    node = NodeProc.start(tmp_path, args=('-c', '1'))
    node = NodeProc.start(tmp_path, impl='original')
    node = NodeProc.start(tmp_path, host=lab_host, ip_addr=None, port=51348)
    node = NodeProc.start(tmp_path, copy_as='compute-node.py')
    node = NodeProc.start(tmp_path, wrap=['unshare', '--pid', '--fork', '--mount-proc'])

``wrap`` is a command line that runs the node (the node's pid is then the
wrapper's).
"""

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from legacy import REPO, GroupLeader, ensure_legacy_venv, free_port

NODE_SCRIPT = REPO / 'dispynode.py'
DEPLOY_FILES = ('dispynode.py', 'dispy_common.py')
READY_LINE = (' cpus at ', 'serving ')


def node_argv(impl='ours', python=None, script=None):
    """The interpreter and entry point of a node implementation."""
    if impl == 'ours':
        return [str(python or sys.executable), str(script or NODE_SCRIPT)]
    if impl == 'original':
        return [str(python or ensure_legacy_venv()), '-m', 'dispy.dispynode']
    raise ValueError('impl must be "ours" or "original", not %r' % (impl,))


def deploy_copy(folder, name='dispynode.py'):
    """Copy the two deployment files into ``folder`` (the node file as
    ``name``); returns the copied node script."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / name
    shutil.copy(str(NODE_SCRIPT), str(script))
    shutil.copy(str(REPO / 'dispy_common.py'), str(folder / 'dispy_common.py'))
    return script


def python_for(user):
    """An interpreter (3.9+) that ``user`` may run, for a --job_user node:
    the system's, as a deployment would use; this test's own may live
    under /root."""
    for candidate in ('/usr/bin/python3', '/usr/local/bin/python3', sys.executable):
        if os.path.exists(candidate) and subprocess.run(
                [candidate, '-c', 'import sys; assert sys.version_info >= (3, 9)'],
                user=user, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode == 0:
            return candidate
    import pytest
    pytest.fail('no Python 3.9+ that user %s can run' % user)


def run_to_exit(args, workdir, timeout=20, env=None, python=None):
    """Our node with exactly ``--dest_path_prefix <workdir>/prefix`` + args,
    run to its exit; the CompletedProcess (stdout and stderr as text)."""
    return subprocess.run(node_argv('ours', python) + [
        '--dest_path_prefix', str(Path(workdir) / 'prefix')] + [str(a) for a in args],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        timeout=timeout, env=dict(os.environ, **(env or {})), universal_newlines=True)


class NodeProc(GroupLeader):
    """One node process, however it runs (see the module docstring)."""

    def __init__(self, proc, cmd, impl, port, prefix, log_path, ip_addr, host=None,
                 scheduler_port=None, deploy=None):
        super().__init__(proc)
        self.proc = proc
        self.cmd, self.impl, self.port = cmd, impl, port
        self.prefix, self.log_path = Path(prefix), Path(log_path)
        self.ip_addr, self.host = ip_addr, host
        self.scheduler_port = scheduler_port
        self.deploy = deploy          # the folder of a copied node, else None

    @classmethod
    def start(cls, workdir=None, args=(), impl='ours', port=None, prefix=None,
              ip_addr='127.0.0.1', host=None, copy_as=None, python=None, script=None,
              env=None, cwd=None, debug=True, wait=True, timeout=15.0, stdin=None,
              scheduler_port=None, wrap=()):
        if workdir is None:
            workdir = Path(prefix).parent if prefix else Path(
                tempfile.mkdtemp(prefix='dispynode-'))
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        port = port or free_port()
        prefix = Path(prefix) if prefix else workdir / ('prefix-%d' % port)
        deploy = None
        if copy_as:
            deploy = workdir / 'deploy'
            script = deploy_copy(deploy, copy_as)
            cwd = cwd or deploy
        args = [str(a) for a in args]
        cmd = node_argv(impl, python, script) + ['-p', str(port), '--dest_path_prefix',
                                                 str(prefix)]
        if ip_addr:
            cmd += ['-i', ip_addr]
        if scheduler_port:
            cmd += ['--scheduler_port', str(scheduler_port)]
        if debug and '-d' not in args and '--debug' not in args:
            cmd.append('-d')
        cmd += args
        log_path = workdir / ('node-%d.log' % port)
        full_env = dict(os.environ, PYTHONUNBUFFERED='1')
        full_env.update(env or {})
        argv = host.exec_argv(cmd) if host is not None else list(wrap) + cmd
        with open(str(log_path), 'ab') as log:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL if stdin is None else stdin,
                                    stdout=log, stderr=subprocess.STDOUT, env=full_env,
                                    cwd=str(cwd or workdir), start_new_session=True)
        node = cls(proc, cmd, impl, port, prefix, log_path,
                   ip_addr or (host.addr if host is not None else None), host,
                   scheduler_port, deploy)
        if host is not None:
            host.lab._procs.append(node)       # the lab kills it on close
        if wait:
            try:
                node.wait_ready(timeout)
            except AssertionError:
                node.kill()
                raise
        return node

    # -- observing
    def log(self, tail=None):
        try:
            text = self.log_path.read_text(errors='replace')
        except OSError:
            return ''
        return text[-tail:] if tail else text

    def _accepts(self):
        """Whether the node's TCP port takes a connection (from its host)."""
        addr = self.ip_addr or '127.0.0.1'
        if self.host is None:
            try:
                socket.create_connection((addr, self.port), timeout=0.5).close()
                return True
            except OSError:
                return False
        code = 'import socket; socket.create_connection((%r, %d), 0.5).close()' % (
            addr, self.port)
        return self.host.run([sys.executable, '-c', code], check=False).returncode == 0

    def wait_ready(self, timeout=15.0):
        """The serving log line, then a connection the port accepts."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError('%s node exited with %s before serving on port %d; '
                                     'log:\n%s' % (self.impl, self.proc.returncode, self.port,
                                                   self.log()))
            text = self.log()
            if all(part in text for part in READY_LINE) and self._accepts():
                return self
            time.sleep(0.02)
        raise AssertionError('%s node not serving on port %d after %ss; log:\n%s' % (
            self.impl, self.port, timeout, self.log()))

    # -- stopping (GroupLeader: send_signal, stop, kill, close)
    def stop_async(self, sig=signal.SIGINT, timeout=10.0):
        """Signal the node now and reap it in the background (reap_all)."""
        thread = threading.Thread(target=self.stop, args=(sig, timeout), daemon=True,
                                  name='reap-node-%d' % self.port)
        thread.start()
        _REAPERS.append(thread)
        return thread

    def __repr__(self):
        return '<NodeProc %s port=%s pid=%s>' % (self.impl, self.port, self.pid)


class Node(NodeProc):
    """The call of the former legacy.Node, which bench/ still makes:
    ``Node.start(impl, port=, prefix=, args=, ...)``, not waited for."""

    @classmethod
    def start(cls, impl='ours', port=None, prefix=None, args=(), wait=False, **kw):
        return super().start(None, args, impl=impl, port=port, prefix=prefix, wait=wait, **kw)


_REAPERS = []


def reap_all(timeout=15.0):
    """Wait for the nodes stopped with stop_async."""
    deadline = time.monotonic() + timeout
    while _REAPERS:
        _REAPERS.pop().join(max(0.0, deadline - time.monotonic()))
