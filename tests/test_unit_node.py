"""Unit tests of dispynode's pure helpers, state and result store (imported
in-process; no network, no legacy stack)."""

import os
import pickle
import signal
import subprocess
import sys
import threading

import pytest

import driver
import dispy_common as dc
import dispynode as dn


# ---------------------------------------------------------------- confined_join

@pytest.mark.parametrize('rel, parts', [
    ('a', ['a']),
    ('a/b', ['a', 'b']),
    ('a//b/./c', ['a', 'b', 'c']),
    ('a\\b', ['a', 'b']),
    ('  a/b  ', ['a', 'b']),
    ('./x', ['x']),
    ('a/b/', ['a', 'b']),
])
def test_confined_join_accepts(tmp_path, rel, parts):
    assert dn.confined_join(str(tmp_path), rel) == os.path.join(str(tmp_path), *parts)


@pytest.mark.parametrize('rel', [
    '/abs', '/', '//host/share', '\\abs', '\\\\server\\share',
    '..', '../x', 'a/../../x', 'a/..', 'a\\..\\..\\x', '..\\x',
    'C:\\x', 'c:x', 'C:/x', 'Z:',
    '', '   ', '.', './.', 'a\0b', None, 5, b'a',
])
def test_confined_join_refuses(tmp_path, rel):
    assert dn.confined_join(str(tmp_path), rel) is None


def test_confined_join_result_stays_under_base(tmp_path):
    for rel in ['a/b/c', 'x', 'deep/' * 10 + 'z']:
        path = dn.confined_join(str(tmp_path), rel)
        assert os.path.abspath(path).startswith(str(tmp_path) + os.sep)


# ---------------------------------------------------------------- safe_basename

@pytest.mark.parametrize('name, sep, expected', [
    ('file.txt', '/', 'file.txt'),
    ('/home/u/file.txt', '/', 'file.txt'),
    ('C:\\Users\\u\\data.csv', '\\', 'data.csv'),
    ('dir\\data.csv', '/', 'data.csv'),          # backslashes count as separators
    ('a/b/c.py', None, 'c.py'),
    ('../../etc/passwd', '/', 'passwd'),
])
def test_safe_basename(name, sep, expected):
    assert dn.safe_basename(name, sep) == expected


@pytest.mark.parametrize('name', ['', '/', 'a/', '.', '..', 'a/..', 'x/\0y',
                                  dn.REPLY_PREFIX + '5', 'd/' + dn.REPLY_PREFIX + '1',
                                  None, 3, b'x'])
def test_safe_basename_refuses(name):
    assert dn.safe_basename(name) is None


# ---------------------------------------------------------------- atomic_write

def test_atomic_write_creates_and_replaces(tmp_path):
    path = str(tmp_path / 'f')
    dn.atomic_write(path, b'one')
    assert open(path, 'rb').read() == b'one'
    dn.atomic_write(path, b'two' * 1000)
    assert open(path, 'rb').read() == b'two' * 1000
    assert os.listdir(str(tmp_path)) == ['f']       # no temp file left


@pytest.mark.parametrize('where', ['fsync', 'replace', 'write'])
def test_atomic_write_failure_keeps_old_file(tmp_path, monkeypatch, where):
    path = str(tmp_path / 'f')
    dn.atomic_write(path, b'old')

    def boom(*a, **k):
        raise OSError(28, 'No space left on device')

    if where == 'fsync':
        monkeypatch.setattr(dn.os, 'fsync', boom)
    elif where == 'replace':
        monkeypatch.setattr(dn.os, 'replace', boom)
    else:
        real_fdopen = os.fdopen

        class Writer:
            def __init__(self, fh):
                self.fh = fh

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.fh.close()

            def write(self, data):
                self.fh.write(data[:1])
                raise OSError(28, 'No space left on device')

        monkeypatch.setattr(dn.os, 'fdopen', lambda fd, mode: Writer(real_fdopen(fd, mode)))
    with pytest.raises(OSError):
        dn.atomic_write(path, b'new' * 100)
    monkeypatch.undo()
    assert open(path, 'rb').read() == b'old'
    assert os.listdir(str(tmp_path)) == ['f']


