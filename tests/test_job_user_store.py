"""Issue 20, the storage half of "--job_user separates for real": root
never follows a path a job can change; the result store is out of every
job's reach and its replies are bound to their computation (HMAC); one
client's jobs cannot read another's files; client-given names cannot forge
log lines or terminal output; the worker channel is bounded; FILEXFER
honours the disk guard.  Each test fails on 286bf51.

The --job_user tests run a copy of the node (in a folder the job user may
read) as root, with the job user ``nobody``, as a deployment would.
"""

import glob
import json
import os
import pickle
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
import types
from pathlib import Path

import pytest

import dispy_common as dc
import dispynode as dn
from driver import Driver, InProcessNode, NodeProcess, ReplyServer, wait_for
from legacy import CLIENTS, REPO, find_files, free_port, run_client
from nodes import NodeProc, python_for
from recovery_util import REPLY_PREFIX, wait_node_free

pytestmark = [pytest.mark.interop]

FINISHED, TERMINATED = dc.DispyJob.Finished, dc.DispyJob.Terminated
PY_TAG = sys.implementation.cache_tag       # e.g. cpython-311


@pytest.fixture
def job_user_node():
    """start(*args, env=None) -> a node (NodeProc) run as root with
    --job_user nobody from a deploy copy under a fresh /tmp folder; also
    ``start.root_only``, a directory outside the prefix only root may use."""
    if os.geteuid() != 0:
        pytest.fail('the --job_user tests run as root (the suite does)')
    workdir = Path(tempfile.mkdtemp(prefix='dispynode-store-', dir='/tmp'))
    workdir.chmod(0o755)
    started = []
    python = python_for('nobody')

    def start(*args, env=None, port=None):
        # each run in a folder of its own (its own log: readiness is read there)
        run = workdir / ('run-%d' % len(started))
        run.mkdir(mode=0o755)
        node = NodeProc.start(run, ['--job_user', 'nobody'] + list(args),
                              copy_as='dispynode.py', python=python, port=port,
                              prefix=workdir / 'deploy' / 'prefix', timeout=20, env=env)
        started.append(node)
        return node
    start.root_only = workdir / 'root-only'
    start.root_only.mkdir(mode=0o700)
    start.workdir = workdir
    try:
        yield start
    finally:
        for node in started:
            node.stop(signal.SIGTERM, 15)
        shutil.rmtree(str(workdir), ignore_errors=True)


def snapshot(directory):
    """{name: bytes} of a directory's regular files (and its symlinks)."""
    out = {}
    for name in sorted(os.listdir(str(directory))):
        path = os.path.join(str(directory), name)
        out[name] = os.readlink(path) if os.path.islink(path) else (
            open(path, 'rb').read() if os.path.isfile(path) else 'dir')
    return out


def plant_victims(target):
    """Files root keeps in ``target``, which the attacks aim at."""
    (target / 'victim').write_bytes(b'root data')
    (target / ('mod.%s.pyc' % PY_TAG)).write_bytes(b'root bytecode')
    (target / 'mod.py').write_bytes(b'root module')
    return snapshot(target)


SWAP = '''
def swap(target, what):
    """As the job user: put a symlink to ``target`` where the node looks."""
    import os
    here = os.getcwd()
    try:
        if what == 'dir':
            os.rename(here, here + '.away')
            os.symlink(target, here)
        else:
            os.symlink(target, os.path.join(here, '__pycache__'))
        return 'swapped'
    except OSError as exc:
        return type(exc).__name__
'''


