"""Unit checks for the parity rows of issue 21 (the interop tests with the
real client are in test_parity_rows.py)."""

import os
import pickletools
from pathlib import Path
from types import SimpleNamespace

import pytest

import dispynode

import dispy_common as dc


@pytest.mark.parametrize('text, here', [
    ('.', True), ('./', True), (' ./. ', True), ('a', False), ('./a', False),
    ('/', False), ('..', False)])
def test_unit_dest_path_here(text, here):
    assert dispynode.is_here(text) is here


@pytest.mark.parametrize('code, legacy', [
    ('def f(n):\n    async = n\n    return async\n', True),
    ('await = 1\n', True),
    ('def f(async=1):\n    return async\n', True),
    ('x = 1\n', False),                 # compiles: nothing to say
    ('def f(:\n', False),               # invalid everywhere
    ('async = 1\ndef f(:\n', False),    # invalid on 3.6 too
    ('async def g():\n    pass\nx = (\n', False),
])
def test_unit_only_valid_on_36(code, legacy):
    assert dispynode.only_valid_on_36(code) is legacy


def _globals(data):
    strings, found = [], []
    for op, arg, _ in pickletools.genops(data):
        if op.name in ('SHORT_BINUNICODE', 'BINUNICODE'):
            strings.append(arg)
        elif op.name == 'STACK_GLOBAL':
            found.append('%s.%s' % tuple(strings[-2:]))
    return found, strings


def test_unit_numpy_reply_names_numpy1_modules():
    numpy = pytest.importorskip('numpy')    # tests/requirements.txt; a skip fails under CI
    reply = dc.JobReply(uid=1, hash='h', status=dc.DispyJob.Finished,
                        result=[numpy.arange(3.0), numpy.int32(4), numpy.float64(0.5)])
    data = dispynode.dumps_for_36(reply)
    _, strings = _globals(data)
    assert not any(s.startswith('numpy._core') for s in strings), strings
    assert 'numpy.core.multiarray' in strings and strings.count('numpy.core.multiarray') == 2
    assert dispynode.unloadable_on_36(data) is None
    # numpy 2 reads the 1.x names too (the client side, numpy 1.19.5, is
    # test_parity_rows::test_numpy_results)
    result = dc.loads_full(data).result
    assert result[0].tolist() == [0.0, 1.0, 2.0] and result[0].dtype == numpy.float64
    assert result[1] == 4 and result[1].dtype == numpy.int32 and result[2] == 0.5


def test_unit_plain_reply_is_unchanged():
    reply = dc.JobReply(uid=1, hash='h', status=dc.DispyJob.Finished, result={'a': [1, 2.5]})
    assert dispynode.dumps_for_36(reply) == dc.dumps(reply)


def test_unit_numpy2_only_type_is_named():
    numpy = pytest.importorskip('numpy')
    reply = dc.JobReply(uid=1, hash='h', status=dc.DispyJob.Finished,
                        result=numpy.array(['x'], dtype=numpy.dtypes.StringDType()))
    why = dispynode._unloadable_reason(dispynode.dumps_for_36(reply))
    assert why and 'numpy._core._internal._convert_to_stringdtype_kwargs' in why, why
    assert 'numpy 1.x' in why


def test_unit_dest_path_dot_is_the_client_level(tmp_path):
    """dest_path '.' is <prefix>/<client ip> (the original's outcome)."""
    prefix = tmp_path / 'prefix'
    prefix.mkdir(mode=0o700)
    ws = dispynode.Workspace(str(prefix))
    compute = dc.Compute(id=1, auth='ab', name='f', type=1, scheduler_ip_addr='127.0.0.1',
                         scheduler_port=1, job_result_port=1, dest_path='.', xfer_files=[])
    made = ws.make_computation_dir(compute)
    assert made is not None and made[0] == str(prefix / '127.0.0.1'), made


def test_unit_dest_path_dot_with_job_user_gets_its_own_directory(tmp_path):
    """With --job_user the client's level is the node's: '.' gets a new
    directory of its own below it (the jobs run; a refusal would leave them
    Created at the 4.5.5 client)."""
    prefix = tmp_path / 'prefix'
    prefix.mkdir(mode=0o700)
    user = SimpleNamespace(uid=os.getuid(), gid=os.getgid(), name='self')
    ws = dispynode.Workspace(str(prefix), job_user=user)
    compute = dc.Compute(id=1, auth='ab', name='f', type=1, scheduler_ip_addr='127.0.0.1',
                         scheduler_port=1, job_result_port=1, dest_path='.', xfer_files=[])
    made = ws.make_computation_dir(compute)
    assert made is not None, 'refused'
    path = Path(made[0])
    assert path.parent == prefix / '127.0.0.1' and path.is_dir(), made
    assert (path.stat().st_mode & 0o777) == 0o700
    assert ((prefix / '127.0.0.1').stat().st_mode & 0o777) == 0o711
