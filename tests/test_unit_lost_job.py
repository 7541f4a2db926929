"""The job lost under load (issue 21): a reply dropped because the legacy
client reuses job uids.

The 4.5.5 client's job uid is ``id()`` of its internal job object, which
is freed as soon as the job's reply is in, so the next job submitted
usually gets the same uid.  The courier skipped a reply whose (computation,
uid) was still marked in flight, to keep one stored reply from being sent
twice; but the previous job's delivery stays marked from the client's ACK
until its lane has finished its bookkeeping.  A tiny job submitted from
the client's result handling, run and finished inside that window, had its
reply dropped: neither sent nor stored, and the job stayed Running at the
client for ever.  The key now includes the job's hash (random per client
job object), so only the same reply is deduplicated.
"""

import threading
import time

import dispynode
from test_unit_lifecycle import make_comp, node  # noqa: F401  (node: a fixture)

import dispy_common as dc


def _reply(uid, job_hash, result):
    return dc.dumps(dc.JobReply(uid=uid, hash=job_hash, status=dc.DispyJob.Finished,
                                result=result))


def _wait(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.01)
    return predicate()


def test_unit_reused_uid_reply_is_not_dropped(node, tmp_path, monkeypatch):
    """Job A's delivery is acknowledged and its lane is still finishing when
    job B, with A's uid (the client reused it) and its own hash, is done:
    B's reply must still be sent (or stored), not dropped."""
    comp = make_comp(tmp_path)
    node.state.claim(comp)
    courier = node.courier
    sent, stored = [], []
    in_bookkeeping, release = threading.Event(), threading.Event()

    def send(addr, reply):
        sent.append(reply)
        return True     # the client's ACK

    def delivered(item):
        if item.hash == 'hash-a':
            in_bookkeeping.set()    # the client has A's result and reuses A's uid
            release.wait(5)

    monkeypatch.setattr(courier, '_send', send)
    monkeypatch.setattr(node, 'reply_delivered', delivered)
    monkeypatch.setattr(node, 'reply_undelivered', lambda item: stored.append(item.reply))
    reply_a, reply_b = _reply(5, 'hash-a', 'a'), _reply(5, 'hash-b', 'b')
    try:
        courier.submit(dispynode.Delivery(comp, 5, 'hash-a', reply_a, False))
        assert in_bookkeeping.wait(5)
        courier.submit(dispynode.Delivery(comp, 5, 'hash-b', reply_b, False))
        release.set()
        assert _wait(lambda: reply_b in sent or reply_b in stored), (
            'the reply of the job that reused uid 5 was dropped: sent %d, stored %d'
            % (len(sent), len(stored)))
        assert sent.count(reply_a) == 1
    finally:
        release.set()
        courier.drain(2.0)


def test_unit_same_reply_in_flight_still_sent_once(node, tmp_path, monkeypatch):
    """What the in-flight check is for stays: a stored reply resubmitted
    (same uid and hash) while it is being delivered is not sent twice."""
    comp = make_comp(tmp_path)
    node.state.claim(comp)
    courier = node.courier
    sent = []
    sending, release = threading.Event(), threading.Event()

    def send(addr, reply):
        sent.append(reply)
        sending.set()
        release.wait(5)
        return True

    monkeypatch.setattr(courier, '_send', send)
    monkeypatch.setattr(node, 'reply_delivered', lambda item: None)
    reply = _reply(5, 'hash-a', 'a')
    try:
        courier.submit(dispynode.Delivery(comp, 5, 'hash-a', reply, True))
        assert sending.wait(5)
        courier.submit(dispynode.Delivery(comp, 5, 'hash-a', reply, True))
        release.set()
        courier.drain(2.0)
        assert sent == [reply]
    finally:
        release.set()
