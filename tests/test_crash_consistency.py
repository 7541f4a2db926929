"""Issue 4, "Nothing is lost": the result store survives SIGKILL anywhere.

A bounded loop (ITERATIONS rounds, one node port and prefix for the whole
run) drives our node with the protocol driver (tests/driver.py, built
on dispy_common framing and auth):

A. store: a computation whose result port is closed gets jobs with ~100 KB
   results, so the node stores every reply; the node is SIGKILLed at a
   random moment while it runs jobs and writes replies;
B. delete: the node is restarted (same port and prefix, no --clean); a
   client (a ReplyServer on the result port) asks for the stored results
   with RESEND_JOB_RESULTS and the old run's auth; the node is SIGKILLed at
   a random moment while it delivers and deletes them;
C. the node is restarted again and the rest is recovered (RESEND, plus
   RETRIEVE_JOB for one result), then CLOSE.

After every kill, every ``_dispy_job_reply_*`` file and every record under
the prefix must load whole (``{'uid','hash','reply'}`` with a decodable
``_JobReply``); a reply must never exist without the record of its
computation (it would be lost at restart); ``.tmp-*`` leftovers are allowed
only until the restarted node removes them; nothing is ever quarantined
(``.corrupt-*``).  Across the phases every result that was stored reaches
the client at least once, and each round ends with an empty prefix.
"""

import os
import random
import threading
import time


from legacy import find_files, free_port, wait_for
from driver import Driver, ReplyServer
from recovery_util import REPLY_PREFIX, scan_store

import dispy_common as dc
from dispy_common import DispyJob

ITERATIONS = int(os.environ.get('DISPYTEST_CRASH_ITERATIONS', '15'))
JOBS = 10
BLOB = 100 * 1024
FINISHED = DispyJob.Finished

CODE = '''
def f(n, size):
    import os
    return {'n': n, 'blob': os.urandom(size // 2).hex()}
'''


def _check_store(prefix, when, allow_tmp):
    """The store invariants; returns {compute_id: set of stored uids}."""
    s = scan_store(prefix)
    assert not s['torn'], '%s: torn store files: %s' % (when, s['torn'])
    assert not s['corrupt'], '%s: node quarantined files: %s' % (when, s['corrupt'])
    if not allow_tmp:
        assert not s['tmp'], '%s: temp files left after restart: %s' % (when, s['tmp'])
    dirs = {rec['dest_path']: rec['id'] for rec in s['records'].values()}
    # the store of a record <prefix>/<id>_<auth>: <prefix>/.replies/<id>_<auth>/
    dirs.update({os.path.join(str(prefix), '.replies', os.path.basename(path)): rec['id']
                 for path, rec in s['records'].items()})
    stored = {}
    for path, rec in s['replies'].items():
        d = os.path.dirname(path)
        assert d in dirs, '%s: reply %s has no computation record (lost at restart); ' \
                          'records: %s' % (when, path, sorted(s['records']))
        reply = rec['decoded']
        assert reply.uid == rec['uid'] and reply.hash == rec['hash'], (path, reply)
        assert reply.status == FINISHED, (path, reply.status, reply.exception)
        assert reply.result['n'] == rec['uid'] and len(reply.result['blob']) == BLOB, path
        stored.setdefault(dirs[d], set()).add(rec['uid'])
    return stored, s


def _submit(drv, cid, uids, stop):
    """Submit jobs (the node has 2 cpus: retry on NAK) until done or the
    node is gone."""
    sent = []
    try:
        for uid in uids:
            while not stop.is_set():
                answer = drv.job(cid, uid, (uid, BLOB), job_hash=_hash(uid))
                if answer == b'ACK':
                    sent.append(uid)
                    break
                if answer is None or b'busy' not in answer:
                    return sent
                time.sleep(0.005)
    except (OSError, dc.ProtocolError):
        pass
    return sent


def _hash(uid):
    """Every run of the client names a job's hash alike (a fresh Driver
    retrieves what an earlier one submitted)."""
    return 'h%x' % uid


def _driver(port, rport):
    """A client whose results go to ``rport`` (where a ReplyServer listens
    or, in phase A, nobody: the node stores them); it has PINGed."""
    drv = Driver('127.0.0.1', port, timeout=5.0, reply_port=rport)
    drv.ping_tcp()
    return drv


def _kill_later(node, delay):
    t = threading.Timer(delay, node.kill)
    t.daemon = True
    t.start()
    return t


