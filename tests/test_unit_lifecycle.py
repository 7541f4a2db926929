"""A computation's lifecycle in NodeState, one test per transition of
dispynode.TRANSITIONS (and the refused ones): NEW -> ACTIVE -> ZOMBIE ->
RETIRING -> DETACHED or GONE, restored records DETACHED from the start, a
late reply bringing a GONE computation back; each transition returns the
I/O its caller must do.  Then the retire/store windows, with an
in-process node, where Workspace.lock orders record decisions and stores.

Also: the worker channel matches answers to requests by id."""

import itertools
import os
import socket
import threading
import time

import pytest

import dispy_common as dc
import dispynode
from dispynode import Do, Phase
from driver import free_port

REPLY = dc.dumps(dc.JobReply(uid=5, hash='h', status=dc.DispyJob.Finished, result=1))


def make_comp(tmp_path, cid=7, ip='127.0.0.1', port=4000):
    compute = dc.Compute(id=cid, auth='abcdef', name='f', type=1, scheduler_ip_addr=ip,
                         scheduler_port=port, job_result_port=port, cleanup=True,
                         xfer_files=[])
    dest = tmp_path / ('comp%d' % cid)
    dest.mkdir(exist_ok=True)
    return dispynode.Computation(compute, str(dest), 'sign')


@pytest.fixture
def state():
    return dispynode.NodeState(2)


def claimed(state, tmp_path, **kw):
    comp = make_comp(tmp_path, **kw)
    assert state.claim(comp) is None
    return comp


def zombie(state, tmp_path, **kw):
    comp = claimed(state, tmp_path, **kw)
    assert state.mark_zombie(comp)
    return comp


def retiring(state, tmp_path, **kw):
    comp = zombie(state, tmp_path, **kw)
    assert state.begin_retire(comp)
    return comp


def detached(state, tmp_path, uids=(5,), **kw):
    comp = retiring(state, tmp_path, **kw)
    for uid in uids:
        state.add_stored(comp, uid)
    assert Do.SAVE_RECORD in state.retire_detach(comp)
    return comp


def todo(change):
    return set(change.todo)


def test_unit_transition_table_is_enforced(state, tmp_path):
    """_move makes exactly the changes TRANSITIONS lists, and keeps the
    active and detached tables in step; any other change is refused and
    leaves the computation as it was."""
    for src, dst in itertools.product(Phase, Phase):
        st = dispynode.NodeState(1)
        comp = make_comp(tmp_path)
        comp.phase = src
        with st.lock:
            moved = st._move(comp, dst)
        assert moved == (dst in dispynode.TRANSITIONS[src]), (src, dst)
        assert comp.phase is (dst if moved else src)
        if moved:
            assert (st.active.get(comp.id) is comp) == (dst is Phase.ACTIVE)
            assert (st.detached.get(comp.id) is comp) == (dst is Phase.DETACHED)
    assert set(dispynode.TRANSITIONS) == set(Phase)


def test_unit_claim_makes_the_node_busy(state, tmp_path):
    comp = make_comp(tmp_path)
    assert comp.phase is Phase.NEW and state.is_free()
    assert state.claim(comp) is None
    assert comp.phase is Phase.ACTIVE
    assert not state.is_free() and state.find(7) is comp
    other = make_comp(tmp_path, cid=8, port=4001)          # another client
    assert state.claim(other) == b'Busy' and other.phase is Phase.NEW


def test_unit_claim_refuses_a_computation_claimed_before(state, tmp_path):
    comp = zombie(state, tmp_path)
    state.begin_retire(comp)
    state.retire_detach(comp)                             # GONE, node free
    assert state.claim(comp).startswith(b'NAK')
    assert comp.phase is Phase.GONE and state.is_free()


def test_unit_claim_is_capped(state, tmp_path):
    for cid in range(dispynode.MAX_COMPUTATIONS):
        assert state.claim(make_comp(tmp_path, cid=cid)) is None
    assert state.claim(make_comp(tmp_path, cid=999)).startswith(b'NAK (too many')


