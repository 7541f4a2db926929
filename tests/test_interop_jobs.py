"""Interop (issue 3): programs, files sent back, provisional results, cancel,
dest_path and cleanup, file size limit and hostile dest_path, all with the
real dispy 4.5.5 client against a node (``node_mode``, see conftest).
"""

import os
import uuid
from pathlib import Path

import pytest

from dispy_common import DispyJob

from legacy import (CLIENTS, check_client, describe, files_under, find_files, free_port,
                    pid_alive, run_client, wait_for)

pytestmark = [pytest.mark.interop]

FINISHED, TERMINATED, CANCELLED, CREATED, PROVISIONAL = (
    DispyJob.Finished, DispyJob.Terminated,
    DispyJob.Cancelled, DispyJob.Created, DispyJob.ProvisionalResult)


def _bytes(v):
    """A job's stdout/stderr for a program: bytes (sent as {'__bytes__': str})."""
    assert isinstance(v, dict) and '__bytes__' in v, ('expected bytes', v)
    return v['__bytes__'].encode('latin-1')


SHELL_PROG = '''#!/bin/sh
echo "args: $1|$2"
echo "stderr $1" >&2
exit $2
'''

PY_PROG = '''import os, sys
print('args: %s|%s' % (sys.argv[1], sys.argv[2]))
print('exe: ' + os.path.realpath(sys.executable))
sys.stderr.write('stderr %s\\n' % sys.argv[1])
sys.exit(int(sys.argv[2]))
'''


def _run_program(node, tmp_path, name, text, mode=0o755):
    cwd = tmp_path / 'client'
    cwd.mkdir()
    prog = cwd / name
    prog.write_text(text)
    prog.chmod(mode)
    res = run_client(CLIENTS / 'program_jobs.py', node.port, free_port(), name, timeout=60,
                     cwd=cwd)
    data = check_client(res, node)
    assert data['all_final'], describe(res, node)
    return res, data


@pytest.mark.node_modes('local', 'original')
def test_shell_program(node_factory, legacy_python, tmp_path):
    """JobCluster('prog.sh'): args passed, result is the exit code, stdout and
    stderr are bytes."""
    node = node_factory()
    res, data = _run_program(node, tmp_path, 'prog.sh', SHELL_PROG)
    for j, (tag, code) in zip(data['jobs'], data['cases']):
        assert j['status'] == FINISHED, (j, describe(res, node))
        assert j['result'] == code, j
        assert _bytes(j['stdout']) == b'args: %s|%d\n' % (tag.encode(), code), j
        assert _bytes(j['stderr']) == b'stderr %s\n' % tag.encode(), j


@pytest.mark.ours_only(reason='the original node keeps the client\'s file mode and fails '
                              'with EACCES on a non-executable program')
@pytest.mark.node_modes('local', 'original')
def test_shell_program_not_executable(node_factory, legacy_python, tmp_path):
    """A program file sent without the executable bit is made executable by
    the node (PROTOCOL-NOTES: "transferred, made executable and run")."""
    node = node_factory()
    res, data = _run_program(node, tmp_path, 'prog.sh', SHELL_PROG, mode=0o644)
    for j, (tag, code) in zip(data['jobs'], data['cases']):
        assert j['status'] == FINISHED, (j, describe(res, node))
        assert j['result'] == code, j
        assert _bytes(j['stdout']) == b'args: %s|%d\n' % (tag.encode(), code), j


@pytest.mark.node_modes('local', 'original')
def test_python_program(node_factory, legacy_python, tmp_path):
    """JobCluster('prog.py'): run with the node's own Python interpreter."""
    node = node_factory()
    res, data = _run_program(node, tmp_path, 'prog.py', PY_PROG)
    node_python = os.path.realpath(node.cmd[0])
    for j, (tag, code) in zip(data['jobs'], data['cases']):
        assert j['status'] == FINISHED, (j, describe(res, node))
        assert j['result'] == code, j
        out = _bytes(j['stdout']).decode()
        assert out.splitlines()[0] == 'args: %s|%d' % (tag, code), j
        assert out.splitlines()[1] == 'exe: ' + node_python, j
        assert _bytes(j['stderr']) == b'stderr %s\n' % tag.encode(), j


@pytest.mark.node_modes('local', 'original')
def test_send_files(node_factory, legacy_python, tmp_path):
    """4 jobs each send back a 100-400 KB file with dispy_send_file; the
    client saves them intact in its cwd."""
    node = node_factory()
    cwd = tmp_path / 'client'
    cwd.mkdir()
    sizes = [102400, 204800, 307200, 409600 - 7]
    res = run_client(CLIENTS / 'send_files.py', node.port, free_port(),
                     'sizes=' + ','.join(map(str, sizes)), timeout=60, cwd=cwd)
    data = check_client(res, node)
    assert data['all_final'], describe(res, node)
    for j, size in zip(data['jobs'], sizes):
        assert j['status'] == FINISHED, (j, describe(res, node))
        r = j['result']
        assert r['size'] == size and r['send_status'] == 0, j
        got = data['received'].get(r['name'])
        assert got is not None, ('file not received', r['name'], describe(res, node))
        assert got == {'size': size, 'sha256': r['sha256']}, (got, r)
        assert (cwd / r['name']).stat().st_size == size


