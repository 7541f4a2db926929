"""Per-job limits (--job_timeout, --job_memory, --job_threads) and the
resource guards (--min_free_memory, --min_free_disk), with the real legacy
client (issue 13)."""

import json
import os
import subprocess
import sys
import time

import pytest

from dispy_common import DispyJob

from legacy import (CLIENTS, REPO, check_client, describe, free_port, run_client,
                    start_client, wait_for)

import driver  # noqa: F401  (puts the repository on sys.path)
from driver import Driver, NodeProcess

pytestmark = [pytest.mark.interop]

FINISHED, TERMINATED = DispyJob.Finished, DispyJob.Terminated


def status(prefix):
    r = subprocess.run([sys.executable, str(REPO / 'dispynode.py'), 'status', '--json',
                        '--dest_path_prefix', str(prefix)],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=30)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def node_descendants(node):
    import psutil
    try:
        return [p for p in psutil.Process(node.pid).children(recursive=True)
                if p.status() != psutil.STATUS_ZOMBIE]
    except psutil.NoSuchProcess:
        return []


def test_job_timeout_kills_the_job_tree(node_factory, legacy_python, tmp_path):
    """A job running `sleep 30` in a shell, past --job_timeout 2, ends
    Terminated with an exception naming the limit; its shell and sleep die."""
    node = node_factory(args=('--job_timeout', '2'))
    t0 = time.monotonic()
    res = run_client(CLIENTS / 'obs_jobs.py', node.port, free_port(), 'mode=shell',
                     'seconds=30', timeout=60, cwd=tmp_path)
    data = check_client(res, node)
    elapsed = time.monotonic() - t0
    [job] = data['jobs']
    assert job['status'] == TERMINATED, describe(res, node)
    assert 'job exceeded --job_timeout 2s' in job['exception'], job
    assert job['result'] is None, job
    assert elapsed < 25, elapsed
    # No `sleep 30` survives: the node keeps only its workers (python).
    left = wait_for(lambda: not [p for p in node_descendants(node) if p.name() in ('sh', 'sleep')],
                    10)
    assert left, [(p.pid, p.cmdline()) for p in node_descendants(node)]
    st = status(node.prefix)
    assert st['jobs_done'] == {'Terminated': 1}, st
    assert st['limit_kills'] == {'job_timeout': 1}, st
    assert st['limits']['job_timeout'] == 2, st


def test_job_memory_limit(node_factory, legacy_python, tmp_path):
    """--job_memory 256m: a job allocating 600 MB gets MemoryError inside the
    job (the address-space limit makes the allocation fail) and ends
    Terminated with the limit named; a 20 MB job still finishes."""
    node = node_factory(args=('--job_memory', '256m'))
    (tmp_path / 'a').mkdir()
    res = run_client(CLIENTS / 'obs_jobs.py', node.port, free_port(), 'mode=alloc', 'mb=600',
                     timeout=60, cwd=tmp_path / 'a')
    data = check_client(res, node)
    [job] = data['jobs']
    assert job['status'] == TERMINATED, describe(res, node)
    assert 'MemoryError in the job: --job_memory 256m limits' in job['exception'], job
    assert 'Traceback' in job['exception'] and 'in compute' in job['exception'], job
    assert job['exception'].endswith('MemoryError\n'), job
    (tmp_path / 'b').mkdir()
    res = run_client(CLIENTS / 'obs_jobs.py', node.port, free_port(), 'mode=alloc', 'mb=20',
                     timeout=60, cwd=tmp_path / 'b')
    data = check_client(res, node)
    [job] = data['jobs']
    assert job['status'] == FINISHED and job['result'] == 20 * 1024 * 1024, job
    st = wait_for(lambda: (lambda s: s if s['jobs_done'].get('Finished') else None)(
        status(node.prefix)), 10)
    assert st['jobs_done'] == {'Terminated': 1, 'Finished': 1}, st
    assert st['limit_kills'] == {'job_memory': 1}, st
    assert st['limits']['job_memory'] == '256m', st
    # Where no cgroup v2 memory controller is delegated, the status says why.
    assert st['limits']['job_memory_cgroup'] or st['limits']['job_memory_cgroup_unavailable']


def test_job_threads_environment(node_factory, legacy_python, tmp_path):
    """--job_threads 3: jobs see OMP_NUM_THREADS and friends set to 3."""
    node = node_factory(args=('--job_threads', '3'))
    res = run_client(CLIENTS / 'obs_jobs.py', node.port, free_port(), 'mode=env', 'jobs=2',
                     timeout=60, cwd=tmp_path)
    data = check_client(res, node)
    for job in data['jobs']:
        assert job['status'] == FINISHED, describe(res, node)
        assert job['result'] == {'OMP_NUM_THREADS': '3', 'OPENBLAS_NUM_THREADS': '3',
                                 'MKL_NUM_THREADS': '3', 'NUMEXPR_NUM_THREADS': '3',
                                 'VECLIB_MAXIMUM_THREADS': '3'}, job


