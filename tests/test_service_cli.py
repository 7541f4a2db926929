"""Issue 12: the service options of later dispy nodes, at unit level
(current Python only): validation, config files, the service window
arithmetic, --force_cleanup, --client_shutdown and --serve with the
protocol driver."""

import configparser
import signal
import threading
import time

import pytest

import driver  # noqa: F401  (puts the repository on sys.path)
from driver import Driver, NodeProcess, free_port
from nodes import run_to_exit as run_node
import dispy_common as dc
import dispynode as dn





@pytest.mark.parametrize('argv', [
    ['--init', 'node_init.py'], ['--init'], ['--admin_secret', 'x'], ['--unsafe_setup'],
    ['--ipv4_udp_multicast'], ['--dispy_port', '9700'], ['--dispy_port=9700']],
    ids=lambda a: a[0])
def test_unimplemented_later_flags_fail_with_one_line(tmp_path, argv):
    r = run_node(argv + ['-c', '1'], tmp_path)
    flag = argv[0].split('=')[0]
    assert r.returncode == 2, r
    assert r.stderr.splitlines() == [
        'dispynode: error: %s is an option of later dispy nodes that this node does not '
        'implement' % flag], r.stderr
    assert not (tmp_path / 'prefix').exists()


@pytest.mark.parametrize('argv,words', [
    (['--service_start', '25:00', '--service_end', '06:00'], '--service_start'),
    (['--service_end', '7pm'], '--service_end'),
    (['--service_start', '22:00'], 'needs --service_stop or --service_end'),
    (['--service_stop', '06:00', '--service_end', '05:00', '--service_start', '22:00'],
     'before --service_end'),
    (['--service_start', '06:00', '--service_end', '06:00'], 'must differ'),
    (['--serve', '0'], '--serve'), (['--serve', '-5'], '--serve'),
    (['--ping_interval', '-1'], '--ping_interval'),
    (['--config', 'no-such.ini'], '--config'),
])
def test_invalid_service_options(tmp_path, argv, words):
    r = run_node(argv, tmp_path)
    assert r.returncode == 2, r
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('dispynode: error: '), r.stderr
    assert words in lines[0], lines
    assert 'Traceback' not in r.stderr


def test_service_phase():
    P = dn.service_phase
    # 22:00 -> stop 05:00 -> end 06:00, across midnight
    start, stop, end = 22 * 60, 5 * 60, 6 * 60
    assert P(21 * 60 + 59, start, stop, end) == 'closed'
    assert P(22 * 60, start, stop, end) == 'on'
    assert P(2 * 60, start, stop, end) == 'on'
    assert P(5 * 60, start, stop, end) == 'stopped'
    assert P(5 * 60 + 59, start, stop, end) == 'stopped'
    assert P(6 * 60, start, stop, end) == 'closed'
    assert P(12 * 60, start, stop, end) == 'closed'
    # only a stop: stopped until the next start
    assert P(12 * 60, 8 * 60, 17 * 60, None) == 'on'
    assert P(18 * 60, 8 * 60, 17 * 60, None) == 'stopped'
    assert P(7 * 60, 8 * 60, 17 * 60, None) == 'stopped'
    # only an end
    assert P(18 * 60, 8 * 60, None, 17 * 60) == 'closed'
    assert P(9 * 60, 8 * 60, None, 17 * 60) == 'on'
    assert P(3, 0, None, None) == 'on'


def test_service_clock_override():
    clock = dn.ServiceClock(start=9 * 60 + 59, minute_seconds=0.1)
    first = clock.minute()
    assert 9 * 60 + 59 <= first < 10 * 60
    time.sleep(0.15)
    assert clock.minute() >= 10 * 60