def test_sigkill_while_storing_and_deleting(node_factory, tmp_path):
    seed = int(os.environ.get('DISPYTEST_CRASH_SEED') or time.time())
    rng = random.Random(seed)
    port = free_port()
    prefix = tmp_path / 'node' / 'prefix'
    t_start = time.monotonic()
    stats = {'stored_at_kill_a': [], 'left_at_kill_b': [], 'tmp_seen': 0, 'dup': 0}

    def start():
        return node_factory(port=port, prefix=prefix)

    node = start()
    for it in range(ITERATIONS):
        where = 'seed %d iteration %d' % (seed, it)
        cid = 5000 + it
        auth = '%020x' % rng.getrandbits(80)
        rport = free_port()           # nothing listens here during phase A
        uids = [it * 1000 + k for k in range(1, JOBS + 1)]
        received = {}

        # -- A: store, killed at a random moment
        drv = _driver(port, rport)
        old_node_auth = drv.auth
        assert drv.compute(CODE, 'f', compute_id=cid, auth=auth, cleanup=True)[0] == b'ACK', \
            node.log()[-3000:]
        stop = threading.Event()
        killer = _kill_later(node, rng.uniform(0.03, 0.45))
        _submit(drv, cid, uids, stop)
        stop.set()
        killer.join()
        assert not node.alive()
        stored, s = _check_store(prefix, where + ' after kill A', allow_tmp=True)
        stats['tmp_seen'] += len(s['tmp'])
        mine = stored.get(cid, set())
        stats['stored_at_kill_a'].append(len(mine))
        assert mine <= set(uids), (where, mine)

        # -- B: restart, recover with the old auth, killed while deleting
        node = start()
        after, s = _check_store(prefix, where + ' after restart B', allow_tmp=False)
        assert after.get(cid, set()) == mine, '%s: restart lost stored results %s' % (
            where, sorted(mine - after.get(cid, set())))
        with ReplyServer(port=rport) as sink:
            drv = _driver(port, rport)
            # the restarted node accepts the old run's auth for a computation
            # it restored; with nothing stored there is none to restore
            count = drv.resend(cid, auth, node_auth=old_node_auth if mine else drv.auth)
            # the first authenticated request after the restart: the count is
            # exactly what is stored (see test_resend_count_matches_replies)
            assert count == len(mine), (where, count, sorted(mine), node.log()[-3000:])
            killer = _kill_later(node, rng.uniform(0.0, 0.06))
            killer.join()
            assert not node.alive()
            n_b_seen = len(sink.uids())
            for uid in sink.uids():
                received[uid] = received.get(uid, 0) + 1
            left, s = _check_store(prefix, where + ' after kill B', allow_tmp=True)
            stats['tmp_seen'] += len(s['tmp'])
            left = left.get(cid, set())
            stats['left_at_kill_b'].append(len(left))
            assert left <= mine, (where, left, mine)
            missing = mine - left - set(received)
            assert not missing, '%s: results deleted but never delivered: %s' % (
                where, sorted(missing))

            # -- C: restart, recover the rest (one by RETRIEVE_JOB), close
            node = start()
            again, _ = _check_store(prefix, where + ' after restart C', allow_tmp=False)
            assert again.get(cid, set()) == left, (where, again, left)
            drv = _driver(port, rport)
            # with nothing left the node forgot the computation, and with it
            # the old run's auth: then ask with this run's auth
            recovery_auth = old_node_auth if left else drv.auth
            # (every authenticated request also makes the node push what it
            # holds for this client address, so results may arrive by push
            # before PENDING_JOBS / RETRIEVE_JOB / RESEND see them)
            pending = drv.pending_jobs(cid, auth, node_auth=recovery_auth)
            assert pending is not None and set(pending['done']) <= left, (where, pending, left)
            assert pending['pending'] == 0, (where, pending)
            rest = set(left)
            if rest:
                uid = min(rest)
                reply = drv.retrieve(cid, uid, _hash(uid), auth, node_auth=recovery_auth)
                if reply is None:
                    assert wait_for(lambda: uid in sink.uids(), 5), (where, uid)
                else:
                    assert reply.uid == uid, (where, reply)
                    assert reply.result['n'] == uid and len(reply.result['blob']) == BLOB
                    received[uid] = received.get(uid, 0) + 1
                rest.discard(uid)
                # RETRIEVE_JOB deletes the result once we ACKed it
                assert wait_for(lambda: not find_files(prefix, REPLY_PREFIX + str(uid)),
                                5, interval=0.05), (where, uid, node.log()[-3000:])
            count = drv.resend(cid, auth, node_auth=recovery_auth)
            # (pushes started by PENDING_JOBS / RETRIEVE_JOB may already have
            # delivered some of ``rest``)
            assert count is not None and count <= len(rest), (where, count, rest)
            got = wait_for(lambda: set(sink.uids()) >= left - set(received), 10,
                           interval=0.05)
            assert got, (where, sink.uids(), rest, node.log()[-3000:])
            for uid in sink.uids()[n_b_seen:]:
                received[uid] = received.get(uid, 0) + 1
            for r in sink.replies():
                assert r.status == FINISHED and r.result['n'] == r.uid, r
                assert len(r.result['blob']) == BLOB
            drv.close(cid, auth, node_auth=recovery_auth)

            def clean():
                s = scan_store(prefix)
                return not (s['records'] or s['replies'] or s['tmp'])
            assert wait_for(clean, 10, interval=0.05), '%s: prefix not empty: %s\n%s' % (
                where, scan_store(prefix), node.log()[-3000:])
        # nothing is lost: every stored result reached the client
        assert mine <= set(received), '%s: never delivered: %s' % (
            where, sorted(mine - set(received)))
        stats['dup'] += sum(n - 1 for n in received.values())
        assert node.alive()
    elapsed = time.monotonic() - t_start
    print('crash consistency: seed %d, %d iterations in %.1f s, %s' % (
        seed, ITERATIONS, elapsed, stats))
    # the loop must have exercised real work: results stored before some kill
    # A and results still stored at some kill B
    assert sum(stats['stored_at_kill_a']) > 0, stats
    assert elapsed < 120, elapsed