def test_job_user_swapped_nested_dest_path_writes_and_deletes_nothing_outside(
        job_user_node, tmp_path):
    """A job of a nested dest_path 'outer/inner' moves its directory away
    and leaves a symlink to a root-only directory T in its place; then the
    client sends a per-job file, the job's reply is stored and the job that
    used the file ends.  Nothing in T is written, replaced or deleted."""
    node = job_user_node()
    target = job_user_node.root_only
    before = plant_victims(target)
    drv = Driver('127.0.0.1', node.port, server=ReplyServer(ack=False))
    drv.ping_tcp()
    answer, comp = drv.compute(SWAP, 'swap', dest_path='outer/inner')
    assert answer == b'ACK', node.log()
    assert drv.job(comp.id, 1, (str(target), 'dir')) == b'ACK'
    assert wait_for(lambda: find_files(node.prefix, REPLY_PREFIX + '1'), 15), node.log()
    swapped = drv.retrieve(comp.id, 1)
    assert swapped is not None and swapped.status == FINISHED, swapped
    # the levels above a job's directory are root's: the job cannot move it
    assert swapped.result == 'PermissionError', swapped.result
    victim = tmp_path / 'victim'
    victim.write_bytes(b'client data')
    xf = drv.xfer_file(victim, comp.id)
    assert drv.xfer(victim, comp.id) == (b'NAK', b'ACK')
    assert drv.job(comp.id, 2, (str(target), 'none'), xfer_files=[xf]) == b'ACK'
    assert wait_for(lambda: find_files(node.prefix, REPLY_PREFIX + '2'), 15), node.log()
    drv.close(comp.id)
    assert wait_node_free(node.port, 15), node.log()
    assert snapshot(target) == before


def test_job_user_planted_pycache_symlink_is_not_followed_at_close(job_user_node, tmp_path):
    """A job links its directory's __pycache__ to a root-only directory T
    holding mod.<tag>.pyc; the computation transferred mod.py, so CLOSE
    cleans mod's bytecode: T keeps every file."""
    node = job_user_node()
    target = job_user_node.root_only
    before = plant_victims(target)
    mod = tmp_path / 'mod.py'
    mod.write_text('X = 1\n')
    drv = Driver('127.0.0.1', node.port)
    drv.ping_tcp()
    answer, comp = drv.compute(SWAP, 'swap', dest_path='pyc',
                               xfer_files=[drv.xfer_file(mod, 0)])
    assert answer == b'ACK', node.log()
    assert drv.xfer(mod, comp.id) == (b'NAK', b'ACK')
    assert drv.job(comp.id, 1, (str(target), 'pycache')) == b'ACK'
    reply = drv.server.wait_reply(1, timeout=15)
    assert reply.result == 'swapped', reply     # its own directory: the job may
    drv.close(comp.id)
    assert wait_node_free(node.port, 15), node.log()
    assert snapshot(target) == before


# ---------------------------------------------------------------- separation

def _client(node, actions, cwd, dest_path=''):
    res = run_client(CLIENTS / 'job_user_files.py', node.port, free_port(),
                     'actions=%s' % json.dumps(actions),
                     *(['dest_path=%s' % dest_path] if dest_path else []),
                     timeout=90, cwd=str(cwd))
    assert res.data and res.data.get('all_final') and res.data.get('closed'), \
        res.describe() + node.log()[-6000:]
    return [j['result'] for j in res.data['jobs']]


def test_job_user_later_client_cannot_read_an_earlier_clients_files(job_user_node, tmp_path):
    """A real client's job writes results.csv into its dest_path and the
    client closes (the file stays, as on the original).  A later client's
    job, run as the same job user, cannot read it, nor list the earlier
    client's directory; a computation naming that dest_path again works
    in it as before."""
    node = job_user_node()
    written, = _client(node, [['write', 'results.csv']], tmp_path, dest_path='first')
    assert written.endswith('/first/results.csv'), written
    assert wait_node_free(node.port, 15), node.log()
    assert os.path.isfile(written)          # kept, as the original keeps jobs' files
    got = _client(node, [['read', written], ['list', os.path.dirname(written)]], tmp_path,
                  dest_path='second')
    assert got == ['PermissionError', 'PermissionError'], got
    assert wait_node_free(node.port, 15), node.log()
    # the first client's dest_path, named again, is the job user's again
    again, = _client(node, [['read', 'results.csv']], tmp_path, dest_path='first')
    assert again == "read:the first client's data\n", again


