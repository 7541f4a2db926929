"""File streaming paths of dispynode (recv_to_file, send_from_file and
Node.receive_file on top of them): splice() socket -> pipe -> file on
Linux, the recv_into copy it falls back to, reused-buffer sends, and TLS
sockets, which must take the plain paths.  Real loopback TCP connections
(and TLS over them); current Python only."""

import errno
import os
import socket
import ssl
import threading
import types

import pytest

import driver  # noqa: F401  (puts the repository on sys.path)
import dispy_common as dc
import dispynode as dn
from test_tls import _openssl_cert

needs_splice = pytest.mark.skipif(dn._SPLICE is None, reason='os.splice: Linux, Python >= 3.10')


def loopback_pair():
    """(connecting end, accepted end) of a loopback TCP connection."""
    with socket.socket() as lsock:
        lsock.bind(('127.0.0.1', 0))
        lsock.listen(1)
        sender = socket.create_connection(lsock.getsockname(), timeout=10)
        receiver, _ = lsock.accept()
    return sender, receiver


@pytest.fixture
def pair():
    """(sender, receiver): a connected loopback TCP pair."""
    sender, receiver = loopback_pair()
    yield sender, receiver
    sender.close()
    receiver.close()


@pytest.fixture(scope='module')
def tls_cert(tmp_path_factory):
    """(certfile, keyfile): one certificate for the module (openssl takes a while)."""
    return _openssl_cert(tmp_path_factory.mktemp('tls'))


@pytest.fixture
def tls_pair(tls_cert):
    """(sender, receiver) wrapped in TLS with the node's own contexts."""
    certfile, keyfile = tls_cert
    raw, conn = loopback_pair()
    conn.settimeout(10)
    server = dc.server_tls_context(str(certfile), str(keyfile))
    out = {}
    t = threading.Thread(target=lambda: out.setdefault(
        'receiver', server.wrap_socket(conn, server_side=True)))
    t.start()
    sender = dc.client_tls_context(str(certfile)).wrap_socket(raw)
    t.join(10)
    receiver = out['receiver']
    assert isinstance(receiver, ssl.SSLSocket) and isinstance(sender, ssl.SSLSocket)
    yield sender, receiver
    sender.close()
    receiver.close()


