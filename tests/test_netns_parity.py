"""A legacy client behind a NAT gateway whose requests leave from another
public address than the one it announces (issue 11): the original accepts
them (the auth proves the client), and so must we.  Namespaces as in
tests/test_netns.py (needs root and nft or iptables)."""

import pytest

from dispy_common import DispyJob

import netns
from test_netns import _check, _diag, _nat_switches, _tcp_probe, lab  # noqa: F401 (fixture)

pytestmark = [pytest.mark.interop, pytest.mark.slow]

FINISHED, CANCELLED = DispyJob.Finished, DispyJob.Cancelled


@pytest.mark.node_modes('netns', 'original')
def test_client_behind_nat_with_two_public_addresses(impl, node_factory, lab):  # noqa: F811
    """Private LAN 10.231.60.0/24: the client at .10 behind gateway .1,
    whose public side has 10.231.50.1 and .2.  The gateway forwards
    10.231.50.1:51347 (the client's port) to the client, and the client
    announces 10.231.50.1 (ext_ip_addr), but its TCP connections to the node
    leave SNATed from 10.231.50.2.  The node at 10.231.50.20 (public LAN)
    runs setup, a file transfer, jobs and a cancel for it."""
    pub, priv = _nat_switches(lab)
    hn = lab.host('node')
    lab.link(hn, pub, '10.231.50.20/24')
    gw = lab.nat_gateway('gw', public=(pub, ['10.231.50.1/24', '10.231.50.2/24']),
                         private=(priv, '10.231.60.1/24'),
                         forwards=[('10.231.50.1', 51347, '10.231.60.10', 51347)])
    c = lab.host('client')
    lab.link(c, priv, '10.231.60.10/24', gateway='10.231.60.1')
    # the client's requests to the node leave from the other public address
    if gw.nat_tool == 'nft':
        gw.run(['nft', 'insert', 'rule', 'ip', 'dnt_nat', 'postrouting', 'ip', 'saddr',
                '10.231.60.10', 'tcp', 'dport', '51348', 'snat', 'to', '10.231.50.2'])
    else:
        gw.run(['iptables', '-t', 'nat', '-I', 'POSTROUTING', '1', '-s', '10.231.60.10', '-p',
                'tcp', '--dport', '51348', '-j', 'SNAT', '--to-source', '10.231.50.2'])
    node = node_factory(host=hn, ip_addr=hn.addr, args=['-c', '2'])
    # the NAT is real: the node reaches the client only at its public address
    assert _tcp_probe(lab, hn, '10.231.60.10', 51347).startswith('fail')
    seen = lab.python_in(c, 'import socket\n'
                            's = socket.socket(); s.settimeout(5)\n'
                            's.connect(("10.231.50.20", 51348)); print("connected")\n')
    assert 'connected' in seen.stdout, seen
    res = lab.run_client(c, 'multihomed_jobs.py', 51348, 51347, 'ip_addr=10.231.60.10',
                         'ext_ip_addr=10.231.50.1', 'node=10.231.50.20', 'ping_interval=1',
                         'jobs=4', 'cancel=1', timeout=80)
    data = _check(res, [node])
    assert not data['gave_up'], _diag(res, [node])
    for n, j in enumerate(data['jobs'][:4]):
        assert j['status'] == FINISHED and j['result'] == [n * 3, True], (j, _diag(res, [node]))
    assert data['jobs'][4]['status'] == CANCELLED, (data['jobs'][4], _diag(res, [node]))
    if impl == 'ours':
        log = node.log(20000)
        assert 'invalid computation' not in log, log
        assert 'from 10.231.50.2' in log or '10.231.50.2' in log, log
