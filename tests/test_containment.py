"""Issue 20, process containment: every process a job starts ends with the
job, whatever it does (setsid, double fork, closed descriptors); the job
ends as soon as its own process has; workers hold no descriptor of the
node's; a spare worker cannot be reached through /proc by a job of the
same job user.

The escaping job is tests/clients/escape_jobs.py, run by the real dispy
4.5.5 client.  Its processes carry a per-test name (comm), so a /proc scan
finds any that survive.  Our node runs with a cgroup per job (this machine
has cgroup v2) and, with DISPYNODE_NO_CGROUP=1, as the subreaper fallback.
"""

import os
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from dispy_common import DispyJob
from legacy import (CLIENTS, LegacyClient, check_client, describe, free_port, run_client,
                    wait_for)
from nodes import NodeProc, python_for

import driver  # noqa: F401  (puts the repository on sys.path)
import dispynode

pytestmark = [pytest.mark.interop]

FINISHED, TERMINATED = DispyJob.Finished, DispyJob.Terminated
NO_CGROUP = {'DISPYNODE_NO_CGROUP': '1'}


def named(tag):
    """Live (not zombie) processes whose comm is ``tag``."""
    found = []
    for entry in os.listdir('/proc'):
        if not entry.isdigit():
            continue
        try:
            with open('/proc/%s/comm' % entry) as fh:
                if fh.read().strip() != tag:
                    continue
            with open('/proc/%s/stat' % entry) as fh:
                if fh.read().rsplit(')', 1)[1].split()[0] in ('Z', 'X'):
                    continue
        except (OSError, IndexError):
            continue
        found.append(int(entry))
    return found


@pytest.fixture
def tag():
    """A process name for this test's job; whatever still carries it at
    the end is killed (the original node leaves such processes)."""
    name = 'dte%d' % (os.getpid() % 100000) + os.urandom(2).hex()
    yield name
    for pid in named(name):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def gone(tag, timeout=10):
    return wait_for(lambda: not named(tag), timeout)


CASES = [('timeout', 0, None), ('timeout', 1, None), ('cancel', 0, None), ('cancel', 1, None),
         ('return', 1, None), ('timeout', 0, NO_CGROUP), ('cancel', 1, NO_CGROUP),
         ('return', 0, NO_CGROUP)]


@pytest.mark.parametrize('how,closefds,env', CASES,
                         ids=['%s-%s-%s' % (h, 'closed' if c else 'held',
                                            'subreaper' if e else 'cgroup')
                              for h, c, e in CASES])
def test_escaped_processes_end_with_the_job(node_factory, legacy_python, tmp_path, tag,
                                            how, closefds, env):
    """A job forks, the child setsid()s and forks again, the grandchild
    sleeps (holding the job's descriptors, or with all of them closed).
    Under --job_timeout and under cancel the job ends Terminated; a job
    that returns leaving it running ends Finished with its result.  Either
    way the job ends promptly at the client, no process of it survives,
    and the next job runs.  (On 286bf51 the held-descriptor job never ended
    and every grandchild survived.)"""
    args = ('--job_timeout', '3') if how == 'timeout' else ()
    node = node_factory(args=args, env=env)
    res = run_client(CLIENTS / 'escape_jobs.py', node.port, free_port(), 'tag=' + tag,
                     'how=' + how, 'closefds=%d' % closefds, timeout=100, cwd=tmp_path)
    data = check_client(res, node)
    assert data['final'] is True, describe(res, node)
    job = data['job']
    if how == 'return':
        assert job['status'] == FINISHED and job['result'] == 'returned', job
    else:
        assert job['status'] == TERMINATED, job
        if how == 'timeout':
            assert 'job exceeded --job_timeout 3s' in job['exception'], job
    assert gone(tag), (named(tag), node.log()[-3000:])
    assert data['quick_final'] and data['quick']['result'] == 'next job ran', data['quick']
    assert ('contained without a cgroup' if env else 'each job runs in a cgroup of its own') \
        in node.log()


