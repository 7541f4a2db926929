"""Parity with the 4.5.5 node (issue 11): behaviours legacy users' code and
scripts rely on, each shown with the real dispy 4.5.5 client.  Run side by
side with the original node with ``DISPYTEST_IMPLS=ours,original``.
"""

import uuid
from pathlib import Path

import pytest

from dispy_common import DispyJob

from legacy import (CLIENTS, check_client, describe, files_under, free_port, pid_alive,
                    run_client, wait_for)

pytestmark = [pytest.mark.interop]

FINISHED, TERMINATED, CANCELLED = DispyJob.Finished, DispyJob.Terminated, DispyJob.Cancelled


@pytest.mark.node_modes('local', 'original')
def test_multihomed_client(impl, node_factory, legacy_python, tmp_path):
    """A client that announces 127.0.0.2 (where its servers listen) while its
    requests come from 127.0.0.1: setup, file transfer, jobs and a cancel all
    work, as on the original (the auth proves the client, not the address)."""
    node = node_factory()
    res = run_client(CLIENTS / 'multihomed_jobs.py', node.port, free_port(),
                     'ip_addr=127.0.0.2', 'jobs=4', 'cancel=1', timeout=90, cwd=tmp_path)
    data = check_client(res, node)
    assert not data['gave_up'] and data['all_final'], describe(res, node)
    jobs = data['jobs']
    for n, j in enumerate(jobs[:4]):
        assert j['status'] == FINISHED, (j, describe(res, node))
        assert j['result'] == [n * 3, True], j
        assert j['ip_addr'] == '127.0.0.1', j
    assert jobs[4]['status'] == CANCELLED, (jobs[4], describe(res, node))
    if impl == 'ours':
        log = node.log()
        assert 'invalid computation' not in log, log
        assert 'terminating job' in log, log


@pytest.mark.node_modes('local', 'original')
def test_job_sees_implicit_modules(impl, node_factory, legacy_python, tmp_path):
    """Job code uses time, os, socket, sys, ... without importing them, as
    on the original; no node state (dispy_common, _JOB, Worker) leaks in."""
    node = node_factory()
    res = run_client(CLIENTS / 'implicit_globals.py', node.port, free_port(), timeout=60,
                     cwd=tmp_path)
    data = check_client(res, node)
    assert data['all_final'], describe(res, node)
    used, listed = data['jobs']
    assert used['status'] == FINISHED, (used, describe(res, node))
    assert used['result'] == [True, True, True, 3, True, True, -1, 15, True, True, True,
                              'x', 'a', 3, 2, 'x', 32768, True], used
    assert listed['status'] == FINISHED, listed
    modules = set(listed['result']['modules'])
    for name in ('time', 'os', 'socket', 'sys', 'pickle', 'threading', 'subprocess',
                 'multiprocessing', 'ssl', 'random', 're', 'struct', 'hashlib', 'math',
                 'collections', 'datetime', 'inspect', 'shutil', 'tempfile', 'glob'):
        assert name in modules, (name, sorted(modules))
    if impl == 'ours':
        import dispynode
        assert modules == set(dispynode.IMPLICIT_MODULES), sorted(modules)
        # dispynode_shutdown: later dispy's API for --client_shutdown (README).
        assert set(listed['result']['other']) == {
            'DispyJob', 'dispy_provisional_result', 'dispy_send_file', 'dispynode_shutdown',
            '__doc__', '__loader__', '__name__', '__package__', '__spec__'}, listed['result']


@pytest.mark.parametrize('dest_path', ['sub/out', ''])
@pytest.mark.node_modes('local', 'original')
def test_close_keeps_job_output(dest_path, node_factory, legacy_python, tmp_path):
    """cleanup=True: at close the node removes what it was sent (the depends
    file) and keeps the files the jobs wrote, in a named dest_path (as the
    original) and in the default directory alike."""
    node = node_factory()
    cwd = tmp_path / 'client'
    cwd.mkdir()
    name = 'dep-%s.txt' % uuid.uuid4().hex[:12]
    (cwd / name).write_text('dependency\n')
    extra = ['dest_path=' + dest_path] if dest_path else []
    res = run_client(CLIENTS / 'depends_cleanup.py', node.port, free_port(), name, 'jobs=3',
                     *extra, timeout=60, cwd=cwd)
    data = check_client(res, node)
    assert data['all_final'], describe(res, node)
    outs = []
    for j in data['jobs']:
        assert j['status'] == FINISHED, (j, describe(res, node))
        outs.append(Path(j['result']['out_path']))
        assert Path(j['result']['dep_path']).parent == outs[-1].parent
    target = outs[0].parent
    if dest_path:
        assert target.resolve() == (Path(node.prefix) / '127.0.0.1' / dest_path).resolve()
    # the depends file goes at close; the jobs' outputs stay
    assert wait_for(lambda: not (target / name).exists(), 10), (
        files_under(node.prefix), describe(res, node))
    assert sorted(p.name for p in target.iterdir()) == sorted(p.name for p in outs), (
        files_under(node.prefix))
    for n, out in enumerate(outs):
        assert out.read_text() == 'written by job %d\n' % n