def test_job_user_directory_of_two_running_computations_stays_open(job_user_node):
    """Two computations of one client name the same dest_path: the first
    one's end does not close the directory under the second one's jobs;
    the second one's end does."""
    node = job_user_node()
    drv = Driver('127.0.0.1', node.port)
    drv.ping_tcp()
    probe = (CLIENTS / 'job_user_files.py').read_text().split("if __name__ ==")[0]
    first = drv.compute(probe, 'probe', dest_path='shared')[1]
    second = drv.compute(probe, 'probe', dest_path='shared')[1]
    assert first.id in drv.computes and second.id in drv.computes, node.log()
    assert drv.job(first.id, 1, ('write', 'a.txt')) == b'ACK'
    path = drv.server.wait_reply(1, timeout=15).result
    drv.close(first.id)
    assert wait_for(lambda: 'computation %s closed' % first.id in node.log(), 15), node.log()
    assert drv.job(second.id, 2, ('read', 'a.txt')) == b'ACK'
    assert drv.server.wait_reply(2, timeout=15).result == "read:the first client's data\n"
    drv.close(second.id)
    assert wait_node_free(node.port, 15), node.log()
    st = os.stat(os.path.dirname(path))
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o700), st


def test_job_user_stored_results_cannot_be_stolen_moved_or_forged(job_user_node, tmp_path):
    """Client B (a real 4.5.5 client) dies with two results stored.  Client
    A's job, as the job user, tries to move one into its own directory and
    to write over the other: refused.  Then, as if someone with the disk
    did it, a copy of B's stored reply is put among A's stored replies
    under B's uid, and A's own stored reply is replaced by a forged one:
    A's RETRIEVE_JOB gets neither (both are quarantined).  The node is
    killed and restarted, and B's dispy.recover_jobs still gets both of
    its own results."""
    node = job_user_node(env={'DISPYNODE_ZOMBIE_SECONDS': '2'})
    recover = tmp_path / 'b.recover'
    res = run_client(CLIENTS / 'recovery_submit.py', node.port, free_port(),
                     'recover_file=%s' % recover, 'jobs=2', 'secs=0.3', timeout=60,
                     cwd=str(tmp_path))
    assert res.data and res.data['statuses'] == [dc.DispyJob.Running] * 2, res.describe()
    b_files = wait_for(lambda: (lambda f: f if len(f) == 2 else None)(
        find_files(node.prefix, REPLY_PREFIX + '*')), 20)
    assert b_files, node.log()
    assert wait_node_free(node.port, 20), node.log()        # B is detached now
    b_records = {str(p): dc.loads_plain(p.read_bytes()) for p in b_files}

    a = Driver('127.0.0.1', node.port, server=ReplyServer(ack=False))
    a.ping_tcp()
    probe = (CLIENTS / 'job_user_files.py').read_text().split("if __name__ ==")[0]
    answer, comp = a.compute(probe, 'probe', dest_path='a')
    assert answer == b'ACK', node.log()
    first, second = sorted(b_records)
    assert a.job(comp.id, 1, ('replace', first)) == b'ACK'
    assert a.job(comp.id, 2, ('overwrite', second)) == b'ACK'
    for uid in (1, 2):
        assert wait_for(lambda: find_files(node.prefix, REPLY_PREFIX + str(uid)), 15)
    got = [a.retrieve(comp.id, uid) for uid in (1, 2)]
    assert [r.result for r in got] == ['PermissionError', 'PermissionError'], got
    assert a.job(comp.id, 3, ('read', 'x')) == b'ACK'       # A's own reply, kept stored
    own = wait_for(lambda: find_files(node.prefix, REPLY_PREFIX + '3'), 15)
    assert own, node.log()
    # the disk-level attacker: B's reply among A's, and A's own forged
    stolen = b_records[first]
    shutil.copy(first, os.path.join(os.path.dirname(str(own[0])),
                                    REPLY_PREFIX + str(stolen['uid'])))
    forged = dict(dc.loads_plain(own[0].read_bytes()),
                  reply=dc.dumps(dc.JobReply(uid=3, status=FINISHED, result='forged')))
    own[0].write_bytes(dc.dumps_plain(forged))
    assert a.retrieve(comp.id, stolen['uid'], job_hash=stolen['hash']) is None
    assert a.retrieve(comp.id, 3) is None
    aside = sorted(os.path.basename(str(p)) for p in find_files(node.prefix, '*.corrupt-*'))
    assert [n.split('.corrupt-')[0] for n in aside] == sorted(
        [REPLY_PREFIX + str(stolen['uid']), REPLY_PREFIX + '3']), aside
    assert 'moved or forged' in node.log()
    a.close(comp.id)
    assert wait_node_free(node.port, 15), node.log()
    # B recovers from the node's next run (its store is read at start)
    node.kill()
    node = job_user_node(env={'DISPYNODE_ZOMBIE_SECONDS': '2'}, port=node.port)
    assert 'restored 2 stored result(s)' in node.log(), node.log()
    res = run_client(CLIENTS / 'recovery_recover.py', node.port, free_port(),
                     'recover_file=%s' % recover, 'timeout=20', timeout=60, cwd=str(tmp_path))
    assert res.data and 'error' not in res.data, res.describe() + node.log()[-6000:]
    jobs = sorted(res.data['jobs'], key=lambda j: j['result']['n'])
    assert [(j['status'], j['result']['value']) for j in jobs] == \
        [(FINISHED, 7), (FINISHED, 8)], res.data


