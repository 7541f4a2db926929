"""resolve_config validates and nothing else; start_up does the side
effects (name lookups, the secret and the environment, TLS files, the
prefix) once, when the node starts."""

import os
import socket

import pytest

import dispynode


def parse(*argv):
    return dispynode.build_parser().parse_args(list(argv))


@pytest.fixture
def no_side_effects(monkeypatch):
    """Any lookup, socket, file open or environment change fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError('side effect in resolve_config: %r' % (args,))
    for name in ('gethostbyname', 'gethostname', 'socket', 'getaddrinfo'):
        monkeypatch.setattr(socket, name, refuse)
    monkeypatch.setattr(dispynode, 'primary_ipv4', refuse)
    monkeypatch.setattr(dispynode.dc, 'server_tls_context', refuse)
    monkeypatch.setattr('builtins.open', refuse)
    def environment():
        return {k: v for k, v in os.environ.items() if k != 'PYTEST_CURRENT_TEST'}
    before = environment()
    yield
    assert environment() == before


def test_unit_resolve_config_is_pure(no_side_effects, tmp_path):
    cfg = dispynode.resolve_config(parse(
        '-i', 'no-such-host.invalid', '--ext_ip_addr', 'other.invalid',
        '--scheduler_node', 'sched.invalid', '--secret_file', str(tmp_path / 'missing'),
        '--certfile', str(tmp_path / 'missing.pem'), '--job_user', 'no-such-user',
        '--dest_path_prefix', str(tmp_path / 'prefix')))
    assert cfg.ip_addr == ['no-such-host.invalid']
    assert cfg.ext_ip_addr == ['other.invalid']
    assert cfg.job_user == 'no-such-user' and cfg.started_up is False
    assert not (tmp_path / 'prefix').exists()


@pytest.mark.parametrize('argv, message', [
    (['-i', '127.0.0.1', '-i', '0.0.0.0'], 'give it alone'),
    (['--ext_ip_addr', '10.0.0.1', '--ext_ip_addr', '10.0.0.2'], 'only 0'),
    (['--keyfile', 'k.pem'], '--keyfile needs --certfile'),
    (['--max_file_size', '10x'], '--max_file_size'),
])
def test_unit_resolve_config_refuses_without_lookups(no_side_effects, argv, message):
    with pytest.raises(ValueError, match=message):
        dispynode.resolve_config(parse(*argv))


@pytest.mark.parametrize('argv, message', [
    (['-i', 'no-such-host.invalid'], 'cannot resolve'),
    (['-i', '127.0.0.1', '--ext_ip_addr', 'no-such-host.invalid'], 'cannot resolve'),
    (['-i', '127.0.0.1', '--scheduler_node', 'no-such-host.invalid'], 'cannot resolve'),
    (['-i', '127.0.0.1', '--certfile', '/nonexistent/cert.pem'], 'missing or unreadable'),
    (['-i', '127.0.0.1', '--secret_file', '/nonexistent/secret'], '--secret_file'),
    (['-i', '127.0.0.1', '--job_user', 'no-such-user-dispy'], 'no such user'),
])
def test_unit_start_up_reports_lookup_failures(tmp_path, argv, message):
    cfg = dispynode.resolve_config(parse(*argv, '--dest_path_prefix', str(tmp_path / 'p')))
    with pytest.raises(ValueError, match=message):
        dispynode.start_up(cfg, environ={})
    assert not (tmp_path / 'p').exists()     # nothing created before the failure


def test_unit_start_up_completes_the_config_once(tmp_path):
    cfg = dispynode.resolve_config(parse('-i', 'localhost', '--dest_path_prefix',
                                         str(tmp_path / 'p')))
    environ = {'DISPYNODE_SECRET': 's3cret', 'DISPYNODE_ZOMBIE_SECONDS': '7'}
    done = dispynode.start_up(cfg, environ=environ)
    assert done.secret == 's3cret' and 'DISPYNODE_SECRET' not in environ
    assert done.ip_addr == '127.0.0.1' and done.ip_addrs == [('127.0.0.1', None)]
    assert done.ext_ip_addr == '127.0.0.1' and done.zombie_seconds == 7.0
    assert done.name and done.started_up is True and done.tls_contexts == (None, None)
    assert (tmp_path / 'p').is_dir() and (tmp_path / 'p').stat().st_mode & 0o777 == 0o700
    assert cfg.started_up is False and cfg.ip_addr == ['localhost']   # the input is unchanged
    assert dispynode.start_up(done, environ={'DISPYNODE_SECRET': 'other'}) is done


def test_unit_start_up_prepares_the_job_cgroup_and_the_node_that_made_it_removes_it(
        tmp_path, monkeypatch):
    """--job_memory: start_up prepares the jobs' cgroup (here a fake one).
    The Node whose start_up made it removes it when it stops or fails to
    start (port or --metrics taken); a Node handed a started config leaves
    it to its maker."""
    groups = []

    def fake_cgroup():
        groups.append(tmp_path / ('jobs-%d' % len(groups)))
        groups[-1].mkdir()
        (groups[-1] / 'job-1-7').mkdir()      # a job leaf a worker left behind
        return str(groups[-1]), None
    monkeypatch.setattr(dispynode, 'cgroup_v2_memory', fake_cgroup)

    def config(*extra):
        return dispynode.resolve_config(parse(
            '-i', '127.0.0.1', '--job_memory', '64m', '--dest_path_prefix',
            str(tmp_path / ('p%d' % len(groups))), *extra))
    cfg = config()
    assert cfg.job_cgroup is None and cfg.cgroup_note is None     # resolve_config: nothing
    done = dispynode.start_up(cfg, environ={})
    assert done.job_cgroup == str(groups[0]) and done.cgroup_note is None
    node = dispynode.Node(done)         # handed a started config: not its cgroup
    node.close()
    assert groups[0].is_dir()
    node = dispynode.Node(config())     # its own start_up made groups[1]
    assert groups[1].is_dir()
    node.close()
    assert not groups[1].exists()
    with socket.socket() as taken:
        taken.bind(('127.0.0.1', 0))
        taken.listen(1)
        port = str(taken.getsockname()[1])
        with pytest.raises(OSError):
            dispynode.Node(config('-p', port))
        assert not groups[2].exists()
        with pytest.raises(OSError, match='--metrics'):
            dispynode.Node(config('--metrics', '127.0.0.1:' + port))
        assert not groups[3].exists()
    # without a cgroup the reason is kept for the status
    done.prefix_lock.close()            # (start_up on the same prefix again)
    monkeypatch.setattr(dispynode, 'cgroup_v2_memory', lambda: (None, 'no cgroup v2 hierarchy'))
    other = dispynode.start_up(cfg, environ={})
    assert other.job_cgroup is None and other.cgroup_note == 'no cgroup v2 hierarchy'