def _results(node, tmp_path, cases):
    res = run_client(CLIENTS / 'parity_results.py', node.port, free_port(),
                     'cases=' + ','.join(cases), timeout=100, cwd=tmp_path)
    data = check_client(res, node)
    assert data['all_final'], describe(res, node)
    assert [j['case'] for j in data['jobs']] == cases, describe(res, node)
    return res, {j['case']: j for j in data['jobs']}


@pytest.mark.ours_only(reason='the original runs jobs on Python 3.6, which has neither type')
@pytest.mark.node_modes('local', 'original')
def test_result_a_36_client_cannot_load(node_factory, legacy_python, tmp_path):
    """A job returning a zoneinfo.ZoneInfo or an ExceptionGroup (types that
    Python 3.6 lacks) ends Terminated with the type named, instead of a
    reply the client cannot load (the job would stay Running for ever); the
    cluster goes on with the next job.  A provisional result of such a type
    is not sent (-1) and the job goes on."""
    node = node_factory()
    res, jobs = _results(node, tmp_path, ['zoneinfo', 'group', 'plain', 'prov_zone'])
    for case, name in (('zoneinfo', 'zoneinfo.ZoneInfo'), ('group', 'builtins.ExceptionGroup')):
        j = jobs[case]
        assert j['status'] == TERMINATED and j['result'] is None, (j, describe(res, node))
        assert name in j['exception'] and 'Python 3.6' in j['exception'], j
    assert jobs['plain']['status'] == FINISHED and jobs['plain']['result'] == 42, jobs['plain']
    assert jobs['prov_zone']['status'] == FINISHED, jobs['prov_zone']
    assert jobs['prov_zone']['result'] == ['done', -1], jobs['prov_zone']


@pytest.mark.node_modes('local', 'original')
def test_provisional_unpicklable_then_exception(node_factory, legacy_python, tmp_path):
    """As on the original: dispy_provisional_result with a value that cannot
    be pickled returns -1 and the job goes on; a job that raises after
    provisional results keeps the last provisional value as its result."""
    node = node_factory()
    res, jobs = _results(node, tmp_path, ['prov_lambda', 'prov_raise', 'plain'])
    j = jobs['prov_lambda']
    assert j['status'] == FINISHED and j['result'] == ['done', -1], (j, describe(res, node))
    j = jobs['prov_raise']
    assert j['status'] == TERMINATED and j['result'] == 2, (j, describe(res, node))
    assert 'ValueError: after provisional results' in j['exception'], j
    assert jobs['plain']['status'] == FINISHED and jobs['plain']['result'] == 42


@pytest.mark.parametrize('fallback', ['ps', 'none'])
def test_cancel_without_proc_and_psutil(fallback, node_factory, legacy_python, tmp_path):
    """As on macOS/BSD (no /proc, no psutil; DISPYNODE_NO_PROC=1 hides both),
    and even without ps(1): cancelling a job kills that job and its child
    only; the computation's worker lives on and runs the next job."""
    import os
    import shutil
    env = {'DISPYNODE_NO_PROC': '1'}
    if fallback == 'none':
        bin_dir = tmp_path / 'bin'     # sleep for the job, but no ps
        bin_dir.mkdir()
        os.symlink(shutil.which('sleep'), str(bin_dir / 'sleep'))
        env['PATH'] = str(bin_dir)
    node = node_factory(env=env)
    res = run_client(CLIENTS / 'cancel_job.py', node.port, free_port(), timeout=80,
                     cwd=tmp_path)
    data = res.data or {}
    prov = data.get('provisional')
    pids = [prov['pid'], prov['child']] if isinstance(prov, dict) else []
    try:
        data = check_client(res, node)
        assert data['alive_before_cancel'] == [True, True], data
        assert data['pids_gone_after'] is not None, (data['alive_after'], describe(res, node))
        assert data['sleeper_terminated'], (data['sleeper'], describe(res, node))
        assert data['quick_final'] and data['quick']['status'] == FINISHED, (
            data['quick'], describe(res, node))
        assert 'worker of computation' not in node.log(), node.log()
    finally:
        for pid in pids:
            if pid_alive(pid):
                os.kill(pid, 9)