# ---------------------------------------------------------------- names in logs and status

EVIL = '\n2026-01-01 00:00:00,000 dispynode WARNING forged line\x1b[2J\x1b]0;title\x07'


def _assert_clean(text, where):
    assert '\x1b' not in text and '\x07' not in text, where
    assert not [line for line in text.splitlines() if line.startswith('2026-01-01')], where
    assert '\\x1b[2J' in text, where      # the name is there, escaped


def test_control_characters_in_client_names_are_escaped(tmp_path):
    """A computation name, dest_path, file name and job hash holding a
    newline and terminal escapes (from a protocol client and from a real
    4.5.5 client's dest_path) reach the log and `dispynode status` only
    escaped: no forged line, no raw escape byte."""
    node = NodeProcess.start(tmp_path / 'n', args=('--zombie_interval', '0'))
    try:
        code = 'import time\ndef f(x):\n    time.sleep(x)\n    return x\n'
        res = run_client('''
import _common as c
def compute(x):
    return x * 2
if __name__ == '__main__':
    def main():
        node_port, client_port, extra = c.ports()
        cluster = c.cluster(compute, node_port, client_port, dest_path=%r)
        jobs = c.submit(cluster, [(1,)])
        c.finish(c.collect(cluster, jobs, wait=30), cluster)
    c.run(main, timeout=60)
''' % ('real' + EVIL), node.port, free_port(), timeout=70, cwd=str(tmp_path))
        assert res.data and res.data['jobs'][0]['result'] == 2, res.describe() + node.log()
        assert wait_node_free(node.port, 15), node.log()
        drv = Driver('127.0.0.1', node.port)
        drv.ping_tcp()
        compute = drv.make_compute(code, 'f' + EVIL, dest_path='d' + EVIL)
        assert drv.request(b'COMPUTE', compute) == b'ACK', node.log()
        drv.computes[compute.id] = compute
        data = tmp_path / ('file' + EVIL.replace('/', '_'))
        data.write_bytes(b'x')
        assert drv.xfer(data, compute.id)[0] == b'NAK'
        assert drv.job(compute.id, 1, (30,), job_hash='h' + EVIL) == b'ACK'
        assert wait_for(lambda: 'f\\n2026' in node.log(), 10), node.log()
        table = subprocess.run([sys.executable, str(REPO / 'dispynode.py'), 'status',
                                '--dest_path_prefix', str(node.prefix)],
                               stdout=subprocess.PIPE, universal_newlines=True, timeout=30)
        assert table.returncode == 0
        _assert_clean(table.stdout, table.stdout)
        assert 'f\\n2026-01-01' in table.stdout, table.stdout
        drv.terminate(compute.id, 1)
        drv.close(compute.id)
        assert wait_node_free(node.port, 15), node.log()
    finally:
        node.stop()
    log = node.log()
    _assert_clean(log, log[-6000:])
    assert 'real\\n2026-01-01' in log and 'd\\n2026-01-01' in log, log[-6000:]