@pytest.mark.node_modes('local', 'original')
def test_provisional_results(node_factory, legacy_python, tmp_path):
    """dispy_provisional_result: the callback sees >= 4 ProvisionalResult
    statuses, with their results, before Finished."""
    node = node_factory()
    res = run_client(CLIENTS / 'provisional.py', node.port, free_port(), 'jobs=3', timeout=60,
                     cwd=tmp_path)
    data = check_client(res, node)
    assert data['all_final'], describe(res, node)
    for j in data['jobs']:
        n = j['id']
        assert j['status'] == FINISHED and j['result'] == [n, 'final'], j
        calls = data['callbacks'].get(str(n), [])
        statuses = [s for s, _ in calls]
        assert statuses.count(PROVISIONAL) >= 4, (n, calls)
        assert FINISHED in statuses, (n, calls)
        fin = statuses.index(FINISHED)
        assert all(s == PROVISIONAL for s in statuses[:fin]), (n, calls)
        assert statuses[fin:] == [FINISHED], (n, calls)
        prov = [r for s, r in calls if s == PROVISIONAL]
        assert all(r[0] == n and r[1] in range(5) for r in prov), (n, calls)
        assert [r[1] for r in prov] == sorted(r[1] for r in prov), (n, calls)


@pytest.mark.ours_only(reason='the original node leaves the job\'s child process running')
@pytest.mark.node_modes('local', 'original')
def test_cancel_running_job(node_factory, legacy_python, tmp_path):
    """cluster.cancel() of a running job that spawned `sleep 600`: the job
    process and its child are gone within 2 s, the client sees Terminated,
    and the node runs a new job afterwards."""
    node = node_factory()
    res = run_client(CLIENTS / 'cancel_job.py', node.port, free_port(), timeout=80,
                     cwd=tmp_path)
    data = res.data or {}
    prov = data.get('provisional') or (data.get('res') or {}).get('provisional')
    pids = [prov['pid'], prov['child']] if isinstance(prov, dict) else []
    try:
        data = check_client(res, node)
        assert not data.get('no_provisional'), describe(res, node)
        assert data['alive_before_cancel'] == [True, True], data
        assert data['cancel_return'] == 0, data
        assert data['pids_gone_after'] is not None, (
            'job process / child still alive 10 s after cancel: %s' % data['alive_after'],
            describe(res, node))
        assert data['pids_gone_after'] <= 2.0, data
        assert data['sleeper_terminated'], (data['sleeper'], describe(res, node))
        assert data['sleeper']['result'] in (None, ''), data['sleeper']
        assert data['quick_final'] and data['quick']['status'] == FINISHED, (
            data['quick'], describe(res, node))
        assert data['quick']['result'].startswith('after-cancel '), data['quick']
    finally:
        for pid in pids:   # never leave a sleep 600 behind
            if pid_alive(pid):
                try:
                    os.kill(pid, 9)
                except OSError:
                    pass
    assert not any(pid_alive(p) for p in pids)


