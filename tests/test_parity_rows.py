"""Parity with the 4.5.5 node, third round (issue 21): each behaviour with
the real dispy 4.5.5 client, against our node and (``DISPYTEST_IMPLS=
ours,original``) the original.  The client scripts are
tests/clients/legacy_rows.py and tests/clients/py36_code.py.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dispy_common import DispyJob

from legacy import CLIENTS, check_client, describe, free_port, run_client

pytestmark = [pytest.mark.interop]

FINISHED, TERMINATED = DispyJob.Finished, DispyJob.Terminated


def _rows(node, tmp_path, case, *extra, timeout=100):
    res = run_client(CLIENTS / 'legacy_rows.py', node.port, free_port(), 'case=' + case,
                     *extra, timeout=timeout, cwd=tmp_path)
    data = check_client(res, node, expect_closed=(case != 'setup_fail'))
    return res, data


def _by_id(res, node, data):
    assert data['all_final'], describe(res, node)
    return {j['id']: j for j in data['jobs']}


@pytest.mark.node_modes('local', 'original')
def test_keyboard_interrupt_in_job(node_factory, legacy_python, tmp_path):
    """_thread.interrupt_main() and SIGINT to the job's own process raise
    KeyboardInterrupt in the job: caught, the job goes on; uncaught, the job
    is Terminated with the traceback and keeps its stdout."""
    node = node_factory()
    res, data = _rows(node, tmp_path, 'interrupt')
    jobs = _by_id(res, node, data)
    for kind in ('main', 'sigint'):
        j = jobs[kind + '_caught']
        assert j['status'] == FINISHED and j['result'] == 'caught', (j, describe(res, node))
        assert j['stdout'] == 'before %s_caught\n' % kind, j
        j = jobs[kind + '_uncaught']
        assert j['status'] == TERMINATED, (j, describe(res, node))
        assert j['exception'].rstrip().endswith('KeyboardInterrupt'), j
        assert j['stdout'] == 'before %s_uncaught\n' % kind, j


@pytest.mark.node_modes('local', 'original')
def test_jobs_start_in_computation_directory(node_factory, legacy_python, tmp_path):
    """Setup that ends in a subdirectory (os.chdir('sub')): every job still
    starts in the computation's directory and finds its depends file."""
    node = node_factory()
    res, data = _rows(node, tmp_path, 'chdir')
    jobs = data['jobs']
    assert data['all_final'] and len(jobs) == 3, describe(res, node)
    for j in jobs:
        assert j['status'] == FINISHED, (j, describe(res, node))
        cwd, found = j['result']
        assert found is True, (j, describe(res, node))
        assert Path(cwd).name != 'sub' and Path(cwd).parent.name == '127.0.0.1', j
        assert Path(cwd).parent.parent == Path(node.prefix), (j, node.prefix)


@pytest.mark.node_modes('local', 'original')
def test_cleanup_runs_after_failed_setup(node_factory, legacy_python, tmp_path):
    """Setup returns 1 and a cleanup function is given: the cleanup runs
    (with the setup's arguments), as on the original."""
    node = node_factory()
    marker = tmp_path / 'marker.txt'
    res, data = _rows(node, tmp_path, 'setup_fail', 'marker=%s' % marker, timeout=60)
    assert data['marker'], describe(res, node)
    assert marker.read_text() == 'cleanup ran'


@pytest.mark.node_modes('local', 'original')
def test_dest_path_dot(node_factory, legacy_python, tmp_path):
    """JobCluster(f, dest_path='.') runs in <prefix>/<client ip>."""
    node = node_factory()
    res, data = _rows(node, tmp_path, 'dest_dot')
    jobs = data['jobs']
    assert data['all_final'] and len(jobs) == 3, describe(res, node)
    for j in jobs:
        assert j['status'] == FINISHED, (j, describe(res, node))
        assert Path(j['result'][0]) == Path(node.prefix) / '127.0.0.1', (j, node.prefix)


@pytest.mark.node_modes('local', 'original')
def test_code_file_name_is_string(node_factory, legacy_python, tmp_path):
    """Tracebacks and warnings from job code name it '<string>', as on the
    original (scripts parse them)."""
    node = node_factory()
    res, data = _rows(node, tmp_path, 'names')
    jobs = _by_id(res, node, data)
    warned = jobs['warn']
    assert warned['status'] == FINISHED, (warned, describe(res, node))
    assert warned['stderr'] == '<string>:4: UserWarning: careful\n', warned
    raised = jobs['raise']
    assert raised['status'] == TERMINATED, (raised, describe(res, node))
    assert 'File "<string>", line 6, in names\n' in raised['exception'], raised
    assert raised['exception'].endswith('ValueError: job raised\n'), raised


@pytest.mark.node_modes('local', 'original')
def test_code_that_fails_to_load(node_factory, legacy_python, tmp_path):
    """The computation's code raises while it loads (a default argument
    names a global only the client has): every job reports the same
    NameError, not the first one only."""
    node = node_factory()
    res, data = _rows(node, tmp_path, 'load_fail')
    jobs = data['jobs']
    assert data['all_final'] and len(jobs) == 3, describe(res, node)
    for j in jobs:
        assert j['status'] == TERMINATED, (j, describe(res, node))
        assert j['exception'].endswith("NameError: name 'LIMIT' is not defined\n"), j
        assert 'File "<string>", line 1, in <module>' in j['exception'], j