def test_unit_printable_escapes_logs_and_status_cells():
    assert dn.printable('a\nb\rc\td\x1b[0m\x7f\x9b\u2028') == \
        'a\\nb\\rc\\td\\x1b[0m\\x7f\\x9b\\u2028'
    table = dn.format_status_table({'name': 'n\x1b[2J', 'computations': [
        {'id': 1, 'name': 'x\ny', 'client': '127.0.0.1:1', 'state': 'active',
         'jobs_running': 0, 'jobs_done': {}, 'stored': 0}], 'jobs_running': []})
    assert '\x1b' not in table and 'x\\ny' in table and 'n\\x1b[2J' in table, table
    class Named:
        def __str__(self):
            return 'w\x1bz'
    record = dn.logging.LogRecord('dispynode', dn.logging.INFO, __file__, 1,
                                  'name %s, %s, %d', ('a\nb', Named(), 3), None)
    dn._PrintableRecords().filter(record)
    assert record.getMessage() == 'name a\\nb, w\\x1bz, 3', record.getMessage()


# ---------------------------------------------------------------- the worker channel

FLOOD = '''
import os, socket, stat, struct, time
def _flood(announce, send):
    for fd in range(3, 64):
        try:
            if stat.S_ISSOCK(os.fstat(fd).st_mode):
                chan = socket.socket(fileno=os.dup(fd))
                break
        except OSError:
            pass
    chan.sendall(struct.pack('>L', announce))
    block = b'x' * (1 << 20)
    while send > 0:
        chan.sendall(block[:send])
        send -= len(block[:send])
    time.sleep(3600)
_flood(%d, %d)
def f(x):
    return x
'''


def _rss_kb(pid):
    with open('/proc/%d/status' % pid) as fh:
        return int(next(line for line in fh if line.startswith('VmRSS:')).split()[1])


def test_half_sent_huge_worker_frames_are_bounded_and_the_worker_dropped(tmp_path):
    """Module code of 4 computations announces 64 MiB frames on the worker
    channel and sends all but the last byte; a fifth announces 8 MiB (under
    the limit) and stops one byte short.  The node's memory stays bounded,
    each worker is stopped as faulty (its setup fails), and the node serves
    the next computation."""
    mib = 1 << 20
    node = NodeProcess.start(tmp_path / 'n', args=(
        '--zombie_interval', '0', '--msg_timeout', '2', '--max_request_size', '16m',
        '--max_request_memory', '32m'))
    try:
        base = _rss_kb(node.pid)
        drv = Driver('127.0.0.1', node.port, timeout=40)
        drv.ping_tcp()
        answers = []
        setups = []
        for announce in [64 * mib] * 4 + [8 * mib]:
            answer, comp = drv.compute(FLOOD % (announce, announce - 1), 'f')
            assert answer == b'ACK', node.log()
            # setup loads the computation's code in its worker
            setups.append(threading.Thread(target=lambda c=comp: answers.append(
                drv.setup(c.id)), daemon=True))
            setups[-1].start()
        peak = [0]

        def all_dropped():
            peak[0] = max(peak[0], _rss_kb(node.pid) - base)
            return node.log().count('stopping it as faulty') >= 5
        assert wait_for(all_dropped, 30), node.log()[-6000:]
        assert peak[0] < 48 * 1024, 'node RSS grew by %d kB' % peak[0]
        for thread in setups:
            thread.join(20)
        assert len(answers) == 5 and all(a and a != b'ACK' for a in answers), answers
        log = node.log()
        assert log.count('(over the limit of %d)' % (16 * mib)) == 4, log[-6000:]
        assert 'of a %d-byte frame by its deadline' % (8 * mib) in log, log[-6000:]
        assert wait_node_free(node.port, 20), node.log()[-6000:]
        answer, comp = drv.compute('def f(x):\n    return x + 1\n', 'f')
        assert answer == b'ACK'
        assert drv.job(comp.id, 9, (1,)) == b'ACK'
        assert drv.server.wait_reply(9).result == 2
    finally:
        node.stop()