@pytest.mark.parametrize('how', ['cancel', 'return'])
def test_original_node_ends_the_job_but_leaves_its_processes(legacy_python, tmp_path, tag,
                                                              how):
    """What the 4.5.5 node does with the same job (it has no --job_timeout):
    the job ends (Terminated on cancel, Finished with its result on
    return), and the setsid grandchild keeps running.  We end the job the
    same way, and end the grandchild with it.  (The original node always,
    whatever DISPYTEST_IMPLS says: this is the side-by-side baseline.)"""
    node = NodeProc.start(tmp_path / 'original', impl='original')
    try:
        res = run_client(CLIENTS / 'escape_jobs.py', node.port, free_port(), 'tag=' + tag,
                         'how=' + how, 'closefds=0', timeout=100, cwd=tmp_path)
    finally:
        node.stop(timeout=5)
    data = check_client(res, node)
    assert data['final'] is True, describe(res, node)
    assert data['job']['status'] == (FINISHED if how == 'return' else TERMINATED)
    assert data['quick']['result'] == 'next job ran'
    assert named(tag) == [data['provisional']['grandchild']]


@pytest.mark.parametrize('env', [None, NO_CGROUP], ids=['cgroup', 'subreaper'])
def test_node_stop_ends_every_process_of_a_job(node_factory, legacy_python, tmp_path, tag,
                                               env):
    """The node stops (SIGINT) while the escaping job runs: the client is
    told at once (the job is abandoned, as with the original), and no
    process of the job survives the node."""
    node = node_factory(env=env)
    client = LegacyClient(CLIENTS / 'escape_jobs.py', node.port, free_port(), 'tag=' + tag,
                          'how=stop', cwd=tmp_path, watchdog=80)
    with client:
        assert client.wait_line('PROVISIONAL:', 40) is not None, client.err
        assert len(named(tag)) == 2
        node.stop(signal.SIGINT, timeout=20)
        data = client.finish(60)
    assert data and data['final'] is True, (data, node.log()[-3000:])
    assert data['job']['status'] in (DispyJob.Abandoned, TERMINATED), data['job']
    assert gone(tag), named(tag)



def _parent(pid):
    with open('/proc/%d/stat' % pid) as fh:
        return int(fh.read().rsplit(')', 1)[1].split()[1])


@pytest.mark.parametrize('env', [None, NO_CGROUP], ids=['cgroup', 'subreaper'])
def test_killed_worker_ends_every_process_of_its_jobs(node_factory, legacy_python, tmp_path,
                                                      tag, env):
    """The computation's worker is killed (kill -9, as by the OOM killer)
    while the escaping job runs: the job ends Terminated at the client, and
    no process of it survives, the setsid grandchild (outside the worker's
    session) included."""
    node = node_factory(env=env)
    client = LegacyClient(CLIENTS / 'escape_jobs.py', node.port, free_port(), 'tag=' + tag,
                          'how=stop', cwd=tmp_path, watchdog=80)
    with client:
        assert client.wait_line('PROVISIONAL:', 40) is not None, client.err
        jobs = named(tag)
        assert len(jobs) == 2
        workers = {_parent(pid) for pid in jobs} - set(jobs) - {1}   # 1: a reparented grandchild
        assert len(workers) == 1, (jobs, workers)
        os.kill(workers.pop(), signal.SIGKILL)
        data = client.finish(60)
    assert data and data['final'] is True, (data, node.log()[-3000:])
    assert data['job']['status'] == TERMINATED, data['job']
    assert 'killed by signal 9' in data['job']['exception'], data['job']
    assert gone(tag), (named(tag), node.log()[-3000:])