def test_unit_unclaim_forgets_a_failed_compute(state, tmp_path):
    comp = claimed(state, tmp_path)
    assert todo(state.unclaim(comp)) == {Do.REMOVE_RECORD, Do.REMOVE_FILES}
    assert comp.phase is Phase.GONE and state.is_free()
    assert state.find(7, include_detached=True) is None


def test_unit_unclaim_refused_once_closed(state, tmp_path):
    comp = zombie(state, tmp_path)
    assert not state.unclaim(comp)
    assert comp.phase is Phase.ZOMBIE and state.find(7) is comp


def test_unit_close_makes_a_zombie_that_takes_no_jobs(state, tmp_path):
    comp = claimed(state, tmp_path)
    change = state.mark_zombie(comp)
    assert change and todo(change) == set()                # retire decides the rest
    assert comp.phase is Phase.ZOMBIE and not comp.timed_out and comp.evicted is None
    assert state.start_job(comp, dispynode.JobEntry(1, 'h', 7, [])).startswith(
        b'NAK (invalid')


def test_unit_close_twice_is_refused(state, tmp_path):
    comp = zombie(state, tmp_path)
    assert not state.mark_zombie(comp)
    comp = detached(state, tmp_path, cid=8)
    assert not state.mark_zombie(comp) and comp.phase is Phase.DETACHED


def test_unit_silent_client_makes_a_zombie_once(state, tmp_path):
    comp = claimed(state, tmp_path)
    assert state.zombies(60) == []
    comp.last_pulse -= 120
    assert state.zombies(60) == [comp]
    assert comp.phase is Phase.ZOMBIE and comp.timed_out
    assert state.zombies(60) == []


def test_unit_evict_kills_running_jobs_and_keeps_the_first_reason(state, tmp_path):
    comp = claimed(state, tmp_path)
    state.start_job(comp, dispynode.JobEntry(1, 'h', 7, []))
    change = state.evict(comp, 'release', True)
    assert change and todo(change) == {Do.LOG_DROP} and change.uids == (1,)
    assert comp.phase is Phase.ZOMBIE and comp.evicted == 'release'
    assert comp.dropped == {1}
    again = state.evict(comp, 'shutdown', False)            # ZOMBIE -> ZOMBIE
    assert again and todo(again) == set() and again.uids == ()
    assert comp.evicted == 'release'


def test_unit_evict_refused_once_retiring(state, tmp_path):
    comp = retiring(state, tmp_path)
    assert not state.evict(comp, 'release', True)
    assert comp.evicted is None and comp.phase is Phase.RETIRING
    assert comp not in state.to_evict()


def test_unit_zombie_retires_only_without_running_jobs(state, tmp_path):
    comp = claimed(state, tmp_path)
    entry = dispynode.JobEntry(1, 'h', comp.id, [])
    assert state.start_job(comp, entry) is None
    assert not state.begin_retire(comp)                   # ACTIVE: refused
    state.mark_zombie(comp)
    assert not state.retire_due(comp)
    assert not state.begin_retire(comp)                   # a job still runs
    state.finish_job(1)
    assert state.retire_due(comp)
    assert todo(state.begin_retire(comp)) == {Do.REMOVE_FILES}
    assert comp.phase is Phase.RETIRING and state.find(7) is comp
    assert not state.begin_retire(comp)                   # once only
    assert not state.retire_due(comp)


def test_unit_retire_without_results_is_gone(state, tmp_path):
    comp = retiring(state, tmp_path)
    assert todo(state.retire_detach(comp)) == {Do.REMOVE_RECORD, Do.ANNOUNCE}
    assert comp.phase is Phase.GONE
    assert state.find(7, include_detached=True) is None and state.is_free()