CRASH_WRITER = r'''
import os, sys
sys.path.insert(0, sys.argv[1])
import dispynode as dn
path, stage = sys.argv[2], sys.argv[3]
if stage == 'before_replace':
    dn.os.replace = lambda *a: os._exit(9)          # die between write and rename
elif stage == 'mid_write':
    real_fdopen = os.fdopen
    class W:
        def __init__(self, fh): self.fh = fh
        def __enter__(self): return self
        def __exit__(self, *e): pass
        def write(self, data):
            self.fh.write(data[:len(data) // 2]); self.fh.flush(); os._exit(9)
    dn.os.fdopen = lambda fd, mode: W(real_fdopen(fd, mode))
dn.atomic_write(path, b'N' * 100000)
'''


@pytest.mark.parametrize('stage', ['mid_write', 'before_replace', 'none'])
def test_atomic_write_crash_leaves_old_or_new(tmp_path, stage):
    """A process killed at any point leaves the whole old or the whole new
    file, never a torn one (a stray .tmp- file may remain)."""
    path = tmp_path / 'rec'
    path.write_bytes(b'O' * 50000)
    r = subprocess.run([sys.executable, '-c', CRASH_WRITER, str(driver.REPO), str(path), stage],
                       timeout=30)
    data = path.read_bytes()
    if stage == 'none':
        assert r.returncode == 0
        assert data == b'N' * 100000
    else:
        assert r.returncode == 9
        assert data == b'O' * 50000
        # the leftover is a temp file, which Workspace.restore removes
        assert all(n == 'rec' or n.startswith('.tmp-') for n in os.listdir(str(tmp_path)))


# ---------------------------------------------------------------- helpers

def _compute(prefix, cid=1, auth='ab12', dest=None, **kw):
    c = dc.Compute(id=cid, auth=auth, name='f', type=1, scheduler_ip_addr='127.0.0.1',
                   scheduler_port=51347, job_result_port=51347, xfer_files=[],
                   cleanup=None, setup=None, pulse_interval=None, code='')
    for k, v in kw.items():
        setattr(c, k, v)
    dest = dest or os.path.join(str(prefix), '127.0.0.1', 'f_%d' % cid)
    os.makedirs(dest, exist_ok=True)
    return dn.Computation(c, dest, 'sign%d' % cid)


# ---------------------------------------------------------------- Workspace

def test_store_save_and_restore_computation(tmp_path):
    store = dn.Workspace(str(tmp_path))
    comp = _compute(tmp_path, 7, 'deadbeef')
    store.save_computation(comp)
    assert os.path.isfile(str(tmp_path / '7_deadbeef'))
    store.save_reply(comp, 3, 'h3', b'REPLY3')
    store.save_reply(comp, 4, 'h4', b'REPLY4')
    restored = store.restore()
    assert len(restored) == 1
    r = restored[0]
    assert (r.id, r.auth, r.dest_path, r.sign, r.scheduler_ip) == \
        (7, 'deadbeef', comp.dest_path, 'sign7', '127.0.0.1')
    assert r.stored == {3, 4}
    assert r.phase is dn.Phase.DETACHED
    # the record holds plain data only (the node never stores the secret)
    rec = dc.loads_plain((tmp_path / '7_deadbeef').read_bytes())
    assert 'secret' not in rec