def test_save_and_load_config(tmp_path):
    """--save_config writes every option; --config reads them back and the
    command line overrides the file."""
    ini = tmp_path / 'node.ini'
    r = run_node(['--save_config', str(ini), '-c', '1', '--serve', '2', '--daemon',
                  '--service_start', '22:00', '--service_end', '06:00', '--ping_interval',
                  '30', '--name', 'lab1', '--force_cleanup'], tmp_path)
    assert r.returncode == 0, r
    assert not (tmp_path / 'prefix').exists()       # saved, did not start
    cp = configparser.ConfigParser(interpolation=None)
    cp.read(str(ini))
    sec = cp['dispynode']
    assert sec['cpus'] == '1' and sec['serve'] == '2' and sec['name'] == 'lab1'
    assert sec['daemon'] == 'True' and sec['force_cleanup'] == 'True'
    assert sec['service_start'] == '22:00' and sec['service_end'] == '06:00'
    dests = {a.dest for a in dn.build_parser()._actions} - {
        'help', 'version', 'config', 'save_config'} - {
        f.lstrip('-') for f in dn.UNSUPPORTED_OPTIONS}
    assert set(sec) == dests
    ini2 = tmp_path / 'node2.ini'
    r = run_node(['--config', str(ini), '--save_config', str(ini2), '--serve', '5'], tmp_path)
    assert r.returncode == 0, r
    cp2 = configparser.ConfigParser(interpolation=None)
    cp2.read(str(ini2))
    sec2 = dict(cp2['dispynode'])
    assert sec2.pop('serve') == '5'                  # the command line wins
    assert float(sec2.pop('ping_interval')) == 30
    expected = dict(sec)
    expected.pop('serve')
    expected.pop('ping_interval')
    assert sec2 == expected


def test_config_file_runs_node(tmp_path):
    """A node started from a config file alone uses its options (and a
    later node's key names and default entries are understood)."""
    port = free_port()
    ini = tmp_path / 'node.ini'
    ini.write_text('[DEFAULT]\nhosts = [\'127.0.0.1\']\ndispy_port = 9700\n'
                   'safe_setup = True\nnode_init = \nping_interval = None\n'
                   'name = from-file\ncpus = 1\nnode_port = %d\ndaemon = True\n' % port)
    node = NodeProcess.start(tmp_path / 'run', args=['--config', str(ini)], port=port)
    try:
        d = Driver('127.0.0.1', node.port)
        pong = d.ping_tcp()
        assert pong['name'] == 'from-file' and pong['cpus'] == 1, pong
        d.close_server()
    finally:
        assert node.stop(signal.SIGTERM) == 0
    bad = tmp_path / 'bad.ini'
    bad.write_text('[DEFAULT]\ninit = setup.py\n')
    r = run_node(['--config', str(bad)], tmp_path)
    assert r.returncode == 2 and r.stderr.strip().endswith(
        'init is an option of later dispy nodes that this node does not implement'), r.stderr


def _cleanup_false_dir(tmp_path, args):
    node = NodeProcess.start(tmp_path, args=args)
    d = Driver('127.0.0.1', node.port)
    try:
        d.ping_tcp()
        data = tmp_path / 'data.txt'
        data.write_text('payload')
        compute = d.make_compute('def f():\n    return 1\n', 'f', dest_path='keep',
                                 xfer_files=[d.xfer_file(data, 0)])
        compute.cleanup = False
        compute.xfer_files[0] = d.xfer_file(data, compute.id)
        assert d.request(b'COMPUTE', compute) == b'ACK'
        d.computes[compute.id] = compute
        assert d.xfer(data, compute.id)[1] == b'ACK'
        target = node.prefix / '127.0.0.1' / 'keep' / 'data.txt'
        assert target.exists()
        d.close(compute.id)
        driver_wait = time.monotonic() + 10
        while time.monotonic() < driver_wait and 'closed' not in node.log():
            time.sleep(0.05)
        assert 'computation %s closed' % compute.id in node.log(), node.log()
        return target.exists()
    finally:
        d.close_server()
        node.stop()


def test_force_cleanup(tmp_path):
    """cleanup=False keeps a computation's files, unless --force_cleanup."""
    assert _cleanup_false_dir(tmp_path / 'plain', []) is True
    assert _cleanup_false_dir(tmp_path / 'forced', ['--force_cleanup']) is False


CLEANUP_CODE = ('def f():\n    return 1\n'
                'def bye():\n    dispynode_shutdown()\n')


@pytest.mark.parametrize('allowed', [True, False], ids=['client_shutdown', 'not_allowed'])
def test_client_shutdown(tmp_path, allowed):
    """A cleanup that calls dispynode_shutdown() stops the node once its
    computation ends, only with --client_shutdown."""
    node = NodeProcess.start(tmp_path, args=['--client_shutdown'] if allowed else [])
    d = Driver('127.0.0.1', node.port)
    try:
        d.ping_tcp()
        answer, compute = d.compute(CLEANUP_CODE, 'f', cleanup=dc.Function('bye', (), {}))
        assert answer == b'ACK'
        assert d.job(compute.id, 1) == b'ACK'
        assert d.server.wait_reply(1, 10).result == 1
        d.close(compute.id)
        if allowed:
            assert node.proc.wait(10) == 0, node.log()
            assert 'dispynode_shutdown()' in node.log()
            assert d.server.wait('TERMINATED', 1) is None     # nothing was dropped
        else:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and 'needs --client_shutdown' not in node.log():
                time.sleep(0.05)
            assert 'needs --client_shutdown' in node.log(), node.log()
            assert node.proc.poll() is None
            answer, _ = d.compute(CLEANUP_CODE, 'f')        # still serving
            assert answer == b'ACK'
    finally:
        d.close_server()
        node.stop()