def test_unit_retire_of_a_dropped_computation_tells_the_client(state, tmp_path):
    comp = claimed(state, tmp_path)
    state.evict(comp, 'release', False)
    state.begin_retire(comp)
    assert Do.TERMINATED in state.retire_detach(comp)
    silent = claimed(state, tmp_path, cid=8)
    silent.last_pulse -= 120
    state.zombies(60)
    state.begin_retire(silent)
    assert Do.TERMINATED in state.retire_detach(silent)


def test_unit_retire_with_results_detaches(state, tmp_path):
    comp = retiring(state, tmp_path)
    other = claimed(state, tmp_path, cid=8)               # the client has another
    assert todo(state.add_stored(comp, 5)) == {Do.SAVE_RECORD}
    assert todo(state.retire_detach(comp)) == {Do.SAVE_RECORD}      # node not free
    assert comp.phase is Phase.DETACHED and not state.is_free()
    assert state.find(7) is None and state.find(7, include_detached=True) is comp
    assert state.find(8) is other


def test_unit_retire_detach_refused_unless_retiring(state, tmp_path):
    comp = zombie(state, tmp_path)
    assert not state.retire_detach(comp)
    assert comp.phase is Phase.ZOMBIE and state.find(7) is comp
    assert not state.retire_detach(detached(state, tmp_path, cid=8))


def test_unit_shutdown_settles_zombies(state, tmp_path):
    comp = zombie(state, tmp_path)
    assert todo(state.shut_down(comp)) == {Do.REMOVE_RECORD, Do.REMOVE_FILES}
    assert comp.phase is Phase.GONE
    kept = zombie(state, tmp_path, cid=8)
    state.add_stored(kept, 5)
    assert todo(state.shut_down(kept)) == {Do.SAVE_RECORD}
    assert kept.phase is Phase.DETACHED


def test_unit_shutdown_refused_for_an_active_or_settled_computation(state, tmp_path):
    comp = claimed(state, tmp_path)
    assert not state.shut_down(comp) and comp.phase is Phase.ACTIVE
    state.evict(comp, 'shutdown', True)
    assert state.shut_down(comp)
    assert not state.shut_down(comp)                      # GONE already
    assert not state.retire_detach(comp)                  # retire finds it settled


def test_unit_result_stored_while_active_needs_no_record_write(state, tmp_path):
    comp = claimed(state, tmp_path)
    assert todo(state.add_stored(comp, 5)) == set()       # its record exists
    assert comp.phase is Phase.ACTIVE and comp.stored == {5}


def test_unit_result_stored_after_retire_brings_the_computation_back(state, tmp_path):
    comp = retiring(state, tmp_path)
    state.retire_detach(comp)
    assert comp.phase is Phase.GONE
    assert todo(state.add_stored(comp, 5)) == {Do.SAVE_RECORD}
    assert comp.phase is Phase.DETACHED
    assert state.find(7, include_detached=True) is comp


def test_unit_delivering_the_last_result_finishes_a_detached_computation(state, tmp_path):
    comp = detached(state, tmp_path, uids=(5, 6))
    assert todo(state.drop_stored(comp, 5)) == {Do.REMOVE_REPLY}
    assert todo(state.drop_stored(comp, 5)) == set()      # twice: nothing to remove
    assert todo(state.drop_stored(comp, 6)) == {Do.REMOVE_REPLY, Do.REMOVE_RECORD,
                                                Do.REMOVE_FILES}
    assert comp.phase is Phase.GONE
    assert state.find(7, include_detached=True) is None


def test_unit_delivering_a_result_of_an_active_computation_keeps_it(state, tmp_path):
    comp = claimed(state, tmp_path)
    state.add_stored(comp, 5)
    assert todo(state.drop_stored(comp, 5)) == {Do.REMOVE_REPLY}
    assert comp.phase is Phase.ACTIVE and state.find(7) is comp


def test_unit_close_of_a_detached_computation_forgets_it_when_empty(state, tmp_path):
    comp = detached(state, tmp_path)
    assert not state.forget(comp)                         # a result is still stored
    assert comp.phase is Phase.DETACHED
    comp.stored.clear()
    assert todo(state.forget(comp)) == {Do.REMOVE_RECORD, Do.REMOVE_FILES}
    assert comp.phase is Phase.GONE and state.find(7, include_detached=True) is None
    assert not state.forget(claimed(state, tmp_path, cid=8))   # ACTIVE: refused