def test_store_reply_round_trip_and_remove(tmp_path):
    store = dn.Workspace(str(tmp_path))
    comp = _compute(tmp_path)
    assert store.load_reply(comp, 9) is None
    store.save_reply(comp, 9, 'hash9', b'\x80\x04bytes')
    path = store.reply_path(comp, 9)
    assert os.path.basename(path) == '_dispy_job_reply_9'
    assert store.load_reply(comp, 9) == {'uid': 9, 'hash': 'hash9', 'reply': b'\x80\x04bytes'}
    assert store.stored_uids(comp) == {9}
    store.remove_reply(comp, 9)
    store.remove_reply(comp, 9)          # twice is fine
    assert store.load_reply(comp, 9) is None
    assert store.stored_uids(comp) == set()


def test_store_remove_computation(tmp_path):
    store = dn.Workspace(str(tmp_path))
    comp = _compute(tmp_path, 5, 'aa')
    store.save_computation(comp)
    store.remove_computation(comp)
    store.remove_computation(comp)
    assert not (tmp_path / '5_aa').exists()


@pytest.mark.parametrize('cid, auth', [(1, '../x'), (1, 'zz'), ('1', 'ab'), (1, None),
                                       (1, 'a' * 65), (1, '')])
def test_store_record_path_refuses_bad_names(tmp_path, cid, auth):
    assert dn.Workspace(str(tmp_path)).record_path(cid, auth) is None


@pytest.mark.parametrize('content', [b'garbage', b'', pickle.dumps({'uid': 2, 'reply': 'str'}),
                                     pickle.dumps({'uid': 99, 'hash': 'h', 'reply': b'x'}),
                                     pickle.dumps([1, 2]), dc.dumps(dc.JobReply(uid=2))])
def test_store_corrupt_reply_is_quarantined(tmp_path, content):
    store = dn.Workspace(str(tmp_path))
    comp = _compute(tmp_path)
    path = store.reply_path(comp, 2)
    os.makedirs(os.path.dirname(path))      # the store: <prefix>/.replies/<id>_<auth>
    with open(path, 'wb') as fh:
        fh.write(content)
    assert store.load_reply(comp, 2) is None
    assert not os.path.exists(path)
    aside = [n for n in os.listdir(os.path.dirname(path)) if '.corrupt-' in n]
    assert len(aside) == 1 and aside[0].startswith('_dispy_job_reply_2.corrupt-')
    # a quarantined file is not a stored result any more
    assert store.stored_uids(comp) == set()


def test_store_restore_quarantines_corrupt_record_and_removes_temp_files(tmp_path):
    store = dn.Workspace(str(tmp_path))
    good = _compute(tmp_path, 1, 'aa')
    store.save_computation(good)
    store.save_reply(good, 1, 'h', b'r')
    (tmp_path / '2_bb').write_bytes(b'not a pickle')
    (tmp_path / '3_cc').write_bytes(pickle.dumps({'id': 3}))            # missing keys
    evil = _compute(tmp_path, 4, 'dd', dest='/etc')                      # outside the prefix
    (tmp_path / '4_dd').write_bytes(dc.dumps_plain(evil.record()))
    (tmp_path / '.tmp-abc').write_bytes(b'half')
    with open(os.path.join(good.dest_path, '.tmp-xyz'), 'wb') as fh:
        fh.write(b'half a reply')
    (tmp_path / 'unrelated.txt').write_bytes(b'keep')
    restored = store.restore()
    assert [c.id for c in restored] == [1]
    names = set(os.listdir(str(tmp_path)))
    assert '.tmp-abc' not in names
    assert 'unrelated.txt' in names and '1_aa' in names
    for bad in ('2_bb', '3_cc', '4_dd'):
        assert bad not in names
        assert any(n.startswith(bad + '.corrupt-') for n in names)
    assert not any(n.startswith('.tmp-') for n in os.listdir(good.dest_path))


def test_store_record_refuses_a_malicious_pickle(tmp_path):
    marker = tmp_path / 'pwned'

    class Evil:
        def __reduce__(self):
            return (os.system, ('touch %s' % marker,))

    (tmp_path / '5_ee').write_bytes(pickle.dumps({'id': Evil()}))
    assert dn.Workspace(str(tmp_path)).restore() == []
    assert not marker.exists()