@pytest.mark.node_modes('local', 'original')
def test_code_valid_only_on_python36(impl, node_factory, legacy_python, tmp_path):
    """Code using async as a name (valid on Python 3.6 only): the original
    runs it; ours cannot, and each job ends Terminated with the
    SyntaxError and the reason, instead of the jobs staying Created."""
    node = node_factory()
    res = run_client(CLIENTS / 'py36_code.py', node.port, free_port(), timeout=90,
                     cwd=tmp_path)
    data = check_client(res, node)
    assert not data['gave_up'] and data['all_final'], describe(res, node)
    jobs = data['jobs']
    assert len(jobs) == 2
    for n, j in enumerate(jobs):
        if impl == 'original':
            assert j['status'] == FINISHED and j['result'] == (n + 1) * 2, j
            continue
        assert j['status'] == TERMINATED and j['result'] is None, (j, describe(res, node))
        assert 'SyntaxError' in j['exception'], j
        assert 'code valid only on Python 3.6' in j['exception'], j


# ------------------------------------------------------------------ numpy

def _node_numpy():
    """numpy on the node's Python (tests/requirements.txt lists it);
    installed here if missing, e.g. when pytest runs without tests/run."""
    probe = [sys.executable, '-c', 'import numpy']
    if subprocess.run(probe, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode:
        r = subprocess.run([sys.executable, '-m', 'pip', 'install', '-q', 'numpy'],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        if r.returncode or subprocess.run(probe).returncode:
            msg = 'numpy is missing on %s and could not be installed:\n%s' % (
                sys.executable, r.stdout.decode(errors='replace')[-2000:])
            if os.environ.get('CI') == 'true':
                pytest.fail(msg)
            pytest.skip(msg)


@pytest.mark.node_modes('local', 'original')
def test_numpy_results(impl, node_factory, legacy_python, tmp_path):
    """Jobs return numpy arrays and scalars (numpy 2 on our node's Python,
    numpy 1.19.5 on the Python 3.6 client): each reaches the client with
    the same type, dtype, shape and values.  A numpy 2 type with no numpy
    1.x equivalent (StringDType) ends the job Terminated, naming it."""
    _node_numpy()
    r = subprocess.run([str(legacy_python), '-c', 'import numpy; print(numpy.__version__)'],
                       stdout=subprocess.PIPE, universal_newlines=True)
    assert r.stdout.strip() == '1.19.5', r.stdout     # tests/legacy.py LEGACY_EXTRAS
    node = node_factory()
    res, data = _rows(node, tmp_path, 'numpy', timeout=120)
    jobs = _by_id(res, node, data)
    got = dict(zip([j['id'] for j in data['jobs']], data['numpy']))
    for kind in ('float64', 'int32', 'complex', 'scalar_f', 'scalar_i', 'mixed'):
        assert jobs[kind]['status'] == FINISHED, (jobs[kind], describe(res, node))
    assert got['float64'] == {'type': 'ndarray', 'dtype': 'float64', 'shape': [2, 3],
                              'values': [[0.0, 0.25, 0.5], [0.75, 1.0, 1.25]]}, got
    assert got['int32'] == {'type': 'ndarray', 'dtype': 'int32', 'shape': [2, 2],
                            'values': [[1, -2], [3, 2 ** 30]]}, got
    assert got['complex'] == {'type': 'ndarray', 'dtype': 'complex128', 'shape': [2],
                              'values': [[1.0, 2.0], [-0.0, -0.5]]}, got
    assert got['scalar_f'] == {'type': 'float64', 'dtype': 'float64', 'shape': [],
                               'values': 2.5}, got
    assert got['scalar_i'] == {'type': 'int64', 'dtype': 'int64', 'shape': [],
                               'values': -7}, got
    assert got['mixed'] == {
        'a': {'type': 'ndarray', 'dtype': 'bool', 'shape': [2], 'values': [True, False]},
        'b': [{'type': 'float32', 'dtype': 'float32', 'shape': [], 'values': 0.25}]}, got
    j = jobs['stringdtype']
    assert j['status'] == TERMINATED and j['result'] is None, (j, describe(res, node))
    if impl == 'ours':      # the original's numpy 1.19 has no numpy.dtypes at all
        assert 'numpy._core._internal._convert_to_stringdtype_kwargs' in j['exception'], j
        assert 'numpy 1.x' in j['exception'], j


# ------------------------------------------------------------------ soak

@pytest.mark.slow
def test_soak_tiny_jobs(node_factory, legacy_python, tmp_path):
    """3,000 tiny jobs with -c 2, submitted as results come in (so the
    client reuses each finished job's uid at once, the pattern that lost a
    reply): every job ends Finished with its result."""
    node = node_factory(args=('-c', '2'), debug=False)
    res = run_client(CLIENTS / 'soak_jobs.py', node.port, free_port(), 'jobs=3000', 'depth=2',
                     timeout=150, cwd=tmp_path)
    data = check_client(res, node)
    assert data['stalled_at'] is None and data['missing'] == [], describe(res, node)[-3000:]
    assert data['all_final'] and data['bad'] == [], describe(res, node)[-3000:]
    assert data['done'] == 3000, data
    assert node.alive()