ESCAPE_CODE = textwrap.dedent('''
    def escape(tag):
        import ctypes, os, time
        child = os.fork()
        if child == 0:
            os.setsid()
            if os.fork() == 0:
                ctypes.CDLL(None).prctl(15, ctypes.c_char_p(tag.encode()), 0, 0, 0)
                while True:
                    time.sleep(1)
            os._exit(0)
        os.waitpid(child, 0)
        ctypes.CDLL(None).prctl(15, ctypes.c_char_p(tag.encode()), 0, 0, 0)
        time.sleep(600)
''')


@pytest.mark.parametrize('env', [None, NO_CGROUP], ids=['cgroup', 'subreaper'])
def test_close_with_terminate_pending_ends_every_process(node_factory, tmp_path, tag, env):
    """CLOSE with terminate_pending (recover_jobs(terminate_pending=True)
    sends it) while the escaping job runs: the computation closes, none of
    its processes survive, and the next computation's job runs."""
    from driver import Driver
    node = node_factory(env=env)
    d = Driver('127.0.0.1', node.port)
    d.ping_tcp()
    answer, comp = d.compute(ESCAPE_CODE, 'escape')
    assert answer == b'ACK'
    assert d.job(comp.id, 1, (tag,)) == b'ACK'
    assert wait_for(lambda: len(named(tag)) == 2, 20), node.log()[-2000:]
    d.close(comp.id, terminate_pending=True)
    assert wait_for(lambda: 'computation %s closed' % comp.id in node.log(), 20), node.log()
    assert gone(tag), named(tag)
    answer, comp2 = d.compute('def f(n):\n    return n + 1\n', 'f')
    assert answer == b'ACK'
    assert d.job(comp2.id, 7, (41,)) == b'ACK'
    reply = d.server.wait_reply(7, 20)
    assert reply is not None and reply.result == 42, reply
    d.close(comp2.id)
    d.close_server()


# ---------------------------------------------------------------- descriptors

FD_CLIENT = textwrap.dedent('''
    def probe(text):
        import os, select
        out = {}
        for fd in (0, 1, 2):
            info = {'tty': os.isatty(fd)}
            try:
                ready = select.select([fd], [], [], 3)[0]
                info['read'] = os.read(fd, 100).decode('latin-1') if ready else None
            except OSError as exc:
                info['read'] = type(exc).__name__
            try:
                os.write(fd, text.encode())
            except OSError as exc:
                info['write'] = type(exc).__name__
            out[fd] = info
        out['fds'] = sorted(int(n) for n in os.listdir('/proc/self/fd'))
        return out
''')


ONE_JOB_MAIN = '''
if __name__ == '__main__':
    import _common as c
    def main():
        node_port, client_port, extra = c.ports()
        cluster = c.cluster(%s, node_port, client_port)
        jobs = c.submit(cluster, [%s])
        c.finish(c.collect(cluster, jobs, wait=60), cluster)
    c.run(main, timeout=90)
'''


def _client_code(code, func, args='()'):
    """A client script (finding tests/clients/_common.py) that runs one job,
    ``func(*args)`` of ``code`` (``args``: the tuple's source), and reports it."""
    return ('import sys\nsys.path.insert(0, %r)\n' % str(CLIENTS) + code
            + ONE_JOB_MAIN % (func, args))


