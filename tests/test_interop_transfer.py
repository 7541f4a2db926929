"""Bulk file transfers with the real legacy client (dispy 4.5.5): multi-MB
files to the node (cluster and per-job depends: the node's splice() path,
or the copy path over TLS) and back (``dispy_send_file``: 5 MB, or a small
file over TLS, see below).  Every byte is checked by SHA-256 on both ends."""

import os

import pytest

from dispy_common import DispyJob
from legacy import CLIENTS, check_client, describe, free_port, run_client
from test_tls import _openssl_cert

FINISHED = DispyJob.Finished


def _files(tmp_path):
    dep = tmp_path / 'dep.bin'
    dep.write_bytes(os.urandom(6 * 1024 * 1024 + 13))
    jobdep = tmp_path / 'jobdep.bin'
    jobdep.write_bytes(os.urandom(3 * 1024 * 1024 + 1))
    return dep, jobdep


# Over TLS the file back is small: asyncoro 4.3.4 (the client) reads TLS
# with recv_into and no SSL_ERROR_WANT_READ handling, so a record that has
# reached it only in part (a full send buffer splits one) kills its file
# reception, whatever the node.  Multi-MB dispy_send_file over TLS fails
# that way in about half the runs; tests/test_unit_transfer.py covers our
# TLS send path with megabytes.
@pytest.mark.parametrize('tls,jobs,back', [(False, 2, 5 * 1024 * 1024 + 3), (True, 1, 40000)],
                         ids=['plain', 'tls'])
def test_big_files_both_ways(tls, jobs, back, node_factory, legacy_python, tmp_path):
    dep, jobdep = _files(tmp_path)
    cwd = tmp_path / 'client'
    cwd.mkdir()
    node_args = ('--max_file_size', '0')
    extra = []
    if tls:
        certfile, keyfile = _openssl_cert(tmp_path)
        node_args += ('--certfile', str(certfile), '--keyfile', str(keyfile))
        extra = ['certfile=%s' % certfile, 'keyfile=%s' % keyfile]
    node = node_factory(args=node_args)
    res = run_client(CLIENTS / 'big_files.py', node.port, free_port(), 'dep=%s' % dep,
                     'jobdep=%s' % jobdep, 'back=%d' % back, 'jobs=%d' % jobs, *extra,
                     timeout=90, cwd=cwd)
    data = check_client(res, node)
    assert data['all_final'], describe(res, node)
    assert len(data['jobs']) == jobs
    for j in data['jobs']:
        assert j['status'] == FINISHED, (j, describe(res, node))
        r = j['result']
        assert r['dep'] == data['dep'] and r['jobdep'] == data['jobdep'], r
        assert r['send_status'] == 0, (r, describe(res, node))
        assert data['received'].get(r['name']) == {'size': back, 'sha256': r['back_sha256']}
    assert node.alive(), node.log()