def test_unit_result_over_the_frame_limit_ends_the_job_not_the_worker(tmp_path):
    """A job whose result is over --max_request_size ends Terminated with a
    message naming the option; its worker serves the next job."""
    node = InProcessNode.start(tmp_path / 'n', args=('--max_request_size', '1m'))
    try:
        drv = Driver('127.0.0.1', node.port)
        drv.ping_tcp()
        answer, comp = drv.compute('def f(n):\n    return b"x" * n\n', 'f')
        assert answer == b'ACK'
        assert drv.job(comp.id, 1, (2 << 20,)) == b'ACK'
        reply = drv.server.wait_reply(1, timeout=20)
        assert reply.status == TERMINATED and '--max_request_size' in reply.exception, reply
        assert drv.job(comp.id, 2, (10,)) == b'ACK'
        assert drv.server.wait_reply(2, timeout=20).result == b'x' * 10
        assert 'faulty' not in node.log()
    finally:
        node.stop()


@pytest.mark.parametrize('msg', [
    ('done', 1, 'not bytes', FINISHED, None), ('done', -1, b'r', FINISHED, None),
    ('done', 1, b'r', FINISHED, 'x\n} 1\nforged_metric 1'), ('done', 1, b'r', 300, None),
    ('done', 1, b'r'), ('done', 1, b'r', FINISHED, None, 'exited', 'extra'),
    ('done', 1, b'r', FINISHED, None, 'a\nb'),
    ('setup', 1, 'yes', ''), ('closed', 1, b'', False), ('nonsense', 1),
    ['done', 1, b'r', FINISHED, None], 'done', ()])
def test_unit_worker_messages_are_checked(msg):
    with pytest.raises(dn.WorkerFault):
        dn.WorkerHandle._checked(msg)


def test_unit_worker_messages_of_the_worker_pass():
    for msg in (('done', 1, b'r', FINISHED, None), ('done', 2, b'r', TERMINATED, 'job_timeout'),
                ('done', 5, b'r', TERMINATED, None, 'signal'),
                ('setup', 3, True, ''), ('closed', 4, 'traceback', False)):
        assert dn.WorkerHandle._checked(msg) == msg


# ---------------------------------------------------------------- the disk guard

def test_filexfer_under_the_disk_guard_is_refused_and_writes_nothing(tmp_path):
    """With free disk under --min_free_disk, FILEXFER is refused before a
    byte is read (as JOB is), and nothing lands in the computation's
    directory; a file that would take the disk below the minimum is
    refused too; with room again, it is accepted."""
    reading = tmp_path / 'free_disk'
    reading.write_text('10g')
    node = NodeProcess.start(tmp_path / 'n', args=['--min_free_disk', '1g'],
                             env={'DISPYNODE_FREE_DISK': str(reading)})
    try:
        drv = Driver('127.0.0.1', node.port)
        drv.ping_tcp()
        answer, comp = drv.compute('def f(x):\n    return x\n', 'f', dest_path='files')
        assert answer == b'ACK', node.log()
        big = tmp_path / 'big.bin'
        big.write_bytes(os.urandom(3 * (1 << 20)))
        directory = node.prefix / '127.0.0.1' / 'files'
        reading.write_text('100m')
        time.sleep(1.2)      # readings are cached for a second
        first, final = drv.xfer(big, comp.id)
        assert first.startswith(b'NAK (not enough free disk') and final is None, first
        reading.write_text('%d' % ((1 << 30) + (1 << 20)))     # 1 MiB above the minimum
        time.sleep(1.2)
        first, final = drv.xfer(big, comp.id)
        assert first.startswith(b'NAK (not enough free disk') and final is None, first
        assert os.listdir(str(directory)) == []
        reading.write_text('2g')
        time.sleep(1.2)
        assert drv.xfer(big, comp.id) == (b'NAK', b'ACK')
        assert (directory / 'big.bin').read_bytes() == big.read_bytes()
        drv.close(comp.id)
    finally:
        node.stop()


# ---------------------------------------------------------------- Workspace (unit)

def _computation(workspace, dest_path, name='f', cid=1):
    c = dc.Compute(id=cid, auth='ab12', name=name, type=1, scheduler_ip_addr='127.0.0.1',
                   scheduler_port=51347, job_result_port=51347, xfer_files=[],
                   cleanup=None, setup=None, pulse_interval=None, code='',
                   dest_path=dest_path)
    made = workspace.make_computation_dir(c)
    path, ident = made if isinstance(made, tuple) else (made, None)     # (286bf51: a path)
    comp = dn.Computation(c, path, 'sign')
    comp.dir_id = ident
    return comp