def test_a_job_gets_nothing_of_the_nodes_terminal(legacy_python, tmp_path):
    """The node's stdin, stdout and stderr are a terminal (a console node);
    a job reading fd 0 and fd 1 gets none of the operator's typing, and
    what it writes on 1 and 2 does not appear on the terminal: its
    descriptors 0-2 are /dev/null, and it holds no descriptor above 2 but
    its reply pipe.  (On 286bf51 fd 1 and 2 were the node's terminal.)"""
    import test_console as tc
    term, proc, port = tc.start_console_node(tmp_path)
    try:
        assert term.wait_for('dispynode console', 20), term.text
        client = LegacyClient(_client_code(FD_CLIENT, 'probe', '(extra[0],)'), port, free_port(),
                              'FORGED-BY-JOB', cwd=tmp_path, watchdog=80)
        with client:
            # the operator types while the job runs (its reads wait 3 s each)
            for _ in range(60):
                if client.proc.poll() is not None:
                    break
                os.write(term.master, b'operator-secret-line\n')
                time.sleep(0.5)
            data = client.finish(80)
        assert data and data['all_final'], (data, term.text)
        [job] = data['jobs']
        assert job['status'] == FINISHED, job
        found = job['result']
        for fd in ('0', '1', '2'):
            assert found[fd]['tty'] is False, found
            assert 'operator-secret' not in str(found[fd]['read']), found
        assert 'FORGED-BY-JOB' not in term.text, term.text
        assert len([fd for fd in found['fds'] if fd > 2]) <= 2, found  # its pipe (+ listdir)
    finally:
        proc.send_signal(signal.SIGINT)     # a clean stop: the node removes its cgroup
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            pass
        tc._stop(proc)
        term.close()


def test_a_job_cannot_write_into_a_daemon_nodes_log(node_factory, legacy_python, tmp_path):
    """--daemon: the node logs to its stdout/stderr (here a file); a job's
    writes on fd 1 and 2 land nowhere near it."""
    node = node_factory(args=('--daemon',))
    res = run_client(_client_code(FD_CLIENT, 'probe', '(extra[0],)'), node.port, free_port(),
                     'FORGED-LOG-LINE', timeout=90, cwd=tmp_path)
    data = check_client(res, node)
    [job] = data['jobs']
    assert job['status'] == FINISHED, job
    assert job['result']['2']['tty'] is False
    time.sleep(0.2)
    assert 'FORGED-LOG-LINE' not in node.log(), node.log()[-2000:]


# ---------------------------------------------------------------- --job_user

SPARE_CODE = textwrap.dedent('''
    def poke():
        import os
        def parent(pid):
            return int(open('/proc/%d/stat' % pid).read().rsplit(')', 1)[1].split()[1])
        out = {'uid': os.getuid(), 'cgroup': open('/proc/self/cgroup').read(),
               'worker': os.getppid()}
        node = parent(os.getppid())
        for entry in os.listdir('/proc'):
            if not entry.isdigit() or int(entry) == os.getpid():
                continue
            try:
                if parent(int(entry)) != node:
                    continue        # the workers of this node only
            except (OSError, IndexError, ValueError):
                continue
            try:
                with open('/proc/%s/mem' % entry, 'r+b'):
                    out[entry] = 'opened'
            except OSError as exc:
                out[entry] = type(exc).__name__
        return out
''')


def test_a_job_cannot_open_the_spare_workers_memory(legacy_python, tmp_path):
    """--job_user nobody: another process of the job user opens the spare
    worker's /proc/<pid>/mem (the spare serves the next client) for
    writing: refused, workers are not dumpable (the kernel here has no
    Yama).  A job, as nobody, gets the same refusal for its own worker, and
    runs in a job cgroup the node made for it.  (On 286bf51 both opens
    succeeded.)"""
    python = python_for('nobody')
    workdir = Path(tempfile.mkdtemp(prefix='dispynode-deploy-', dir='/tmp'))
    workdir.chmod(0o755)
    node = NodeProc.start(workdir, ['--job_user', 'nobody'], copy_as='dispynode.py',
                          python=python, timeout=20)
    try:
        spare = wait_for(lambda: [p for p in _workers(node.pid)], 20)
        assert spare, 'no spare worker'
        assert wait_for(lambda: _booted(spare[0]), 20), 'the spare worker did not boot'
        probe = ('import sys\ntry:\n    open("/proc/%d/mem" % int(sys.argv[1]), "r+b")\n'
                 'except OSError as exc:\n    print(type(exc).__name__)\n'
                 'else:\n    print("opened")\n')
        nobody = __import__('pwd').getpwnam('nobody')
        out = subprocess.run([python, '-c', probe, str(spare[0])], user=nobody.pw_uid,
                             group=nobody.pw_gid, extra_groups=[], stdout=subprocess.PIPE,
                             timeout=30).stdout.decode().strip()
        assert out == 'PermissionError', out
        res = run_client(_client_code(SPARE_CODE, 'poke'), node.port, free_port(), timeout=90,
                         cwd=tmp_path)
        data = check_client(res, node)
        [job] = data['jobs']
        assert job['status'] == FINISHED, job
        found = job['result']
        assert found['uid'] == __import__('pwd').getpwnam('nobody').pw_uid
        others = {k: v for k, v in found.items() if k.isdigit()}
        assert str(found['worker']) in others, found
        assert set(others.values()) == {'PermissionError'}, found
        assert '/dispynode-jobs-' in found['cgroup'] and '/job-' in found['cgroup'], found
    finally:
        node.stop()
        subprocess.run(['rm', '-rf', str(workdir)])


