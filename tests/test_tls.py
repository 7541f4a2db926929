"""TLS: the legacy client's shared-certificate model against our node.

dispy 4.5 (asyncoro 4.3.4) wraps every socket with the same certificate:
servers present ``certfile``/``keyfile``; clients verify the peer against
``ca_certs=certfile`` with no host name check.  The node must cap TLS at 1.2
(asyncoro's non-blocking reads break on TLS 1.3 session tickets).
"""

import os
import pickle
import socket
import ssl
import struct
import subprocess
import sys
import time
import warnings

import pytest

from dispy_common import DispyJob

from driver import exchange
from legacy import CLIENTS, REPO, free_port, run_client

pytestmark = [pytest.mark.interop]

FINISHED = DispyJob.Finished


def _openssl_cert(directory, name='dispytest', combined=False):
    """A self-signed RSA certificate and key; returns (certfile, keyfile)."""
    cert = directory / ('%s-cert.pem' % name)
    key = directory / ('%s-key.pem' % name)
    cmd = ['openssl', 'req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-days', '2',
           '-subj', '/CN=dispytest', '-keyout', str(key), '-out', str(cert)]
    try:
        r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=60)
    except FileNotFoundError:
        r = None
    if r is None or r.returncode != 0:
        return _python_cert(directory, name)
    if combined:
        both = directory / ('%s-both.pem' % name)
        both.write_bytes(cert.read_bytes() + key.read_bytes())
        return both, None
    return cert, key


def _python_cert(directory, name):
    """Fallback when the openssl binary is missing: the ``cryptography``
    package, if installed."""
    try:
        import cryptography  # noqa: F401
    except ImportError:
        if os.environ.get('CI') == 'true':
            pytest.fail('neither the openssl binary nor the cryptography package is available')
        pytest.skip('neither the openssl binary nor the cryptography package is available')
    import datetime
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, 'dispytest')])
    now = datetime.datetime.utcnow()
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cpath = directory / ('%s-cert.pem' % name)
    kpath = directory / ('%s-key.pem' % name)
    cpath.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    kpath.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                        serialization.PrivateFormat.TraditionalOpenSSL,
                                        serialization.NoEncryption()))
    return cpath, kpath


@pytest.fixture
def certpair(tmp_path):
    d = tmp_path / 'tls'
    d.mkdir()
    return _openssl_cert(d)


def _ping_frame(reply_port):
    info = {'version': '4.5', 'port': reply_port, 'sign': 'f' * 20, 'ip_addrs': []}
    data = b'PING:' + pickle.dumps(info, 2)
    return b'0' * 40 + struct.pack('>L', len(data)) + data


def _recv_frame(sock):
    head = b''
    while len(head) < 4:
        chunk = sock.recv(4 - len(head))
        if not chunk:
            return None
        head += chunk
    size = struct.unpack('>L', head)[0]
    body = b''
    while len(body) < size:
        chunk = sock.recv(size - len(body))
        if not chunk:
            return None
        body += chunk
    return body


def _tls_node(node_factory, certfile, keyfile, *extra):
    args = ['--certfile', str(certfile)]
    if keyfile:
        args += ['--keyfile', str(keyfile)]
    return node_factory(args=tuple(args) + extra)


def _check_jobs(res, node, njobs):
    msg = res.describe() + '\n--- node log ---\n' + node.log()[-8000:]
    assert res.data is not None, msg
    assert 'error' not in res.data and not res.data.get('watchdog'), msg
    assert res.data['all_final'], msg
    jobs = res.data['jobs']
    assert len(jobs) == njobs
    for j in jobs:
        assert j['status'] == FINISHED, (j, msg)
        assert j['result'] == j['id'] * 3 + 1, j
        assert j['stdout'] == 'tls-out-%d\n' % j['id'], j
    assert res.data.get('closed'), msg


@pytest.mark.parametrize('combined', [False, True], ids=['cert+key', 'combined-pem'])
def test_tls_legacy_client_jobs(combined, node_factory, legacy_python, tmp_path):
    """The legacy client with certfile=/keyfile= runs 5 jobs over TLS (in
    both directions: requests to the node, JOB_REPLY/PONG to the client).
    Also with one PEM holding both the certificate and the key.

    The client script works around asyncoro 4.3.4's own connect race (see
    tls_jobs.py); what remains is the node's side.  asyncoro reads a frame
    as recvall(4) then recvall(n), waiting on epoll before each: if the node
    sends length and body in one TLS record, the body sits in OpenSSL's
    buffer, epoll never fires, and the JOB_REPLY is never ACKed."""
    d = tmp_path / 'tls'
    d.mkdir()
    certfile, keyfile = _openssl_cert(d, combined=combined)
    node = _tls_node(node_factory, certfile, keyfile)
    args = ['certfile=%s' % certfile, 'jobs=5', 'give_up=20', 'wait=25']
    if keyfile:
        args.append('keyfile=%s' % keyfile)
    res = run_client(CLIENTS / 'tls_jobs.py', node.port, free_port(), *args,
                     timeout=60, cwd=tmp_path)
    assert not (res.data or {}).get('gave_up'), res.describe() + node.log()[-8000:]
    _check_jobs(res, node, 5)
    assert node.alive(), node.log()