# ---------------------------------------------------------------- NodeState

def test_nodestate_claim_and_busy(tmp_path):
    st = dn.NodeState(2)
    assert st.is_free() and st.busy_cpus() == 0
    a = _compute(tmp_path, 1)
    assert st.claim(a) is None
    assert not st.is_free()
    assert st.scheduler == ('127.0.0.1', 51347)
    # the same scheduler may add another computation, not the same id twice
    b = _compute(tmp_path, 2)
    assert st.claim(b) is None
    assert st.claim(_compute(tmp_path, 2)).startswith(b'NAK')
    # another scheduler (other port, or other address) is refused
    other = _compute(tmp_path, 3)
    other.scheduler_port = 9999
    assert st.claim(other) == b'Busy'
    other.scheduler_port, other.scheduler_ip = 51347, '10.0.0.1'
    assert st.claim(other) == b'Busy'
    st.unclaim(a)
    assert st.scheduler is not None
    st.unclaim(b)
    assert st.scheduler is None and st.is_free()
    assert st.claim(other) is None


def test_nodestate_cpu_accounting(tmp_path):
    st = dn.NodeState(2)
    comp = _compute(tmp_path, 1)
    comp.xfer_names = ['common.dat']
    st.claim(comp)
    e1 = dn.JobEntry(1, 'h1', 1, ['dep.py', 'common.dat'])
    e2 = dn.JobEntry(2, 'h2', 1, ['dep.py'])
    assert st.start_job(comp, e1) is None
    assert st.start_job(comp, dn.JobEntry(1, 'h', 1, [])).startswith(b'NAK (duplicate')
    assert st.start_job(comp, e2) is None
    assert st.busy_cpus() == 2
    assert st.start_job(comp, dn.JobEntry(3, 'h3', 1, [])) == b'NAK (all cpus busy)'
    assert comp.running == {1, 2}
    assert [e.uid for e in st.jobs_of(1)] == [1, 2]
    entry, got, unused = st.finish_job(1)
    assert entry is e1 and got is comp and unused == []     # dep.py still used by job 2
    assert st.busy_cpus() == 1
    entry, got, unused = st.finish_job(2)
    assert unused == ['dep.py']                              # common.dat belongs to COMPUTE
    assert st.busy_cpus() == 0 and comp.running == set()
    assert st.finish_job(2) == (None, None, [])              # twice: no double free
    assert st.avail_cpus == 2


def test_nodestate_keep_files_keeps_job_files(tmp_path):
    st = dn.NodeState(1)
    comp = _compute(tmp_path, 1, cleanup=False)
    assert comp.keep_files
    st.claim(comp)
    st.start_job(comp, dn.JobEntry(1, 'h', 1, ['dep.py']))
    assert st.finish_job(1)[2] == []


def test_nodestate_refuses_jobs_for_zombie_or_unknown(tmp_path):
    st = dn.NodeState(2)
    comp = _compute(tmp_path, 1)
    assert st.start_job(comp, dn.JobEntry(1, 'h', 1, [])).startswith(b'NAK (invalid')
    st.claim(comp)
    st.mark_zombie(comp)
    assert st.start_job(comp, dn.JobEntry(1, 'h', 1, [])).startswith(b'NAK (invalid')
    assert st.busy_cpus() == 0


def test_nodestate_find_checks_auth(tmp_path):
    st = dn.NodeState(1)
    comp = _compute(tmp_path, 1, 'ab')
    st.claim(comp)
    assert st.find(1) is comp
    assert st.find(1, 'ab') is comp
    assert st.find(1, 'cd') is None
    assert st.find('1') is None
    assert st.find(2) is None