def test_limit_options_are_validated(tmp_path):
    for args, text in ((['--job_memory', '12x'], '--job_memory: invalid size'),
                       (['--job_memory', '1m'], '--job_memory must be at least 16m'),
                       (['--job_timeout', '-1'], '--job_timeout must be'),
                       (['--job_threads', '-2'], '--job_threads must be'),
                       (['--min_free_disk', 'lots'], '--min_free_disk: invalid size')):
        r = subprocess.run([sys.executable, str(REPO / 'dispynode.py'), '-i', '127.0.0.1',
                            '--dest_path_prefix', str(tmp_path / 'p')] + args,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=30)
        assert r.returncode == 2, (args, r)
        assert r.stderr.decode().startswith('dispynode: error: ' + text), (args, r.stderr)


def _served_once_freed(client, node, reading, value, njobs):
    """A guard refuses the client's work: it still waits (no failure); once
    ``reading`` says ``value`` all ``njobs`` of its jobs finish.  Returns the
    node's log."""
    assert client.proc.poll() is None, client.describe()
    reading.write_text(value)
    res = client.result()
    data = check_client(res, node)
    assert [j['status'] for j in data['jobs']] == [FINISHED] * njobs, describe(res, node)
    return node.log()


def test_guard_low_memory_client_sees_busy_node(node_factory, legacy_python, tmp_path):
    """While the (overridden) free memory is below --min_free_memory the node
    takes no computation: the real client finds no node and its jobs wait
    (no failure); the node logs why once.  When memory is back, the node
    announces itself and the client's jobs run."""
    reading = tmp_path / 'free_memory'
    reading.write_text('1m')
    client_port = free_port()
    node = node_factory(args=('--min_free_memory', '64m', '--scheduler_node', '127.0.0.1',
                              '--scheduler_port', str(client_port)),
                        env={'DISPYNODE_FREE_MEMORY': str(reading)})
    st = status(node.prefix)
    assert st['serving'] is False, st
    assert st['refusing'] == 'free memory 1m is below --min_free_memory 64m', st
    with start_client(CLIENTS / 'obs_jobs.py', node.port, client_port, 'mode=sleep',
                      'jobs=3', timeout=60, cwd=tmp_path) as client:
        time.sleep(4)      # the client pings; the node stays silent
        st = status(node.prefix)
        assert st['computations_total'] == 0 and st['jobs_done'] == {}, st
        log = _served_once_freed(client, node, reading, '1g', 3)
    assert log.count('not taking new computations or jobs: free memory 1m is below '
                     '--min_free_memory 64m') == 1, log[-4000:]
    assert log.count('taking work again') == 1, log[-4000:]
    st = status(node.prefix)
    assert st['serving'] is True and st['jobs_done'] == {'Finished': 3}, st


def test_guard_low_disk_refuses_computation_and_jobs(tmp_path):
    """Unit level (driver): with free disk under --min_free_disk, COMPUTE is
    answered 'Busy' and JOB 'NAK (all cpus busy)', what a 4.5.5 client
    treats as a busy node; both are accepted once the disk is free."""
    reading = tmp_path / 'free_disk'
    reading.write_text('10g')
    node = NodeProcess.start(tmp_path / 'n', args=['--min_free_disk', '1g'],
                             env={'DISPYNODE_FREE_DISK': str(reading)})
    try:
        drv = Driver('127.0.0.1', node.port)
        drv.ping_tcp()
        answer, comp = drv.compute('def double(x):\n    return 2 * x\n', 'double')
        assert answer == b'ACK', node.log()
        reading.write_text('100m')
        time.sleep(1.2)      # readings are cached for a second
        assert drv.job(comp.id, 1, (21,)) == b'NAK (all cpus busy)', node.log()
        reading.write_text('2g')
        time.sleep(1.2)
        assert drv.job(comp.id, 2, (21,)) == b'ACK', node.log()
        assert drv.server.wait_reply(2).result == 42
        drv.close(comp.id)
        assert wait_for(lambda: status(node.prefix)['client'] is None, 10)
        reading.write_text('100m')
        time.sleep(1.2)
        answer, _ = drv.compute('def double(x):\n    return 2 * x\n', 'double')
        assert answer == b'Busy', node.log()
        log = node.log()
        assert log.count('not taking new computations or jobs: free disk 100m under') == 2, log
        st = status(node.prefix)
        assert st['guard_refusals'] >= 2 and st['serving'] is False, st
        assert 'below --min_free_disk 1g' in st['refusing'], st
    finally:
        node.stop()


# ---------------------------------------------------------------- cgroup v2 (unit)
# The kernel here may offer no cgroup v2 memory controller; these tests run
# the setup logic against a directory tree shaped like a cgroup v2 mount.