def test_plaintext_peer_gets_nothing(certpair, node_factory, tmp_path):
    """A peer speaking plain dispy (auth + PING frame) to a TLS node gets no
    frame back (only, at most, a TLS alert record) and the node then still
    answers the same PING over TLS."""
    certfile, keyfile = certpair
    node = _tls_node(node_factory, certfile, keyfile)
    reply_port = free_port()
    for attempt in range(3):
        got = exchange(node.port, _ping_frame(reply_port), timeout=10, half_close=False)
        # nothing, or a TLS alert record (content type 21): never a frame
        assert got == b'' or got[:1] == b'\x15', got[:64]
        assert b'PONG' not in got and b'sign' not in got and b'version' not in got, got
    # a proper TLS peer is answered
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(str(certfile))
    with socket.create_connection(('127.0.0.1', node.port), timeout=10) as raw:
        with ctx.wrap_socket(raw) as sock:
            sock.sendall(_ping_frame(reply_port))
            body = _recv_frame(sock)
    assert body is not None, node.log()[-5000:]
    pong = pickle.loads(body)
    assert pong['version'] == '4.5' and pong['port'] == node.port, pong
    assert node.alive(), node.log()
    assert 'Traceback' not in node.log(), node.log()[-5000:]


def test_tls12_negotiated(certpair, node_factory):
    """A modern client allowing TLS 1.3 gets TLS 1.2 with a forward-secret
    AEAD cipher; a client demanding TLS 1.3 fails the handshake; the node
    keeps serving."""
    certfile, keyfile = certpair
    node = _tls_node(node_factory, certfile, keyfile)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(str(certfile))   # the shared certificate verifies
    ctx.maximum_version = ssl.TLSVersion.MAXIMUM_SUPPORTED
    with socket.create_connection(('127.0.0.1', node.port), timeout=10) as raw:
        with ctx.wrap_socket(raw) as sock:
            assert sock.version() == 'TLSv1.2', sock.version()
            name, proto, bits = sock.cipher()
            assert proto == 'TLSv1.2' and ('GCM' in name or 'CHACHA20' in name), name
            assert name.startswith(('ECDHE', 'DHE')), name
    if getattr(ssl, 'HAS_TLSv1_3', False):
        only13 = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        only13.check_hostname = False
        only13.verify_mode = ssl.CERT_NONE
        only13.minimum_version = ssl.TLSVersion.TLSv1_3
        with socket.create_connection(('127.0.0.1', node.port), timeout=10) as raw:
            with pytest.raises((ssl.SSLError, OSError)):
                only13.wrap_socket(raw).close()
    # old protocols are refused too
    only11 = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    only11.check_hostname = False
    only11.verify_mode = ssl.CERT_NONE
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore', DeprecationWarning)
            only11.minimum_version = ssl.TLSVersion.TLSv1
            only11.maximum_version = ssl.TLSVersion.TLSv1_1
        only11.set_ciphers('ALL:@SECLEVEL=0')
    except (ValueError, ssl.SSLError):
        only11 = None
    if only11 is not None:
        with socket.create_connection(('127.0.0.1', node.port), timeout=10) as raw:
            with pytest.raises((ssl.SSLError, OSError)):
                only11.wrap_socket(raw).close()
    with socket.create_connection(('127.0.0.1', node.port), timeout=10) as raw:
        with ctx.wrap_socket(raw) as sock:
            sock.sendall(_ping_frame(free_port()))
            assert pickle.loads(_recv_frame(sock))['port'] == node.port
    assert node.alive(), node.log()


def _start_fail(tmp_path, *args):
    cmd = [sys.executable, str(REPO / 'dispynode.py'), '-i', '127.0.0.1', '-p',
           str(free_port()), '--dest_path_prefix', str(tmp_path / 'prefix')] + list(args)
    t0 = time.monotonic()
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=30,
                       stdin=subprocess.DEVNULL)
    return r, time.monotonic() - t0


def test_bad_cert_or_key_exit_2(certpair, tmp_path):
    """Missing, unreadable or unusable certificate/key files: a one-line
    'dispynode: error: ...' on stderr and exit code 2, at once."""
    certfile, keyfile = certpair
    other_cert, other_key = _openssl_cert(certfile.parent, name='other')
    garbage = tmp_path / 'garbage.pem'
    garbage.write_text('-----BEGIN CERTIFICATE-----\nnot a certificate\n'
                       '-----END CERTIFICATE-----\n')
    unreadable = tmp_path / 'unreadable.pem'
    unreadable.write_bytes(certfile.read_bytes())
    os.chmod(str(unreadable), 0)
    cases = [
        ('missing cert', ['--certfile', str(tmp_path / 'nope.pem'), '--keyfile', str(keyfile)]),
        ('missing key', ['--certfile', str(certfile), '--keyfile', str(tmp_path / 'nokey.pem')]),
        ('garbage cert', ['--certfile', str(garbage), '--keyfile', str(keyfile)]),
        ('key of another cert', ['--certfile', str(certfile), '--keyfile', str(other_key)]),
        ('cert without key', ['--certfile', str(certfile)]),
        ('directory as cert', ['--certfile', str(tmp_path), '--keyfile', str(keyfile)]),
        ('key without cert', ['--keyfile', str(keyfile)]),
    ]
    if os.geteuid() != 0:     # root reads mode-000 files anyway
        cases.append(('unreadable cert', ['--certfile', str(unreadable),
                                          '--keyfile', str(keyfile)]))
    for what, args in cases:
        r, took = _start_fail(tmp_path, *args)
        err = r.stderr.decode(errors='replace')
        assert r.returncode == 2, (what, r.returncode, err, r.stdout)
        lines = err.strip().splitlines()
        assert len(lines) == 1, (what, err)
        assert lines[0].startswith('dispynode: error:'), (what, err)
        assert 'Traceback' not in err, (what, err)
        assert took < 15, (what, took)