def _booted(pid):
    """Whether a worker has imported its implicit modules (worker_main
    does that after its start-up settings)."""
    try:
        with open('/proc/%d/maps' % pid) as fh:
            maps = fh.read()
    except OSError:
        return False
    return any(name in maps for name in ('/_ssl.', '/_bz2.', '/_lzma.', '/unicodedata.'))


def _workers(node_pid):
    out = []
    for entry in os.listdir('/proc'):
        if entry.isdigit():
            try:
                with open('/proc/%s/stat' % entry) as fh:
                    ppid = int(fh.read().rsplit(')', 1)[1].split()[1])
                if ppid == node_pid:
                    out.append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    return out


# ---------------------------------------------------------------- unit

def _tree(tag):
    """A child that forks a setsid()ed grandchild; both named ``tag``."""
    code = textwrap.dedent('''
        import ctypes, os, sys, time
        name = lambda: ctypes.CDLL(None).prctl(15, ctypes.c_char_p(sys.argv[1].encode()), 0, 0, 0)
        if os.fork() == 0:
            os.setsid()
            name()
            while True:
                time.sleep(1)
        name()
        while True:
            time.sleep(1)
    ''')
    return subprocess.Popen([sys.executable, '-c', code, tag], start_new_session=True)


def test_unit_kill_tree_reaches_a_setsid_grandchild(tag):
    proc = _tree(tag)
    try:
        assert wait_for(lambda: len(named(tag)) == 2, 10)
        killed = dispynode.kill_tree(proc.pid, signal.SIGKILL)
        assert proc.pid in killed and len(killed) >= 2
        proc.wait(5)
        assert gone(tag, 5), named(tag)
    finally:
        proc.kill()


def test_unit_subreaper_job_ends_its_own_children(tag):
    """No cgroup: a job process is a child subreaper; its orphans (setsid
    grandchild) come back to it, and end_own_children kills and reaps them."""
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            assert dispynode.prctl(dispynode.PR_SET_CHILD_SUBREAPER, 1)
            proc = _tree(tag)
            wait_for(lambda: len(named(tag)) == 2, 10)
            proc.kill()
            proc.wait()         # its grandchild is an orphan now: ours
            dispynode.end_own_children()
            status = 0 if not named(tag) else 2
        finally:
            os._exit(status)
    _, status = os.waitpid(pid, 0)
    assert status == 0, status
    assert gone(tag, 5)


def _real_cgroup(tmp_path):
    group, why = dispynode.cgroup_v2_jobs()
    if group is None and os.environ.get('CI') == 'true':
        pytest.fail('no cgroup v2 group under CI: %s' % why)
    if group is None:
        pytest.skip(why)
    return group