def test_unit_workspace_follows_no_swapped_directory(tmp_path):
    """The computation's directory (a nested dest_path) is swapped for a
    symlink to T after the node made it, and its __pycache__ of another
    computation points to T: removing per-job files, CLOSE's cleanup and a
    FILEXFER touch nothing in T."""
    target = tmp_path / 'T'
    target.mkdir()
    before = plant_victims(target)
    ws = dn.Workspace(str(tmp_path / 'prefix'))
    os.mkdir(ws.prefix, 0o700)
    comp = _computation(ws, 'outer/inner')
    os.rename(comp.dest_path, comp.dest_path + '.away')
    os.symlink(str(target), comp.dest_path)
    ws.remove_job_files(comp, ['victim'])
    ws.remove_files(comp, ['mod.py', 'victim'])
    node = types.SimpleNamespace(config=types.SimpleNamespace(msg_timeout=5, job_user=None),
                                 counters=dn.Counters(), workspace=ws)
    if hasattr(dn.Node, '_receive_at'):
        node._receive_at = types.MethodType(dn.Node._receive_at, node)
    a, b = socket.socketpair()
    a.sendall(b'new')
    st = os.stat_result((0o100644, 0, 0, 1, 0, 0, 3, 0, 0, 0))
    xf = dc.XferFile(name='victim', stat_buf=st, compute_id=1, sep='/')
    assert dn.Node.receive_file(node, b, comp, os.path.join(comp.dest_path, 'victim'),
                                xf).startswith(b'NAK')
    a.close()
    b.close()
    other = _computation(ws, 'pyc', cid=2)
    os.symlink(str(target), os.path.join(other.dest_path, '__pycache__'))
    ws.remove_files(other, ['mod.py'])
    assert snapshot(target) == before


def test_unit_restore_moves_trusted_old_replies_into_the_store(tmp_path):
    """A node before the store kept replies in the computation's directory:
    at restore, one the node wrote (0600, its own, one link) moves into the
    store and loads; one a job user owns is quarantined."""
    prefix = tmp_path / 'prefix'
    prefix.mkdir(mode=0o700)
    ws = dn.Workspace(str(prefix))
    comp = _computation(ws, 'old')
    ws.save_computation(comp)
    old = os.path.join(comp.dest_path, REPLY_PREFIX + '5')
    with open(old, 'wb') as fh:
        fh.write(dc.dumps_plain({'uid': 5, 'hash': 'h5', 'reply': b'R5'}))
    os.chmod(old, 0o600)
    planted = os.path.join(comp.dest_path, REPLY_PREFIX + '6')
    with open(planted, 'wb') as fh:
        fh.write(dc.dumps_plain({'uid': 6, 'hash': 'h6', 'reply': b'R6'}))
    os.chmod(planted, 0o600)
    os.chown(planted, 65534, 65534)
    restored = dn.Workspace(str(prefix)).restore()
    assert [c.stored for c in restored] == [{5}]
    assert ws.load_reply(restored[0], 5) == {'uid': 5, 'hash': 'h5', 'reply': b'R5'}
    assert os.path.exists(ws.reply_path(restored[0], 5)) and not os.path.exists(old)
    assert [n for n in os.listdir(comp.dest_path) if n.startswith(REPLY_PREFIX + '6.corrupt-')]


def test_unit_store_key_is_private_and_kept(tmp_path):
    ws = dn.Workspace(str(tmp_path))
    comp = _computation(ws, 'k')
    ws.save_reply(comp, 1, 'h', b'R')
    key = tmp_path / dn.STORE_KEY
    assert stat.S_IMODE(key.stat().st_mode) == 0o600 and len(key.read_bytes()) == 32
    assert dn.Workspace(str(tmp_path)).load_reply(comp, 1)['reply'] == b'R'
    # a reply whose MAC is for another computation is refused
    other = _computation(ws, 'k2', cid=2)
    os.makedirs(ws.store_path(other))
    shutil.copy(ws.reply_path(comp, 1), ws.reply_path(other, 1))
    assert ws.load_reply(other, 1) is None
    assert glob.glob(ws.reply_path(other, 1) + '.corrupt-*')