def test_serve_refuses_then_exits(tmp_path):
    """--serve 1: a second computation while the first runs is refused;
    the node exits 0 once the first has ended."""
    node = NodeProcess.start(tmp_path, args=['--serve', '1'])
    d = Driver('127.0.0.1', node.port)
    try:
        d.ping_tcp()
        answer, first = d.compute('def f():\n    return 1\n', 'f')
        assert answer == b'ACK'
        answer, _ = d.compute('def f():\n    return 1\n', 'f')
        assert answer == b'NAK (node serves no more computations)'
        assert node.proc.poll() is None
        d.close(first.id)
        assert node.proc.wait(10) == 0, node.log()
        assert 'served 1 computation' in node.log()
    finally:
        d.close_server()
        node.stop()


@pytest.mark.parametrize('argv,words', [
    (['-i', '0.0.0.0', '-i', '127.0.0.1'], 'give it alone'),
    (['-i', '127.0.0.1', '--ext_ip_addr', '10.0.0.1', '--ext_ip_addr', '10.0.0.2'],
     'given 2 times but -i only 1'),
    (['-i', '127.0.0.1', '-i', '127.0.0.1'], 'given twice'),
])
def test_invalid_addresses(tmp_path, argv, words):
    r = run_node(argv, tmp_path)
    assert r.returncode == 2 and words in r.stderr, r
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def fake_node(cfg):
    """What ServiceControl.addr_for needs of a Node."""
    import types
    return types.SimpleNamespace(config=cfg, route_cache={}, lookup_lock=threading.Lock())


def test_address_for_each_client(monkeypatch):
    """With several -i, a client is answered with the address its route
    leaves from, or the --ext_ip_addr paired with that -i."""
    import types
    routes = {'10.1.0.5': '10.1.0.1', '10.2.0.5': '10.2.0.1', '10.3.0.5': '10.3.0.1'}
    monkeypatch.setattr(dn, 'route_source', routes.get)
    cfg = types.SimpleNamespace(ip_addrs=[('10.1.0.1', '203.0.113.1'), ('10.2.0.1', None)],
                                ip_addr='0.0.0.0', ext_ip_addr='203.0.113.1')
    node = fake_node(cfg)
    addr_for = dn.ServiceControl.addr_for
    assert addr_for(node, '10.1.0.5') == '203.0.113.1'
    assert addr_for(node, '10.2.0.5') == '10.2.0.1'
    assert addr_for(node, '10.3.0.5') == '203.0.113.1'     # not ours: the first
    assert dn.ServiceControl.serves_address(node, '10.2.0.1')
    assert not dn.ServiceControl.serves_address(node, '10.3.0.1')
    wild = fake_node(types.SimpleNamespace(
        ip_addrs=[('0.0.0.0', None)], ip_addr='0.0.0.0', ext_ip_addr='10.1.0.1'))
    assert addr_for(wild, '10.2.0.5') == '10.2.0.1'
    assert addr_for(wild, '10.3.0.5') == '10.3.0.1'
    nat = fake_node(types.SimpleNamespace(
        ip_addrs=[('0.0.0.0', '198.51.100.7')], ip_addr='0.0.0.0', ext_ip_addr='198.51.100.7'))
    assert addr_for(nat, '10.2.0.5') == '198.51.100.7'


def test_several_addresses_only_those_served(tmp_path):
    """-i 127.0.0.1 -i 127.0.0.2: both answer; another local address on
    the same port does not (which address each client is told is checked
    across subnets in test_service_netns)."""
    port = free_port()
    node = NodeProcess.start(tmp_path, args=['-i', '127.0.0.2'], port=port)
    try:
        for addr in ('127.0.0.1', '127.0.0.2'):
            d = Driver(addr, port)
            try:
                assert d.ping_tcp()['port'] == port
            finally:
                d.close_server()
        d = Driver('127.0.0.3', port)
        try:
            try:
                pong = d.ping_tcp()     # closed without an answer (or reset)
            except (OSError, dc.ProtocolError):
                pong = None
            assert pong is None
        finally:
            d.close_server()
    finally:
        assert node.stop(signal.SIGTERM) == 0