def test_unit_worker_cgroup_holds_and_kills_a_setsid_tree(tmp_path, tag):
    """make_worker_cgroup on the real cgroup v2 tree: the worker's leaf and
    its job groups, delegated to a job user; a process tree in a job group
    (setsid or not) dies with cgroup.kill; remove_cgroup removes it all."""
    group = _real_cgroup(tmp_path)
    sleeper = subprocess.Popen(['sleep', '60'])
    try:
        path = dispynode.make_worker_cgroup(group, sleeper.pid, 2, owner=65534)
        assert path == os.path.join(group, 'w-%d' % sleeper.pid)
        with open(os.path.join(path, 'worker', 'cgroup.procs')) as fh:
            assert fh.read().split() == [str(sleeper.pid)]
        # it may move its job processes among its job groups and kill them
        # (and, once the node is gone, all of its own group)
        for name in ('cgroup.procs', 'cgroup.kill', 'job-0/cgroup.procs', 'job-1/cgroup.kill'):
            assert os.stat(os.path.join(path, name)).st_uid == 65534, name
        # but not into the worker's leaf, nor make groups or set limits
        for name in ('worker/cgroup.procs', 'job-0/cgroup.subtree_control',
                     'cgroup.subtree_control'):
            assert os.stat(os.path.join(path, name)).st_uid == 0, name
        assert os.stat(path).st_uid == 0           # no new groups for the job user
        proc = _tree(tag)
        with open(os.path.join(path, 'job-1', 'cgroup.procs'), 'w') as fh:
            fh.write(str(proc.pid))
        assert wait_for(lambda: len(named(tag)) == 2, 10)
        dispynode._cgroup_kill(os.path.join(path, 'job-1'))
        proc.wait(5)
        assert gone(tag, 5)
        assert sleeper.poll() is None           # the worker's leaf is not the job's
        assert dispynode.remove_cgroup(path)
        assert not os.path.exists(path)
        sleeper.wait(5)                          # remove_cgroup killed what was left
    finally:
        sleeper.kill()
        dispynode.remove_cgroup(group)


def test_unit_worker_cgroup_with_memory_limits_every_job_group(tmp_path):
    """With the memory controller (a fake tree here: the kernel may offer
    none in v2): each job group gets memory.max = --job_memory and no
    swap, the worker's group hands memory to its children, and the job
    user owns none of the limit files."""
    group = tmp_path / 'jobs'
    group.mkdir()
    path = dispynode.make_worker_cgroup(str(group), 4242, 3, memory=64 << 20)
    assert path == str(group / 'w-4242')
    assert (group / 'w-4242' / 'cgroup.subtree_control').read_text() == '+memory'
    assert (group / 'w-4242' / 'worker' / 'cgroup.procs').read_text() == '4242'
    for n in range(3):
        job = group / 'w-4242' / ('job-%d' % n)
        assert (job / 'memory.max').read_text() == str(64 << 20)
        assert (job / 'memory.swap.max').read_text() == '0'


UNIT_CODE = textwrap.dedent('''
    def escape(tag, end):
        import ctypes, os, time
        child = os.fork()
        if child == 0:
            os.setsid()
            if os.fork() == 0:
                ctypes.CDLL(None).prctl(15, ctypes.c_char_p(tag.encode()), 0, 0, 0)
                while True:
                    time.sleep(1)
            os._exit(0)
        os.waitpid(child, 0)
        if end == 'exit':
            os._exit(3)
        if end == 'wait':
            time.sleep(600)
        return 'returned'
''')


