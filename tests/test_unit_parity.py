"""Unit tests for issue 11 pieces that need no legacy client: the check for
results a Python 3.6 client cannot load, and the jobs' implicit modules."""

import datetime
import pickle
import sys

import pytest

import dispy_common as dc
import dispynode as dn


def _reply(result):
    return dc.dumps(dc.JobReply(uid=1, hash='h', ip_addr='127.0.0.1', status=11,
                                result=result, start_time=1.0))


@pytest.mark.skipif(sys.version_info < (3, 11), reason='needs zoneinfo and ExceptionGroup')
def test_unloadable_types_are_named():
    import zoneinfo
    utc = zoneinfo.ZoneInfo('UTC')
    assert dn.unloadable_on_36(_reply(utc)) == 'zoneinfo.ZoneInfo'
    # memoized: the second reference to the module string is a BINGET
    assert dn.unloadable_on_36(_reply([{'a': utc}, ('zoneinfo', utc)])) == 'zoneinfo.ZoneInfo'
    group = ExceptionGroup('g', [ValueError(1)])    # noqa: F821 (3.11+)
    assert dn.unloadable_on_36(_reply(group)) == 'builtins.ExceptionGroup'
    assert dn.unloadable_on_36(_reply(datetime.datetime.now(utc))) == 'zoneinfo.ZoneInfo'


@pytest.mark.parametrize('value', [
    None, 42, 'zoneinfo', b'\x8c\x08zoneinfo', ['ExceptionGroup', 'graphlib'] * 3,
    {'contextvars': 1}, datetime.datetime(2020, 1, 1), ValueError('x'), {1, 2}, 2 + 3j,
    list(range(100)),
])
def test_loadable_results_pass(value):
    assert dn.unloadable_on_36(_reply(value)) is None


def test_unloadable_on_garbage_is_none():
    assert dn.unloadable_on_36(b'\x8c\x08zoneinfo garbage') is None
    assert dn.unloadable_on_36(b'') is None


def test_dataclass_module_is_caught():
    # a type whose module is new since 3.6, pickled by reference
    import dataclasses
    data = pickle.dumps(dataclasses.Field, 4)
    assert dn.unloadable_on_36(data) == 'dataclasses.Field'


def test_implicit_modules_are_stdlib_only():
    saved = dict(dn._IMPLICIT)
    try:
        dn.import_implicit_modules()
        assert {'time', 'os', 'socket', 'sys'} <= set(dn._IMPLICIT)
        assert set(dn._IMPLICIT) <= set(dn.IMPLICIT_MODULES)
        for name, module in dn._IMPLICIT.items():
            assert module.__name__ == name
            assert 'dispy' not in name
    finally:
        dn._IMPLICIT.clear()
        dn._IMPLICIT.update(saved)


SLEEPER = 'def sleeper(t):\n    import time\n    time.sleep(t)\n    return t\n'


def test_terminate_pending_reply_has_no_exception(tmp_path):
    """A job ended by CLOSE with terminate_pending (or TERMINATE_JOB) is
    Terminated with exception None, as on the original."""
    from driver import Driver, InProcessNode
    node = InProcessNode.start(tmp_path / 'node')
    drv = Driver('127.0.0.1', node.port)
    try:
        drv.ping_tcp()
        _, compute = drv.compute(SLEEPER, 'sleeper')
        assert drv.job(compute.id, 1, (60,)) == b'ACK'
        drv.close(compute.id, terminate_pending=True)
        reply = drv.server.wait_reply(1, 10)
        assert reply.status == dc.DispyJob.Terminated
        assert reply.exception is None and reply.result is None
    finally:
        drv.close_server()
        node.stop_async()


@pytest.fixture
def sleeper_tree():
    import subprocess
    # 'ready' comes once both children are forked
    proc = subprocess.Popen(['sh', '-c', 'sleep 60 & sleep 60 & echo ready; wait'],
                            start_new_session=True, stdout=subprocess.PIPE)
    assert proc.stdout.readline() == b'ready\n'
    yield proc
    import os
    import signal
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except OSError:
        pass
    proc.wait()
    proc.stdout.close()


def test_descendants_without_proc_and_psutil(sleeper_tree, monkeypatch):
    """No psutil, no /proc: ps(1) finds the tree; without ps either,
    descendants is empty and never raises, and kill_tree still ends the
    whole process group."""
    import os
    import signal
    monkeypatch.setenv('DISPYNODE_NO_PROC', '1')
    found = dn.descendants(sleeper_tree.pid)
    assert len(found) == 2, found
    monkeypatch.setattr(dn, '_ps_parents', lambda: None)
    assert dn.descendants(sleeper_tree.pid) == []
    real_listdir = os.listdir

    def no_proc(path='.'):
        if str(path).startswith('/proc'):
            raise FileNotFoundError(path)
        return real_listdir(path)
    monkeypatch.setattr(os, 'listdir', no_proc)
    monkeypatch.delenv('DISPYNODE_NO_PROC')
    monkeypatch.setitem(sys.modules, 'psutil', None)     # import psutil -> ImportError
    assert dn.descendants(sleeper_tree.pid) == []
    dn.kill_tree(sleeper_tree.pid, signal.SIGKILL)
    sleeper_tree.wait(5)
    assert sleeper_tree.returncode == -signal.SIGKILL
