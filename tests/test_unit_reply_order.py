"""A job's reply goes to the client only after the node answered the JOB
request: a JOB_REPLY that reaches the legacy client before the ACK breaks
its run_job coroutine (``_job.job`` is None by then) and the client hangs;
and a job whose ACK could not be sent gets no reply at all."""

import threading

import dispynode
from test_unit_lifecycle import REPLY, make_comp, node  # noqa: F401  (node: a fixture)

import dispy_common as dc


def _running(node, tmp_path):
    comp = make_comp(tmp_path)
    node.state.claim(comp)
    entry = dispynode.JobEntry(5, 'h', comp.id, [])
    entry.answered = threading.Event()       # as admit_job makes it
    assert node.state.start_job(comp, entry) is None
    return comp, entry


def test_unit_reply_waits_for_the_ack(node, tmp_path, monkeypatch):
    comp, entry = _running(node, tmp_path)
    sent = []
    monkeypatch.setattr(node.courier, 'submit', sent.append)
    done = threading.Thread(target=node.job_done,
                            args=(comp, 5, REPLY, dc.DispyJob.Finished))
    done.start()
    done.join(0.2)
    assert done.is_alive() and sent == []    # the request is not answered yet
    entry.answered.set()
    done.join(5)
    assert [d.uid for d in sent] == [5]


def test_unit_no_reply_when_the_ack_failed(node, tmp_path, monkeypatch):
    comp, entry = _running(node, tmp_path)
    sent = []
    monkeypatch.setattr(node.courier, 'submit', sent.append)
    entry.unacknowledged = True
    entry.answered.set()
    node.job_done(comp, 5, REPLY, dc.DispyJob.Finished)
    assert sent == []
    assert node.state.jobs_of(comp.id) == []