def _fake_cgroup(tmp_path, controllers='cpu memory pids', procs='4242\n', subtree=''):
    mount = tmp_path / 'cg'
    base = mount / 'system.slice' / 'dispynode.service'
    base.mkdir(parents=True)
    (base / 'cgroup.controllers').write_text(controllers + '\n')
    (base / 'cgroup.subtree_control').write_text(subtree)
    (base / 'cgroup.procs').write_text(procs)
    (tmp_path / 'cgroup').write_text('0::/system.slice/dispynode.service\n')
    (tmp_path / 'mounts').write_text('cgroup2 %s cgroup2 rw,nosuid 0 0\n' % mount)
    return base


def _setup(tmp_path):
    import dispynode as dn
    return dn.cgroup_v2_memory(str(tmp_path / 'cgroup'), str(tmp_path / 'mounts'), pid=4242)


def test_cgroup_node_alone_moves_into_a_leaf(tmp_path):
    base = _fake_cgroup(tmp_path)
    group, why = _setup(tmp_path)
    assert why is None and group == str(base / 'dispynode-jobs-4242')
    assert (base / 'node-4242' / 'cgroup.procs').read_text() == '4242'
    assert (base / 'cgroup.subtree_control').read_text() == '+memory'
    assert (base / 'dispynode-jobs-4242' / 'cgroup.subtree_control').read_text() == '+memory'


def test_cgroup_refusals_say_why(tmp_path):
    _fake_cgroup(tmp_path / 'a', controllers='cpu pids')
    assert _setup(tmp_path / 'a') == (
        None, 'the memory controller is not available in %s'
        % (tmp_path / 'a' / 'cg' / 'system.slice' / 'dispynode.service'))
    _fake_cgroup(tmp_path / 'b', procs='4242\n977\n')
    group, why = _setup(tmp_path / 'b')
    assert group is None and 'holds other processes' in why
    (tmp_path / 'c').mkdir()
    (tmp_path / 'c' / 'cgroup').write_text('12:memory:/x\n')
    (tmp_path / 'c' / 'mounts').write_text('')
    assert _setup(tmp_path / 'c') == (None, 'no cgroup v2 hierarchy')


def test_worker_job_cgroup_and_oom_report(tmp_path):
    """The worker takes its job groups in turn, and reports a job that the
    group's OOM killer ended (memory.events counts since it took it)."""
    import socket
    import dispynode as dn
    a, b = socket.socketpair()
    try:
        worker = dn.Worker(a)
        worker.cfg = {'job_memory': 64 * 1024 * 1024, 'job_memory_text': '64m',
                      'cgroup_memory': True}
        worker.cgroup = str(tmp_path)
        for n in range(2):
            (tmp_path / ('job-%d' % n)).mkdir()
            (tmp_path / ('job-%d' % n) / 'memory.events').write_text('oom_kill 2\n')
        worker.free_slots = [dn._JobSlot(str(tmp_path / ('job-%d' % n)))
                             for n in range(2)]
        slot = worker._take_slot()
        assert slot.path == str(tmp_path / 'job-0') and slot.oom == 2
        job = dn._WorkerJob(7, 'h', 0, -1, time.time())
        job.cgroup = slot
        (tmp_path / 'job-0' / 'memory.events').write_text('low 0\nmax 3\noom 1\noom_kill 3\n')
        assert worker._release_slot(job) is True
        assert [s.path for s in worker.free_slots] == [str(tmp_path / 'job-1'),
                                                        str(tmp_path / 'job-0')]
        job.cgroup = worker._take_slot()
        assert worker._release_slot(job) is False       # nothing new in job-1
        assert worker._memory_note('x') == \
            "x: --job_memory 64m limits each job's address space to 67108864 bytes"
        worker.free_slots = []
        assert worker._take_slot() is None
    finally:
        a.close()
        b.close()


def test_guard_mid_computation_client_retries(node_factory, legacy_python, tmp_path):
    """Free disk drops below --min_free_disk while a real client's first two
    jobs run: its next jobs are refused as 'all cpus busy' and the client
    keeps them (no failure) until the disk is free again; then they run."""
    reading = tmp_path / 'free_disk'
    reading.write_text('10g')
    node = node_factory(args=('--min_free_disk', '1g', '--cpus', '2'),
                        env={'DISPYNODE_FREE_DISK': str(reading)})
    with start_client(CLIENTS / 'obs_jobs.py', node.port, free_port(), 'mode=sleep',
                      'jobs=4', 'seconds=3', timeout=90, cwd=tmp_path) as client:
        assert wait_for(lambda: status(node.prefix)['cpus_busy'] == 2, 30), node.log()
        reading.write_text('100m')
        st = wait_for(lambda: (lambda s: s if s['guard_refusals'] >= 2 and s['cpus_busy'] == 0
                               else None)(status(node.prefix)), 30, interval=0.2)
        assert st, node.log()[-4000:]
        assert st['jobs_done'] == {'Finished': 2} and st['serving'] is False, st
        log = _served_once_freed(client, node, reading, '10g', 4)
    assert log.count('not taking new computations or jobs: free disk 100m') == 1, log[-4000:]
    st = status(node.prefix)
    assert st['jobs_done'] == {'Finished': 4} and st['computations_total'] == 1, st