def test_nodestate_retire_and_detach(tmp_path):
    st = dn.NodeState(1)
    comp = _compute(tmp_path, 1)
    st.claim(comp)
    st.start_job(comp, dn.JobEntry(1, 'h', 1, []))
    assert not st.begin_retire(comp)              # not a zombie yet
    st.mark_zombie(comp)
    assert not st.begin_retire(comp)              # a job still runs
    st.finish_job(1)
    assert st.begin_retire(comp)
    assert not st.begin_retire(comp)              # only once
    st.add_stored(comp, 1)
    assert dn.Do.ANNOUNCE in st.retire_detach(comp)   # node became free
    assert st.is_free()
    assert st.find(1) is None and st.find(1, include_detached=True) is comp
    assert dn.Do.REMOVE_RECORD in st.drop_stored(comp, 1)   # detached and empty: done with it


def test_nodestate_zombies(tmp_path):
    st = dn.NodeState(1)
    comp = _compute(tmp_path, 1)
    st.claim(comp)
    assert st.zombies(60) == []
    comp.last_pulse -= 120
    assert st.zombies(60) == [comp]
    assert comp.phase is dn.Phase.ZOMBIE and comp.timed_out
    assert st.zombies(60) == []                   # reported once
    fresh = _compute(tmp_path, 2)
    st.claim(fresh)
    fresh.last_pulse -= 120
    st.touch('127.0.0.1')
    assert st.zombies(60) == []


def test_nodestate_concurrent_start_finish(tmp_path):
    st = dn.NodeState(4)
    comp = _compute(tmp_path, 1)
    st.claim(comp)
    accepted = []
    lock = threading.Lock()

    def worker(base):
        for i in range(200):
            uid = base * 1000 + i
            if st.start_job(comp, dn.JobEntry(uid, 'h', 1, [])) is None:
                with lock:
                    accepted.append(uid)
                st.finish_job(uid)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert st.avail_cpus == 4 and st.busy_cpus() == 0
    assert accepted and comp.running == set() and st.jobs == {}


# ---------------------------------------------------------------- TaskPool

@pytest.mark.parametrize('timeout', [10, 0])
def test_task_pool_close_while_a_new_thread_starts(monkeypatch, timeout):
    """close() right after submit() made a thread that has not started yet
    raises nothing, and the queued task still runs: close(10) waits for the
    thread, close(0) (the request pool's, at shutdown) does not (close used
    to join the unstarted thread: 'cannot join thread before it is
    started', seen once in ten -k unit runs, and with close(0) in CI)."""
    pool = dn.TaskPool('slowstart', 2, 4)
    entered, release = threading.Event(), threading.Event()
    real_start = threading.Thread.start

    def slow_start(thread):
        if thread.name.startswith('slowstart-'):
            entered.set()
            release.wait(10)
        real_start(thread)

    monkeypatch.setattr(threading.Thread, 'start', slow_start)
    ran, errors = [], []

    def close():
        try:
            pool.close(timeout)
        except Exception as exc:  # the failure this test is about
            errors.append(exc)

    submitter = threading.Thread(target=pool.submit, args=(ran.append, 1))
    submitter.start()
    assert entered.wait(10)
    closer = threading.Thread(target=close)
    closer.start()
    closer.join(0.1)        # the old close() raised here at once
    release.set()
    submitter.join(10)
    closer.join(10)
    assert not closer.is_alive() and errors == []
    assert driver.wait_for(lambda: ran == [1] and pool.thread_count() == 0, 10), (ran, pool.threads)


# ---------------------------------------------------------------- processes

def _gone(pid):
    """True if ``pid`` no longer runs (exited, or a zombie not yet reaped)."""
    try:
        with open('/proc/%d/stat' % pid, 'rb') as fh:
            data = fh.read()
    except OSError:
        return True
    return data[data.rfind(b')') + 2:].split()[0] in (b'Z', b'X')


