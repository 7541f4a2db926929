"""Job processes forked without the interpreter's at-fork callbacks (the
worker's lean fork) must still behave like ``os.fork`` children: each job
gets a fresh ``random`` seed, callbacks that setup registers still run, and
a worker with threads of its own falls back to ``os.fork``."""

import driver  # noqa: F401  (puts the repository on sys.path)
from test_unit_worker_uids import drv, node  # noqa: F401  (fixtures: a -c 2 in-process node, a driver)

import dispy_common as dc

import pytest

CODE = '''import os, random, threading, time
def setup(mode):
    global STATE
    STATE = []
    if mode == 'register':
        os.register_at_fork(after_in_child=lambda: STATE.append('child-callback'))
    elif mode == 'thread':
        threading.Thread(target=time.sleep, args=(30,), daemon=True).start()
    return 0
def f(n):
    return (random.random(), random.getrandbits(64), list(STATE),
            threading.active_count(), os.getpgid(0) == os.getpid())
'''


def run_jobs(drv, mode, count=4):
    _, compute = drv.compute(CODE, 'f', setup=dc.Function(name='setup', args=(mode,),
                                                          kwargs={}))
    assert drv.setup(compute.id) == b'ACK'
    results = []
    for uid in range(1, count + 1):
        assert drv.job(compute.id, uid, (uid,)) == b'ACK'
        reply = drv.server.wait_reply(uid)
        assert reply.status == dc.DispyJob.Finished, reply.exception
        results.append(reply.result)
    return results


@pytest.mark.parametrize('mode', ['plain', 'register', 'thread'])
def test_jobs_are_fresh_forks(drv, mode):
    results = run_jobs(drv, mode)
    # every job draws from its own seed, as os.fork's random callback gives
    assert len({r[0] for r in results}) == len(results)
    assert len({r[1] for r in results}) == len(results)
    for _, _, state, threads, own_group in results:
        assert own_group
        # a callback registered by setup runs in every job process
        assert state == (['child-callback'] if mode == 'register' else [])
        # os.fork's threading callback leaves only the job's own thread
        assert threads == 1
