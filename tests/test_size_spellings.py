"""--max_file_size spellings (issue 11): every spelling the 4.5.5 node read
correctly ('10m', '10MB', '1KB', '512b', any case) is accepted; what it
silently misread ('10x', '10 MB' as 10 bytes, '1.5m' as 1) is refused with
a one-line error."""

import uuid

import pytest

from driver import free_port as driver_free_port
from legacy import CLIENTS, check_client, describe, free_port, run_client
import dispy_common as dc

from test_cli import check_one_line_error, run_node


@pytest.mark.parametrize('text, value', [
    ('10MB', 10 * 1024 ** 2), ('10mb', 10 * 1024 ** 2), ('10Mb', 10 * 1024 ** 2),
    ('1KB', 1024), ('1kb', 1024), ('1kB', 1024), ('2GB', 2 * 1024 ** 3), ('1TB', 1024 ** 4),
    ('512b', 512), ('512B', 512), ('0B', 0), ('2KiB', 2048), ('3MiB', 3 * 1024 ** 2),
    (' 10MB ', 10 * 1024 ** 2), ('10m', 10 * 1024 ** 2), ('7', 7),
])
def test_accepted_spellings(text, value):
    assert dc.parse_size(text) == value


@pytest.mark.parametrize('text', ['10 MB', '10x', '10xyz', '1.5m', '1.5MB', 'MB', 'B', '10BB',
                                  '10iB', '10KBs', '10K B', '-10MB', '10MBi', '\u0663MB'])
def test_refused_spellings(text):
    with pytest.raises(ValueError):
        dc.parse_size(text)


@pytest.mark.parametrize('spelling', ['10MB', '1KB', '512b'])
def test_cli_accepts(spelling, tmp_path):
    """resolve_config (what main runs before starting) takes the spelling."""
    import dispynode as dn
    args = dn.build_parser().parse_args(['-i', '127.0.0.1', '-p', str(driver_free_port()),
                                         '--dest_path_prefix', str(tmp_path / 'p'),
                                         '--max_file_size', spelling])
    cfg = dn.resolve_config(args)
    assert cfg.max_file_size == dc.parse_size(spelling)


@pytest.mark.parametrize('spelling', ['10 MB', '10x', '1.5MB'])
def test_cli_refuses(spelling, tmp_path):
    r = run_node(['-i', '127.0.0.1', '-p', str(driver_free_port()), '--max_file_size', spelling],
                 tmp_path)
    check_one_line_error(r)
    assert 'max_file_size' in r.stderr


@pytest.mark.node_modes('local', 'original')
def test_legacy_client_with_kb_limit(node_factory, legacy_python, tmp_path):
    """A node started with --max_file_size 2KB (both implementations accept
    it) runs jobs with a 1 KB depends file and refuses a 3 KB one."""
    node = node_factory(args=('--max_file_size', '2KB'))
    for size, ok in ((1000, True), (3000, False)):
        cwd = tmp_path / ('client-%d' % size)
        cwd.mkdir()
        name = 'dep-%s.txt' % uuid.uuid4().hex[:12]
        (cwd / name).write_text('x' * size)
        res = run_client(CLIENTS / 'depends_cleanup.py', node.port, free_port(), name,
                         'jobs=2', 'write=0', 'give_up=5', timeout=60, cwd=cwd)
        data = check_client(res, node)
        if ok:
            assert not data.get('gave_up'), describe(res, node)
            assert [j['status'] for j in data['jobs']] == [11, 11], describe(res, node)
            assert data['jobs'][0]['result']['content'] == 'x' * size
        else:
            assert data.get('gave_up') is True, ('a 3 KB file passed a 2KB limit',
                                                 describe(res, node))