TREE = r'''
import os, subprocess, sys, time
kids = [subprocess.Popen(['sleep', '60']),
        subprocess.Popen([sys.executable, '-c',
                          'import subprocess, time; p = subprocess.Popen(["sleep", "60"]); '
                          'print(p.pid, flush=True); time.sleep(60)'],
                         stdout=subprocess.PIPE),
        subprocess.Popen(['sleep', '60'], start_new_session=True)]   # left the group
grandchild = kids[1].stdout.readline().strip().decode()
print(' '.join([str(k.pid) for k in kids] + [grandchild]), flush=True)
time.sleep(60)
'''


@pytest.fixture
def tree():
    proc = subprocess.Popen([sys.executable, '-c', TREE], stdout=subprocess.PIPE,
                            start_new_session=True)
    pids = [int(p) for p in proc.stdout.readline().split()]
    yield proc, pids
    for pid in [proc.pid] + pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    proc.wait()


def test_descendants_finds_the_whole_tree(tree):
    proc, pids = tree
    found = dn.descendants(proc.pid)
    assert set(pids) <= set(found)
    assert proc.pid not in found
    assert dn.descendants(os.getpid()) is not None


def test_descendants_of_missing_pid():
    assert dn.descendants(2 ** 22 + 12345) == []


def test_kill_tree_kills_everything(tree):
    proc, pids = tree
    dn.kill_tree(proc.pid, signal.SIGKILL)
    proc.wait(10)
    assert driver.wait_for(lambda: all(_gone(p) for p in pids), 10), \
        [p for p in pids if not _gone(p)]


def test_kill_tree_of_exited_process_is_harmless():
    proc = subprocess.Popen(['true'])
    proc.wait()
    dn.kill_tree(proc.pid, signal.SIGKILL)


# ---------------------------------------------------------------- addresses

def test_primary_ipv4_is_usable():
    addr = dn.primary_ipv4()
    assert dn.is_ipv4(addr)
    assert addr != '127.0.1.1'
    assert addr == '127.0.0.1' or not addr.startswith('127.')


def test_primary_ipv4_prefers_default_route(monkeypatch):
    monkeypatch.setattr(dn, 'interface_addresses',
                        lambda: {'lo': '127.0.0.1', 'eth0': '10.1.2.3', 'eth1': '192.168.5.5'})
    monkeypatch.setattr(dn, 'default_route_interface', lambda: 'eth1')
    assert dn.primary_ipv4() == '192.168.5.5'
    monkeypatch.setattr(dn, 'default_route_interface', lambda: None)
    assert dn.primary_ipv4() == '10.1.2.3'
    monkeypatch.setattr(dn, 'interface_addresses', lambda: {'lo': '127.0.0.1'})
    assert dn.primary_ipv4() == '127.0.0.1'
    monkeypatch.setattr(dn, 'interface_addresses', lambda: {})
    assert dn.primary_ipv4() == '127.0.0.1'


def test_interface_addresses_include_loopback():
    addrs = dn.interface_addresses()
    assert '127.0.0.1' in addrs.values()


def test_broadcast_address():
    assert dn.broadcast_address('127.0.0.1') == '127.255.255.255'
    assert dn.broadcast_address('203.0.113.77') == '<broadcast>'   # not ours


@pytest.mark.parametrize('text, ok', [('1.2.3.4', True), ('127.0.0.1', True), ('::1', False),
                                      ('1.2.3', False), ('host', False), (None, False),
                                      ('256.1.1.1', False)])
def test_is_ipv4(text, ok):
    assert dn.is_ipv4(text) is ok


@pytest.mark.parametrize('value, ok', [(1, True), (65535, True), (0, False), (65536, False),
                                       (True, False), ('80', False), (None, False)])
def test_valid_port(value, ok):
    assert dn.valid_port(value) is ok


def test_safe_mode_strips_special_bits():
    assert dn._safe_mode(0o104755) == 0o755
    assert dn._safe_mode(0o2644) == 0o644
    assert dn._safe_mode(0o644, executable=True) == 0o744