@pytest.mark.parametrize('env', [None, NO_CGROUP], ids=['cgroup', 'subreaper'])
@pytest.mark.parametrize('end', ['return', 'exit', 'terminate'])
def test_unit_job_ends_when_its_process_does(tmp_path, tag, env, end):
    """The worker ends a job once it has reaped the job's own process,
    whoever holds the reply pipe (a setsid grandchild here): a return is
    Finished with its result, an os._exit without a reply and a
    TERMINATE_JOB are Terminated; the grandchild dies with the job (without
    a cgroup: for os._exit, by the worker's sweep of what came back to it),
    and the next job runs."""
    from driver import Driver, InProcessNode
    node = InProcessNode.start(tmp_path / 'n', args=('-c', '2'), env=env)
    d = Driver('127.0.0.1', node.port)
    try:
        assert d.ping_tcp() is not None
        answer, comp = d.compute(UNIT_CODE, 'escape')
        assert answer == b'ACK'
        assert d.job(comp.id, 1, (tag, 'wait' if end == 'terminate' else end)) == b'ACK'
        if end == 'terminate':
            assert wait_for(lambda: named(tag), 10)
            d.terminate(comp.id, 1)
        reply = d.server.wait_reply(1, 20)
        assert reply is not None, node.log()
        if end == 'return':
            assert reply.status == FINISHED and reply.result == 'returned', reply.exception
        else:
            assert reply.status == TERMINATED, reply
            if end == 'exit':
                assert 'exited with status 3 without a result' in reply.exception
        assert gone(tag), named(tag)
        assert d.job(comp.id, 2, (tag, 'return')) == b'ACK'
        assert d.server.wait_reply(2, 20).result == 'returned'
        assert gone(tag), named(tag)
        assert ('contained without a cgroup' if env else 'each job runs in a cgroup') \
            in node.log()
    finally:
        d.close_server()
        node.stop()


def test_unit_groups_of_dead_nodes_are_removed(tmp_path):
    """A node killed with SIGKILL cannot remove its jobs' group; the next
    node to start removes it (with whatever is left in it), and leaves the
    groups of live nodes alone."""
    group = _real_cgroup(tmp_path)
    base = os.path.dirname(group)
    dead = subprocess.Popen(['true'])
    dead.wait()
    stale = os.path.join(base, 'dispynode-jobs-%d' % dead.pid)
    try:
        os.mkdir(stale)
        os.mkdir(os.path.join(stale, 'w-1'))
        other, _ = dispynode.cgroup_v2_jobs()
        assert not os.path.exists(stale)
        assert os.path.isdir(group)             # this process is alive
        dispynode.remove_cgroup(other)
    finally:
        dispynode.remove_cgroup(stale)
        dispynode.remove_cgroup(group)


PLANT_CODE = textwrap.dedent('''
    def plant(marker_dir):
        # a .pth in the job user's site-packages runs in every interpreter
        # that loads the user site: the next client's worker included
        import os, site
        where = site.getusersitepackages()
        os.makedirs(where, exist_ok=True)
        with open(os.path.join(where, 'zz_planted.pth'), 'w') as fh:
            fh.write("import os; open(os.path.join(%r, 'ran-' + str(os.getpid())), 'w').close()\\n"
                     % marker_dir)
        return where
''')

NOOP_CODE = textwrap.dedent('''
    def noop():
        import os
        return os.environ.get('PYTHONNOUSERSITE')
''')