def _dep(tmp_path, size=0):
    cwd = tmp_path / 'client'
    cwd.mkdir(exist_ok=True)
    name = 'dep-%s.txt' % uuid.uuid4().hex[:12]
    text = 'dependency %s\n' % name
    if size:
        text = (text * (size // len(text) + 1))[:size]
    (cwd / name).write_text(text)
    return cwd, name, text


@pytest.mark.node_modes('local', 'original')
def test_dest_path_without_cleanup(node_factory, legacy_python, tmp_path):
    """dest_path='sub/dir', cleanup=False: jobs run in
    <prefix>/127.0.0.1/sub/dir, and the depends file and the jobs' files stay
    there after close."""
    node = node_factory()
    cwd, name, text = _dep(tmp_path)
    res = run_client(CLIENTS / 'depends_cleanup.py', node.port, free_port(), name, 'jobs=3',
                     'dest_path=sub/dir', 'cleanup=0', timeout=60, cwd=cwd)
    data = check_client(res, node)
    assert data['all_final'], describe(res, node)
    target = Path(node.prefix).resolve() / '127.0.0.1' / 'sub' / 'dir'
    for j in data['jobs']:
        assert j['status'] == FINISHED, (j, describe(res, node))
        assert Path(j['result']['cwd']).resolve() == target, j
        assert j['result']['content'] == text
    wait_for(lambda: False, 1.0)   # give a (wrong) cleanup the chance to happen
    left = files_under(target)
    assert name in left, (left, describe(res, node))
    assert (target / name).read_text() == text
    for n in range(3):
        assert 'out-%d-%s' % (n, name) in left, left


@pytest.mark.node_modes('local', 'original')
def test_default_cleanup_leaves_no_files(node_factory, legacy_python, tmp_path):
    """With the default cleanup, nothing of the computation stays below
    <prefix>/127.0.0.1 after close (depends file, stored replies, dirs'
    files)."""
    node = node_factory()
    cwd, name, text = _dep(tmp_path)
    res = run_client(CLIENTS / 'depends_cleanup.py', node.port, free_port(), name, 'jobs=3',
                     'write=0', timeout=60, cwd=cwd)
    data = check_client(res, node)
    assert data['all_final'], describe(res, node)
    for j in data['jobs']:
        assert j['status'] == FINISHED and j['result']['content'] == text, j
    sched_dir = Path(node.prefix) / '127.0.0.1'
    assert wait_for(lambda: files_under(sched_dir) == [], 10), (
        files_under(sched_dir), describe(res, node))
    left = [f for f in files_under(node.prefix) if name in f or '_dispy_job_reply_' in f]
    assert left == [], left


@pytest.mark.slow
@pytest.mark.node_modes('local', 'original')
def test_max_file_size_refused(node_factory, legacy_python, tmp_path):
    """A 50 KB depends file is refused by a node with --max_file_size 10k:
    the client gets no result; the node then serves a client with a small
    file."""
    node = node_factory(args=('--max_file_size', '10k'))
    cwd, name, text = _dep(tmp_path, size=50 * 1024)
    res = run_client(CLIENTS / 'depends_cleanup.py', node.port, free_port(), name, 'jobs=2',
                     'write=0', 'give_up=8', timeout=60, cwd=cwd)
    data = check_client(res, node)
    assert data.get('gave_up') is True, ('jobs ran despite the refused file',
                                         describe(res, node))
    for j in data['jobs']:
        assert j['status'] == CANCELLED and j['result'] is None, j
    big = [f for f in files_under(node.prefix)
           if Path(f).name == name and (Path(node.prefix) / f).stat().st_size > 10 * 1024]
    assert big == [], big
    assert node.alive(), node.log()
    # the node is free again for the next client
    cwd2 = tmp_path / 'client2'
    cwd2.mkdir()
    small = 'small-%s.txt' % uuid.uuid4().hex[:8]
    (cwd2 / small).write_text('x' * 1000)
    res = run_client(CLIENTS / 'depends_cleanup.py', node.port, free_port(), small, 'jobs=2',
                     'write=0', 'give_up=20', timeout=60, cwd=cwd2)
    data = check_client(res, node)
    assert not data.get('gave_up'), describe(res, node)
    assert [j['status'] for j in data['jobs']] == [FINISHED] * 2, describe(res, node)
    assert data['jobs'][0]['result']['content'] == 'x' * 1000


@pytest.mark.ours_only(reason='the original node accepts absolute and ".." dest_path values')
@pytest.mark.parametrize('kind', ['absolute', 'dotdot'])
@pytest.mark.node_modes('local', 'original')
def test_hostile_dest_path(kind, node_factory, legacy_python, tmp_path):
    """A computation whose dest_path is absolute or climbs out with '..'
    creates nothing outside the node's prefix (refused, or confined)."""
    node = node_factory()
    tag = uuid.uuid4().hex
    if kind == 'absolute':
        hostile = '/tmp/evil-%s' % tag
    else:
        hostile = '../../x-%s' % tag
    cwd, name, text = _dep(tmp_path)
    try:
        res = run_client(CLIENTS / 'depends_cleanup.py', node.port, free_port(), name, 'jobs=2',
                         'force_dest_path=' + hostile, 'cleanup=0', 'give_up=8', timeout=60,
                         cwd=cwd)
        data = check_client(res, node)
        prefix = Path(node.prefix).resolve()
        if not data.get('gave_up'):
            # accepted: then it must have been confined to the prefix
            for j in data['jobs']:
                if j['status'] == FINISHED:
                    for key in ('cwd', 'dep_path', 'out_path'):
                        p = os.path.realpath(j['result'][key])
                        assert p.startswith(str(prefix) + os.sep), (key, p, describe(res, node))
        escaped = [str(p) for p in Path('/tmp').glob('evil-%s*' % tag)]
        escaped += [str(p) for p in find_files(tmp_path, '*%s*' % tag, dirs=True)
                    if not str(p.resolve()).startswith(str(prefix) + os.sep)]
        escaped += [str(p) for d in (tmp_path.parent, tmp_path.parent.parent)
                    for p in d.glob('*%s*' % tag)]
        escaped += [str(p) for p in find_files(tmp_path, name, dirs=True)
                    if p.name == name
                    and p.parent != cwd
                    and not str(p.resolve()).startswith(str(prefix) + os.sep)]
        assert escaped == [], (escaped, describe(res, node))
        assert node.alive(), node.log()
    finally:
        evil = Path('/tmp/evil-%s' % tag)
        if evil.exists():
            import shutil
            shutil.rmtree(str(evil), ignore_errors=True)
