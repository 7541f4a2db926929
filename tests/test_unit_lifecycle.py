"""A computation's lifecycle in NodeState, one transition per test:
claimed (active) -> zombie -> retiring -> detached (stored results) or
gone; and the retire/store window, with an in-process node.

Also: the worker channel matches answers to requests by id."""

import os
import socket
import threading
import time

import pytest

import dispy_common as dc
import dispynode
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


def test_unit_claim_makes_the_node_busy(state, tmp_path):
    comp = make_comp(tmp_path)
    assert state.is_free()
    assert state.claim(comp) is None
    assert not state.is_free() and state.find(7) is comp
    other = make_comp(tmp_path, cid=8, port=4001)          # another client
    assert state.claim(other) == b'Busy'


def test_unit_claim_is_capped(state, tmp_path):
    for cid in range(dispynode.MAX_COMPUTATIONS):
        assert state.claim(make_comp(tmp_path, cid=cid)) is None
    assert state.claim(make_comp(tmp_path, cid=999)).startswith(b'NAK (too many')


def test_unit_zombie_retires_only_without_running_jobs(state, tmp_path):
    comp = make_comp(tmp_path)
    state.claim(comp)
    entry = dispynode.JobEntry(1, 'h', comp.id, [])
    assert state.start_job(comp, entry) is None
    assert not state.begin_retire(comp)                   # not a zombie yet
    state.mark_zombie(comp)
    assert not state.begin_retire(comp)                   # a job still runs
    state.finish_job(1)
    assert state.begin_retire(comp) and comp.retiring
    assert not state.begin_retire(comp)                   # once only


def test_unit_retire_without_results_forgets(state, tmp_path):
    comp = make_comp(tmp_path)
    state.claim(comp)
    kept, freed = state.retire_detach(comp)
    assert (kept, freed) == (False, True)
    assert state.find(7, include_detached=True) is None and state.is_free()


def test_unit_retire_with_results_detaches(state, tmp_path):
    comp = make_comp(tmp_path)
    state.claim(comp)
    state.add_stored(comp, 5)
    kept, freed = state.retire_detach(comp)
    assert (kept, freed) == (True, True)
    assert state.find(7) is None and state.find(7, include_detached=True) is comp


def test_unit_result_stored_after_retire_keeps_the_computation_reachable(state, tmp_path):
    comp = make_comp(tmp_path)
    state.claim(comp)
    state.retire_detach(comp)
    state.add_stored(comp, 5)
    assert state.find(7, include_detached=True) is comp


def test_unit_delivering_the_last_result_finishes_a_detached_computation(state, tmp_path):
    comp = make_comp(tmp_path)
    state.claim(comp)
    state.add_stored(comp, 5)
    state.add_stored(comp, 6)
    state.retire_detach(comp)
    assert not state.drop_stored(comp, 5)
    assert state.drop_stored(comp, 6)                     # nothing left: forget it


def test_unit_resend_at_most_once_per_interval(state, tmp_path):
    comp = make_comp(tmp_path)
    assert state.resend_due(comp, 60)
    assert not state.resend_due(comp, 60)
    assert state.resend_due(comp, 0)


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
    node.state.claim(comp)
    node.store.save_computation(comp)
    node.state.mark_zombie(comp)
    return comp


def test_unit_reply_stored_while_retire_decides(node, tmp_path, monkeypatch):
    """The courier stores a reply just as retire decides about the record:
    whichever goes first, the record stays while the reply is stored."""
    comp = _retiring(node, tmp_path)
    record = node.store.record_path(comp.id, comp.auth)
    courier = []
    real = node.state.retire_detach

    def retire_detach(c):
        decided = real(c)       # nothing stored yet: the record is to go
        # The courier comes in the window, from its own thread, and stores.
        thread = threading.Thread(target=node.reply_undelivered, args=(
            dispynode.Delivery(c, 5, 'h', REPLY, False),))
        thread.start()
        courier.append(thread)
        time.sleep(0.2)
        return decided

    monkeypatch.setattr(node.state, 'retire_detach', retire_detach)
    node.retire(comp)
    courier[0].join(5)
    assert os.path.exists(os.path.join(comp.dest_path, '_dispy_job_reply_5'))
    assert os.path.exists(record), 'a stored reply with no record pointing to it'
    assert node.state.find(comp.id, include_detached=True) is comp


def test_unit_reply_stored_before_retire(node, tmp_path):
    comp = _retiring(node, tmp_path)
    node.reply_undelivered(dispynode.Delivery(comp, 5, 'h', REPLY, False))
    node.retire(comp)
    assert os.path.exists(node.store.record_path(comp.id, comp.auth))
    assert node.state.find(comp.id, include_detached=True) is comp


def test_unit_retire_without_replies_removes_the_record(node, tmp_path):
    comp = _retiring(node, tmp_path)
    node.retire(comp)
    assert not os.path.exists(node.store.record_path(comp.id, comp.auth))
    assert node.state.find(comp.id, include_detached=True) is None


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
