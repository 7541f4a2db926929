"""Issue 12 on real (namespace) networks: --ping_interval lets a legacy
client started after the node, on another subnet, find it; a multi-homed
node serves a client on each of its subnets."""

import time

import pytest

from dispy_common import DispyJob

from test_netns import _check, _diag, _routed, lab  # noqa: F401 (lab is a fixture)

pytestmark = [pytest.mark.interop, pytest.mark.slow]

FINISHED = DispyJob.Finished
CLIENT = 'netns_cluster.py'


@pytest.mark.node_modes('netns')
def test_ping_interval_finds_late_client(node_factory, lab):
    """Two nodes on subnet B announce to the client's address with
    --scheduler_node, before the client runs; only n1 has --ping_interval 1.
    The client (subnet A, behind a router, no ping_interval of its own)
    starts later: it finds n1, whose announcements repeat, and never n2,
    whose single announcement at start went nowhere.  All jobs run on n1."""
    c, n1, n2 = _routed(lab, '10.231.21', '10.231.22')
    with_ping = node_factory(host=n1, ip_addr=n1.addr, args=['--scheduler_node', c.addr,
                                                          '--ping_interval', '1'])
    without = node_factory(host=n2, ip_addr=n2.addr, args=['--scheduler_node', c.addr])
    nodes = [with_ping, without]
    time.sleep(1.5)         # both nodes have announced before the client starts
    res = lab.run_client(c, CLIENT, 'ip_addr=%s' % c.addr, 'expect_nodes=2', 'node_wait=6',
                         'jobs=4', 'sleep=0.1', 'wait=30', timeout=60)
    data = _check(res, nodes)
    assert data['nodes_before_submit'] == [n1.addr], (data['nodes_before_submit'],
                                                      _diag(res, nodes))
    for j in data['jobs']:
        assert j['status'] == FINISHED and j['ip_addr'] == n1.addr, (j, _diag(res, nodes))
        assert j['result'] == j['id'] * j['id'] + 1, j


@pytest.mark.parametrize('how', ['wildcard', 'each'])
@pytest.mark.node_modes('netns')
def test_multi_homed_node_serves_both_subnets(node_factory, lab, how):
    """A node host on two subnets (10.231.31.21 and 10.231.32.21), a legacy
    client on each, discovering by broadcast.  With ``-i 0.0.0.0`` or with
    ``-i A -i B`` the node answers each client with the address on that
    client's subnet, and both clients are served (one after the other)."""
    sw_a, sw_b = lab.switch('lanA'), lab.switch('lanB')
    n = lab.host('node')
    lab.link(n, sw_a, '10.231.31.21/24')
    lab.link(n, sw_b, '10.231.32.21/24')
    ca, cb = lab.host('ca'), lab.host('cb')
    lab.link(ca, sw_a, '10.231.31.10/24')
    lab.link(cb, sw_b, '10.231.32.10/24')
    args = ['-i', '0.0.0.0'] if how == 'wildcard' else ['-i', '10.231.31.21',
                                                         '-i', '10.231.32.21']
    node = node_factory(host=n, args=args + ['-c', '1'])
    for client, addr in ((ca, '10.231.31.21'), (cb, '10.231.32.21')):
        res = lab.run_client(client, CLIENT, 'ip_addr=%s' % client.addr, 'expect_nodes=1',
                             'node_wait=10', 'jobs=3', 'sleep=0.05', 'wait=30', timeout=60)
        data = _check(res, [node])
        assert sorted(data['nodes']) == [addr], (data['nodes'], _diag(res, [node]))
        for j in data['jobs']:
            assert j['status'] == FINISHED and j['ip_addr'] == addr, (j, _diag(res, [node]))
            assert j['result'] == j['id'] * j['id'] + 1, j
    assert node.alive()