def test_a_job_cannot_plant_code_in_the_job_users_site_packages(legacy_python, tmp_path):
    """--job_user nobody with a home the job user may write (HOME names
    it): a job writes a .pth file into its user site-packages.  Workers
    start without the user site (python -s) and jobs get PYTHONNOUSERSITE,
    so the worker that serves the next client does not run it, nor does a
    Python the next client's job starts.  (Before, every later worker ran
    it.)"""
    python = python_for('nobody')
    nobody = __import__('pwd').getpwnam('nobody')
    workdir = Path(tempfile.mkdtemp(prefix='dispynode-deploy-', dir='/tmp'))
    workdir.chmod(0o755)
    home, markers = workdir / 'home', workdir / 'markers'
    for folder in (home, markers):
        folder.mkdir()
        os.chown(str(folder), nobody.pw_uid, nobody.pw_gid)
    node = NodeProc.start(workdir, ['--job_user', 'nobody'], copy_as='dispynode.py',
                          python=python, timeout=20, env={'HOME': str(home)})
    try:
        res = run_client(_client_code(PLANT_CODE, 'plant', '(%r,)' % str(markers)), node.port,
                         free_port(), timeout=90, cwd=tmp_path)
        [job] = check_client(res, node)['jobs']
        assert job['status'] == FINISHED, job
        assert job['result'].startswith(str(home)), job    # the plant took
        for _ in range(2):      # the spare started before the plant, then a fresh one
            res = run_client(_client_code(NOOP_CODE, 'noop'), node.port, free_port(), timeout=90,
                             cwd=tmp_path)
            [job] = check_client(res, node)['jobs']
            assert job['status'] == FINISHED, job
            assert job['result'] == '1', job     # nor the Pythons a job starts
        # every worker the node has now has booted (and so read its site)
        assert wait_for(lambda: _workers(node.pid) and all(
            _booted(pid) for pid in _workers(node.pid)), 20), 'workers did not boot'
        assert not list(markers.iterdir()), 'a worker ran the planted .pth'
    finally:
        node.stop()
        subprocess.run(['rm', '-rf', str(workdir)])


BOOT_WATCH = textwrap.dedent('''
    import os, sys, time
    mark, deadline = sys.argv[1].encode(), time.time() + float(sys.argv[2])
    while time.time() < deadline:
        for entry in os.listdir('/proc'):
            if not entry.isdigit():
                continue
            try:
                with open('/proc/%s/cmdline' % entry, 'rb') as fh:
                    cmd = fh.read()
            except OSError:
                continue
            if mark in cmd and b'worker_main' in cmd:
                try:
                    open('/proc/%s/mem' % entry, 'r+b').close()
                except OSError as exc:
                    print(type(exc).__name__)
                else:
                    print('opened')
                sys.exit(0)
    print('unseen')
''')


def test_a_booting_spare_worker_is_never_open_to_the_job_user(tmp_path):
    """--job_user nobody: a process of the job user watches /proc for the
    spare worker as it boots and opens its /proc/<pid>/mem for writing at
    once.  Refused: the worker starts as root and becomes the job user by
    setuid, which leaves it not dumpable.  (Started as the job user, it was
    dumpable until worker_main cleared that, and the open succeeded: a
    descriptor that stays good when it serves the next client.)"""
    python = python_for('nobody')
    nobody = __import__('pwd').getpwnam('nobody')
    workdir = Path(tempfile.mkdtemp(prefix='dispynode-deploy-', dir='/tmp'))
    workdir.chmod(0o755)
    (workdir / 'watch.py').write_text(BOOT_WATCH)
    mark = str(workdir / 'deploy')
    watcher = subprocess.Popen([python, str(workdir / 'watch.py'), mark, '60'],
                               user=nobody.pw_uid, group=nobody.pw_gid, extra_groups=[],
                               stdout=subprocess.PIPE)
    node = None
    try:
        node = NodeProc.start(workdir, ['--job_user', 'nobody'], copy_as='dispynode.py',
                              python=python, timeout=20)
        out = watcher.communicate(timeout=70)[0].decode().strip()
        assert out == 'PermissionError', out
        # and the worker does run as the job user
        [spare] = wait_for(lambda: _workers(node.pid), 20)
        assert wait_for(lambda: _booted(spare), 20), 'the spare worker did not boot'
        with open('/proc/%d/status' % spare) as fh:
            ids = [line.split()[1:] for line in fh if line.startswith(('Uid:', 'Gid:', 'Groups:'))]
        assert ids == [[str(nobody.pw_uid)] * 4, [str(nobody.pw_gid)] * 4, []], ids
    finally:
        if watcher.poll() is None:
            watcher.kill()
            watcher.wait()
        if node is not None:
            node.stop()
        subprocess.run(['rm', '-rf', str(workdir)])