def test_unit_restored_record_starts_detached(state, tmp_path):
    comp = dispynode.Computation.from_record(make_comp(tmp_path).record())
    assert comp.phase is Phase.DETACHED
    assert state.adopt(comp)
    assert state.find(7) is None and state.find(7, include_detached=True) is comp
    assert state.is_free()
    assert not state.adopt(comp)                          # once
    assert not state.adopt(make_comp(tmp_path, cid=8))    # NEW: refused


def test_unit_resend_at_most_once_per_interval(state, tmp_path):
    comp = claimed(state, tmp_path)
    assert not state.resend_due(comp, 0)                  # nothing stored
    state.add_stored(comp, 5)
    assert state.resend_due(comp, 60)
    assert not state.resend_due(comp, 60)
    assert state.resend_due(comp, 0)
    state.mark_zombie(comp)
    assert not state.resend_due(comp, 0, active_only=True)
    assert state.resend_due(comp, 0)


def test_unit_status_names_the_phases(state, tmp_path):
    claimed(state, tmp_path, cid=1)
    zombie(state, tmp_path, cid=2)
    retiring(state, tmp_path, cid=3)
    comp = detached(state, tmp_path)
    assert comp.phase is Phase.DETACHED
    states = {c['id']: c['state'] for c in state.observe()['computations']}
    assert states == {1: 'running', 2: 'closing', 3: 'closing',
                      7: 'closed, results stored'}


# ---------------------------------------------------------------- the window

@pytest.fixture
def node(tmp_path):
    args = dispynode.build_parser().parse_args(
        ['-i', '127.0.0.1', '-p', str(free_port()), '--dest_path_prefix',
         str(tmp_path / 'prefix'), '--zombie_interval', '0', '--daemon'])
    cfg = dispynode.resolve_config(args)
    dispynode.prepare_prefix(cfg)
    node = dispynode.Node(cfg)          # not started: no threads, no workers
    yield node
    node.tcp.server_close()
    node.udp.close()


def _retiring(node, tmp_path):
    comp = make_comp(tmp_path)
    comp.dest_path = os.path.join(node.config.dest_path_prefix, 'dir')
    os.mkdir(comp.dest_path)
    assert node.state.claim(comp) is None
    node.workspace.save_computation(comp)
    assert node.state.mark_zombie(comp)
    return comp


def store_in_the_window(node, monkeypatch, transition, uid):
    """Wrap NodeState.``transition`` so that right after it decides, a
    courier thread stores the reply of job ``uid`` while the caller has yet
    to write that decision.  Returns the courier threads."""
    courier = []
    real = getattr(node.state, transition)

    def decide_then_store(comp, *args):
        decided = real(comp, *args)
        thread = threading.Thread(target=node.reply_undelivered, args=(
            dispynode.Delivery(comp, uid, 'h', REPLY, False),))
        thread.start()
        courier.append(thread)
        time.sleep(0.2)         # the window: the courier stores now, if it can
        return decided

    monkeypatch.setattr(node.state, transition, decide_then_store)
    return courier


def test_unit_reply_stored_while_retire_decides(node, tmp_path, monkeypatch):
    """The courier stores a reply just as retire decides about the record:
    whichever goes first, the record stays while the reply is stored."""
    comp = _retiring(node, tmp_path)
    record = node.workspace.record_path(comp.id, comp.auth)
    # nothing stored when retire decides: the record is to go
    courier = store_in_the_window(node, monkeypatch, 'retire_detach', 5)
    node.retire(comp)
    courier[0].join(5)
    assert os.path.exists(node.workspace.reply_path(comp, 5))
    assert os.path.exists(record), 'a stored reply with no record pointing to it'
    assert node.state.find(comp.id, include_detached=True) is comp


