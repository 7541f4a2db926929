"""The worker's job table against reused job uids.  The legacy client's
uid is ``id()`` of its job object, so a uid comes back as soon as the
client has dropped a finished job, while that job's process may still be
exiting.  (The worker used to key its processes by uid: the second exit
raised KeyError and killed the worker, and every later job of the
computation was refused: a hang, seen in a 1,000-job benchmark run.)"""

import glob

import driver  # noqa: F401  (puts the repository on sys.path)
from driver import Driver, InProcessNode, wait_for
from dispy_common import DispyJob

import pytest

# A job that leaves a grandchild holding the result pipe open.  The
# grandchild would leave the file 'lingered' in the job's directory if it
# lived to the end of its sleep (it does not: it ends with its job).
LINGER = '''import os, time
def f(linger):
    if linger and os.fork() == 0:
        time.sleep(linger)
        open('lingered', 'w').close()
        os._exit(0)
    return linger
'''


@pytest.fixture
def node(tmp_path):
    node = InProcessNode.start(tmp_path / 'n', args=('-c', '2'))
    yield node
    node.stop()


@pytest.fixture
def drv(node):
    d = Driver('127.0.0.1', node.port)
    assert d.ping_tcp() is not None
    yield d
    d.close_server()


def test_uid_reused_while_its_first_process_exits(node, drv):
    _, compute = drv.compute(LINGER, 'f')
    lingered = str(node.prefix / '127.0.0.1' / '*' / 'lingered')
    assert drv.job(compute.id, 7, (0.5,)) == b'ACK'
    assert drv.server.wait_reply(7).result == 0.5
    assert drv.job(compute.id, 7, (0,)) == b'ACK'      # the same uid again
    assert drv.server.wait_reply(7).result == 0
    assert not glob.glob(lingered)
    # The grandchild that held the first job's pipe ended with that job
    # (issue 20: nothing a job starts outlives it), so the file never
    # appears; the computation goes on serving.
    assert not wait_for(lambda: glob.glob(lingered), 1.5)     # past its 0.5 s
    assert drv.job(compute.id, 8, (0,)) == b'ACK'
    assert drv.server.wait_reply(8).result == 0


def test_terminate_targets_the_running_job_of_a_reused_uid(drv):
    _, compute = drv.compute(LINGER + 'def g(t):\n    time.sleep(t)\n    return t\n', 'f')
    assert drv.job(compute.id, 5, (2.0,)) == b'ACK'
    assert drv.server.wait_reply(5).result == 2.0
    # uid 5 again, a long job this time, terminated by uid
    assert drv.job(compute.id, 5, (0,), code='import time\nf = lambda x: time.sleep(30)\n') \
        == b'ACK'
    drv.terminate(compute.id, 5)        # the node gave the job to its worker before the ACK
    reply = drv.server.wait_reply(5, timeout=10)
    assert reply.status == DispyJob.Terminated      # well before the 30 s