def send_in_thread(sock, data, close=True):
    def run():
        try:
            sock.sendall(data)
        except OSError:
            pass
        if close:
            sock.shutdown(socket.SHUT_WR)
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def recv_into_file(receiver, path, size, timeout=5):
    fd = os.open(str(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        return dn.recv_to_file(receiver, fd, size, timeout)
    finally:
        os.close(fd)


@pytest.fixture(params=['splice', 'copy'])
def path_kind(request, monkeypatch):
    """Run a test through splice() (where available) and the copy loop, and
    make sure the path under test is the one taken."""
    if request.param == 'copy':
        monkeypatch.setattr(dn, '_SPLICE', None)
    else:
        if dn._SPLICE is None:
            pytest.skip('os.splice: Linux, Python >= 3.10')

        def no_copy(*args):
            raise AssertionError('the copy loop ran instead of splice')
        monkeypatch.setattr(dn, '_copy_to_file', no_copy)
    return request.param


# ---------------------------------------------------------------- receiving

def test_recv_exact_bytes_and_no_more(pair, path_kind, tmp_path):
    sender, receiver = pair
    data = os.urandom(3 * 1024 * 1024 + 12345)    # several splice/recv steps
    t = send_in_thread(sender, data + b'NEXT-FRAME')
    got, err = recv_into_file(receiver, tmp_path / 'out', len(data))
    t.join(10)
    assert (got, err) == (len(data), None)
    assert (tmp_path / 'out').read_bytes() == data
    # exactly size bytes were consumed: what follows is still in the socket
    receiver.settimeout(5)
    assert dc.recv_exact(receiver, 10) == b'NEXT-FRAME'


def test_recv_short_stream_reports_count(pair, path_kind, tmp_path):
    sender, receiver = pair
    t = send_in_thread(sender, b'x' * 1000)
    got, err = recv_into_file(receiver, tmp_path / 'out', 5000)
    t.join(10)
    assert (got, err) == (1000, None)
    assert (tmp_path / 'out').read_bytes() == b'x' * 1000


def test_recv_stalled_peer_times_out(pair, path_kind, tmp_path):
    sender, receiver = pair
    sender.sendall(b'y' * 10)          # then nothing, connection left open
    got, err = recv_into_file(receiver, tmp_path / 'out', 5000, timeout=0.05)
    assert got == 10 and isinstance(err, socket.timeout)


def test_recv_zero_bytes(pair, path_kind, tmp_path):
    sender, receiver = pair
    assert recv_into_file(receiver, tmp_path / 'out', 0) == (0, None)
    assert (tmp_path / 'out').read_bytes() == b''


@needs_splice
def test_file_that_refuses_splice_falls_back_midway(pair, tmp_path, monkeypatch):
    """A file system without splice support (EINVAL on the pipe -> file
    step): the bytes already in the pipe and the rest arrive by copying."""
    real = dn._SPLICE
    calls = {'to_file': 0}

    def splice(src, dst, count, *args, **kw):
        if dst == target_fd[0]:
            calls['to_file'] += 1
            raise OSError(errno.EINVAL, 'splice not supported here')
        return real(src, dst, count, *args, **kw)
    monkeypatch.setattr(dn, '_SPLICE', splice)
    sender, receiver = pair
    data = os.urandom(2 * 1024 * 1024 + 7)
    t = send_in_thread(sender, data)
    target_fd = [os.open(str(tmp_path / 'out'), os.O_WRONLY | os.O_CREAT, 0o600)]
    try:
        got, err = dn.recv_to_file(receiver, target_fd[0], len(data), 5)
    finally:
        os.close(target_fd[0])
    t.join(10)
    assert (got, err) == (len(data), None)
    assert calls['to_file'] == 1
    assert (tmp_path / 'out').read_bytes() == data


def test_tls_receive_takes_the_copy_path(tls_pair, tmp_path, monkeypatch):
    def no_splice(*args, **kw):
        raise AssertionError('splice on a TLS socket')
    monkeypatch.setattr(dn, '_SPLICE', no_splice)
    sender, receiver = tls_pair
    data = os.urandom(1024 * 1024 + 99)
    t = send_in_thread(sender, data + b'MORE', close=False)
    got, err = recv_into_file(receiver, tmp_path / 'out', len(data))
    t.join(10)
    assert (got, err) == (len(data), None)
    assert (tmp_path / 'out').read_bytes() == data
    assert dc.recv_exact(receiver, 4) == b'MORE'


# ---------------------------------------------------------------- Node.receive_file

def _stand_in(config, prefix):
    """What Node.receive_file uses of a Node."""
    node = types.SimpleNamespace(config=config, counters=dn.Counters(),
                                 workspace=dn.Workspace(str(prefix)))
    node._receive_at = types.MethodType(dn.Node._receive_at, node)
    return node


def _receive(sock, tmp_path, data, size=None):
    """Node.receive_file on a stand-in node: (answer, names in the dir)."""
    dest = tmp_path / 'comp'
    dest.mkdir()
    src = tmp_path / 'src.bin'
    src.write_bytes(data if size is None else data[:1])
    os.chmod(str(src), 0o640)
    st = os.stat(str(src))
    if size is not None:     # announce more than will arrive
        st = os.stat_result((st.st_mode, st.st_ino, st.st_dev, st.st_nlink, st.st_uid,
                             st.st_gid, size, st.st_atime, st.st_mtime, st.st_ctime))
    xf = dc.XferFile(name='src.bin', stat_buf=st, compute_id=1, sep='/')
    node = _stand_in(types.SimpleNamespace(msg_timeout=5, job_user=None), tmp_path)
    comp = types.SimpleNamespace(dest_path=str(dest), program=None)
    answer = dn.Node.receive_file(node, sock, comp, str(dest / 'src.bin'), xf)
    return answer, sorted(os.listdir(str(dest))), dest / 'src.bin'


def test_receive_file_whole(pair, path_kind, tmp_path):
    sender, receiver = pair
    data = os.urandom(1500000)
    t = send_in_thread(sender, data)
    answer, names, target = _receive(receiver, tmp_path, data)
    t.join(10)
    assert answer == b'ACK' and names == ['src.bin']
    assert target.read_bytes() == data
    assert os.stat(str(target)).st_mode & 0o777 == 0o640


def test_receive_file_short_stream_leaves_no_file(pair, path_kind, tmp_path):
    sender, receiver = pair
    t = send_in_thread(sender, b'z' * 70000)
    answer, names, _ = _receive(receiver, tmp_path, b'z' * 70000, size=200000)
    t.join(10)
    assert answer == b'NAK (read only 70000 bytes)'
    assert names == []          # neither the target nor a temp file


def test_receive_file_stalled_peer_leaves_no_file(pair, path_kind, tmp_path, monkeypatch):
    sender, receiver = pair
    sender.sendall(b'q' * 100)
    node_timeout = types.SimpleNamespace(msg_timeout=0.05, job_user=None)
    dest = tmp_path / 'comp'
    dest.mkdir()
    st = os.stat_result((0o100644, 0, 0, 1, 0, 0, 5000, 0, 0, 0))
    xf = dc.XferFile(name='f', stat_buf=st, compute_id=1, sep='/')
    comp = types.SimpleNamespace(dest_path=str(dest), program=None)
    answer = dn.Node.receive_file(_stand_in(node_timeout, tmp_path), receiver, comp,
                                  str(dest / 'f'), xf)
    assert answer == b'NAK (read only 100 bytes)'
    assert os.listdir(str(dest)) == []


# ---------------------------------------------------------------- sending

def _drain(sock, out, count=None):
    """Read until EOF (or ``count`` bytes) in a thread; the bytes go to out."""
    def run():
        parts, got = [], 0
        while count is None or got < count:
            block = sock.recv(1 << 20)
            if not block:
                break
            parts.append(block)
            got += len(block)
        out.append(b''.join(parts))
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


@pytest.mark.parametrize('tls', [False, True], ids=['plain', 'tls'])
def test_send_from_file_exact_count(tls, tmp_path, request):
    sender, receiver = request.getfixturevalue('tls_pair' if tls else 'pair')
    data = os.urandom(2 * 1024 * 1024 + 5)
    src = tmp_path / 'src.bin'
    src.write_bytes(data + b'written after the stat')   # the file grew meanwhile
    out = []
    t = _drain(receiver, out, len(data) + 4)
    with open(str(src), 'rb') as fh:
        assert dn.send_from_file(sender, fh, len(data)) == len(data)
    sender.sendall(b'NEXT')     # what follows on the connection comes next
    t.join(10)
    assert out == [data + b'NEXT']


def test_send_from_file_shorter_file_sends_less(pair, tmp_path):
    sender, receiver = pair
    src = tmp_path / 'src.bin'
    src.write_bytes(b'a' * 1000)
    out = []
    t = _drain(receiver, out)
    with open(str(src), 'rb') as fh:
        assert dn.send_from_file(sender, fh, 5000) == 1000
    sender.shutdown(socket.SHUT_WR)
    t.join(10)
    assert out == [b'a' * 1000]


def test_send_does_not_use_sendfile(tls_pair, tmp_path, monkeypatch):
    sender, receiver = tls_pair

    def no_sendfile(*args, **kw):
        raise AssertionError('sendfile on a TLS socket')
    monkeypatch.setattr(type(sender), 'sendfile', no_sendfile)
    src = tmp_path / 'src.bin'
    src.write_bytes(b'b' * 300000)
    out = []
    t = _drain(receiver, out, 300000)
    with open(str(src), 'rb') as fh:
        assert dn.send_from_file(sender, fh, 300000) == 300000
    t.join(10)
    assert out == [b'b' * 300000]