def test_unit_reply_stored_before_retire(node, tmp_path):
    comp = _retiring(node, tmp_path)
    node.reply_undelivered(dispynode.Delivery(comp, 5, 'h', REPLY, False))
    node.retire(comp)
    assert os.path.exists(node.workspace.record_path(comp.id, comp.auth))
    assert node.state.find(comp.id, include_detached=True) is comp


def test_unit_retire_without_replies_removes_the_record(node, tmp_path):
    comp = _retiring(node, tmp_path)
    node.retire(comp)
    assert not os.path.exists(node.workspace.record_path(comp.id, comp.auth))
    assert node.state.find(comp.id, include_detached=True) is None


def test_unit_reply_stored_while_the_last_delivery_forgets(node, tmp_path, monkeypatch):
    """A detached computation's last stored reply is delivered, and so it
    is to go, just as a courier stores another reply of it: the record
    stays while that reply is stored."""
    comp = _retiring(node, tmp_path)
    node.reply_undelivered(dispynode.Delivery(comp, 5, 'h', REPLY, False))
    node.retire(comp)
    assert comp.phase is Phase.DETACHED
    # 5 is the last stored reply: once delivered, record and files are to go
    courier = store_in_the_window(node, monkeypatch, 'drop_stored', 6)
    node.reply_delivered(dispynode.Delivery(comp, 5, 'h', None, True))
    courier[0].join(5)
    assert sorted(os.listdir(node.workspace.store_path(comp))) == ['_dispy_job_reply_6']
    assert os.path.exists(node.workspace.record_path(comp.id, comp.auth)), \
        'a stored reply with no record pointing to it'
    assert node.state.find(comp.id, include_detached=True) is comp


def test_unit_close_after_recovery_removes_record_and_directory(node, tmp_path):
    comp = _retiring(node, tmp_path)
    node.reply_undelivered(dispynode.Delivery(comp, 5, 'h', REPLY, False))
    node.retire(comp)
    node.reply_delivered(dispynode.Delivery(comp, 5, 'h', None, True))   # RETRIEVE_JOB
    assert comp.phase is Phase.GONE
    assert not os.path.exists(node.workspace.record_path(comp.id, comp.auth))
    assert not os.path.exists(comp.dest_path)


# ---------------------------------------------------------------- worker channel

class _FakeWorker:
    """The worker end of a WorkerHandle's channel, scripted by the test."""

    def __init__(self, sock):
        self.sock = sock

    def read(self):
        return dc.loads_plain(dc.recv_msg(self.sock))

    def send(self, msg):
        dc.send_msg(self.sock, dc.dumps_plain(msg))


def test_unit_worker_answers_are_matched_to_requests(node, tmp_path):
    handle = dispynode.WorkerHandle.__new__(dispynode.WorkerHandle)
    ours, theirs = socket.socketpair()
    handle.node, handle.comp, handle.chan = node, make_comp(tmp_path), ours
    handle.waiting, handle.waiting_lock = {}, threading.Lock()
    handle.request_ids, handle.send_lock = iter(range(1, 100)), threading.Lock()
    handle.alive = True
    worker = _FakeWorker(theirs)
    node.worker_lost = lambda comp: None
    reader = threading.Thread(target=handle._read_loop, daemon=True)
    reader.start()
    # A setup that times out ...
    assert handle.request(('setup',), 0.2) is None
    setup = worker.read()
    assert setup[0] == 'setup'
    # ... and its late answer arrives while close waits: close gets its own.
    result = []
    closer = threading.Thread(target=lambda: result.append(
        handle.request(('close', True), 5)))
    closer.start()
    close = worker.read()
    assert close[0] == 'close' and close[1] != setup[1] and close[2] is True
    worker.send(('setup', setup[1], True, ''))            # late: must be ignored
    worker.send(('closed', close[1], '', False))
    closer.join(5)
    assert result == [('closed', '', False)]
    theirs.close()
    reader.join(5)
    ours.close()
