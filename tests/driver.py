"""A small dispy 4.5 client, built on dispy_common only, for unit tests.

It speaks to a node the way the legacy client does (40 bytes of auth, then
one framed ``TAG:pickle`` request per TCP connection) and runs a local TCP
server (:class:`ReplyServer`) that plays the client's own server: it takes
``JOB_REPLY:``, ``FILEXFER:``, ``PONG:``, ``TERMINATED:`` and ``PING:``
messages, ACKs job replies (or not, to simulate a dead client) and decodes
them with ``dc.loads_full`` exactly as a client would.

It needs no legacy Python: everything is the current interpreter.

    node = NodeProcess.start(tmp_path)          # nodes.NodeProc: python3 dispynode.py ...
    drv = Driver('127.0.0.1', node.port)
    drv.ping_tcp()                               # learns the node's sign -> auth
    reply, comp = drv.compute('def f(x):\\n    return 2 * x\\n', 'f')
    drv.job(comp.id, 1, (21,))                   # -> b'ACK'
    drv.server.wait_reply(1).result              # -> 42
"""

import atexit
import logging
import os
import pickle
import queue
import socket
import struct
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import dispy_common as dc  # noqa: E402
from legacy import ClosesOnExit, free_port, next_from, wait_for  # noqa: E402,F401
from nodes import NODE_SCRIPT, NodeProc, reap_all  # noqa: E402,F401

NodeProcess = NodeProc      # the name the unit tests (and InProcessNode's mirror) use
JUNK_AUTH = b'x' * dc.AUTH_LEN


# ---------------------------------------------------------------- helpers

def random_hex(nbytes=10):
    return os.urandom(nbytes).hex()


# ---------------------------------------------------------------- raw wire helpers

def frame(data):
    """One length-prefixed frame."""
    return struct.pack('>L', len(data)) + data


def parse_frame(data):
    """The payload of the first whole frame in ``data``, or None."""
    if len(data) < 4:
        return None
    size = struct.unpack('>L', data[:4])[0]
    return data[4:4 + size] if len(data) >= 4 + size else None


def read_all(sock):
    """The bytes ``sock`` receives until the peer closes it; a timeout or a
    reset (OSError) ends them too."""
    got = bytearray()
    try:
        for chunk in iter(lambda: sock.recv(65536), b''):
            got += chunk
    except OSError:
        pass
    return bytes(got)


def exchange(port, raw, timeout=6.0, half_close=True, host='127.0.0.1'):
    """Send ``raw`` on a fresh TCP connection, then read until the node
    closes (or ``timeout``).  Returns the bytes received."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        try:
            sock.sendall(raw)
            if half_close:
                sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        return read_all(sock)


def accept_each(sock, seconds, handle, quiet=False):
    """Accept connections on the listening ``sock`` for ``seconds`` (with
    ``quiet``: until no connection came for ``seconds``) and call
    ``handle(conn)`` on each, closing it after; a true answer from handle
    stops early.  Returns whether handle stopped it."""
    deadline = time.monotonic() + seconds
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        sock.settimeout(min(left, 0.2))
        try:
            conn, _ = sock.accept()
        except socket.timeout:
            continue
        with conn:
            if handle(conn):
                return True
        if quiet:
            deadline = time.monotonic() + seconds


def udp_pongs(node_port, ip_addrs=('127.0.0.1',), wait=1.0, first=False):
    """Send the node a UDP PING (from a client naming ``ip_addrs``) whose port
    is a fresh TCP listener on 127.0.0.1; returns the PONG dicts that reach
    it within ``wait`` seconds (with ``first``, stops at the first)."""
    pongs = []

    def take(conn):
        conn.settimeout(2)
        try:
            msg = dc.recv_msg(conn, None, time.monotonic() + 2)
        except (OSError, dc.ProtocolError):
            return False
        if msg.startswith(b'PONG:'):
            pongs.append(dc.loads_plain(msg[len(b'PONG:'):]))
        return first and bool(pongs)

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as lst, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lst.bind(('127.0.0.1', 0))     # a PONG to 0.0.0.0:port reaches this on Linux
        lst.listen(8)
        udp.sendto(b'PING:' + dc.dumps_plain({
            'version': dc.PROTOCOL_VERSION, 'sign': 'feedc0de', 'port': lst.getsockname()[1],
            'ip_addrs': list(ip_addrs)}), ('127.0.0.1', node_port))
        accept_each(lst, wait, take)
    return pongs


def raw_ping(port, sign='a' * 20, auth=JUNK_AUTH, reply_port=9, timeout=6.0):
    """A TCP PING naming ``sign``, sent as raw bytes; the PONG dict or None."""
    info = {'version': '4.5', 'sign': sign, 'port': reply_port, 'ip_addrs': []}
    body = parse_frame(exchange(port, auth + frame(b'PING:' + pickle.dumps(info, 4)),
                                timeout))
    return pickle.loads(body) if body and body[:1] == b'\x80' else None


# ---------------------------------------------------------------- in-process node

class _Alive:
    """``proc`` of an InProcessNode: poll() is None while the node serves."""

    def __init__(self, node):
        self.node = node

    def poll(self):
        return 0 if self.node.stopping.is_set() else None


class _LogCapture(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines = []
        self.setFormatter(logging.Formatter('%(asctime)s dispynode %(levelname)s %(message)s'))

    def emit(self, record):
        self.lines.append(self.format(record))


class InProcessNode:
    """Our Node running in this process, with NodeProcess's interface (port,
    prefix, log(), stop(), stop_async(), proc.poll()).  It starts in
    milliseconds (its workers are still processes), which keeps the unit
    tests fast; tests of the command line and of signals use NodeProcess.

    Workers load dispynode.py through its bytecode cache, which an installed
    node has (pip compiles it); with PYTHONDONTWRITEBYTECODE set nothing
    writes that cache, and every worker would compile the module anew
    (some 45 ms of CPU, before a computation's first job can run).  So the
    first start writes it once, as an installation would."""

    _compiled = False
    _parser = None          # build_parser() is pure; building it costs milliseconds

    def __init__(self, node, capture, prefix):
        self.node, self.capture = node, capture
        self.port, self.prefix = node.port, Path(prefix)
        self.scheduler_port = node.config.scheduler_port
        self.proc = _Alive(node)

    @classmethod
    def start(cls, workdir, args=(), port=None, scheduler_port=None, env=None, prefix=None,
              **_ignored):
        import dispynode
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        port = port or free_port()
        prefix = Path(prefix) if prefix else workdir / ('prefix-%d' % port)
        argv = ['-i', '127.0.0.1', '-p', str(port), '--dest_path_prefix', str(prefix),
                '--scheduler_port', str(scheduler_port or free_port()), '--daemon'] + \
            [str(a) for a in args]
        if cls._parser is None:
            cls._parser = dispynode.build_parser()
        cfg = dispynode.resolve_config(cls._parser.parse_args(argv))
        cls._compile_once(dispynode)
        capture = _LogCapture()
        log = logging.getLogger('dispynode')
        log.addHandler(capture)
        log.setLevel(logging.DEBUG)
        saved = {k: os.environ.get(k) for k in (env or {})}
        os.environ.update(env or {})    # read (and DISPYNODE_SECRET popped) by Node's start_up
        try:
            # Node runs start_up itself, as main() has it, so what start_up
            # makes (the jobs' cgroup) is the node's to remove
            node = dispynode.Node(cfg)
        except BaseException:
            log.removeHandler(capture)
            raise
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
        node.start()
        return cls(node, capture, prefix)

    @classmethod
    def _compile_once(cls, module):
        if cls._compiled:
            return
        cls._compiled = True
        import py_compile
        for path in (module.__file__, dc.__file__):
            try:
                py_compile.compile(path, doraise=True)
            except (OSError, py_compile.PyCompileError):
                pass        # a read-only tree: workers compile, as before

    def log(self):
        return '\n'.join(self.capture.lines) + '\n'

    def stop(self, sig=None, timeout=10.0):
        self.node.close()
        logging.getLogger('dispynode').removeHandler(self.capture)
        return 0

    stop_async = stop


atexit.register(reap_all)


# ---------------------------------------------------------------- client server

class Message:
    """One message the ReplyServer received."""

    def __init__(self, tag, obj, raw, extra=None):
        self.tag, self.obj, self.raw, self.extra = tag, obj, raw, extra

    def __repr__(self):
        return '<Message %s %r>' % (self.tag, self.obj)


class ReplyServer(ClosesOnExit):
    """The client's TCP server: the node connects here to deliver results.

    ``ack``: True -> ACK each JOB_REPLY (a live client); False -> close
    without ACK (a dead client: the node must store the reply).
    ``ack_delay``: seconds to wait before ACKing.
    """

    def __init__(self, host='127.0.0.1', port=0, ack=True, ack_delay=0.0, timeout=10.0):
        self.ack = ack
        self.ack_delay = ack_delay
        self.timeout = timeout
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(64)
        self.host, self.port = self.sock.getsockname()
        self.messages = queue.Queue()
        self.all = []            # every Message, in arrival order
        self.unacked = []        # JOB_REPLY messages we refused to ACK
        self.files = {}          # name -> bytes from FILEXFER
        self._closed = False
        self._thread = threading.Thread(target=self._accept_loop, daemon=True,
                                        name='reply-server-%d' % self.port)
        self._thread.start()

    def close(self):
        self._closed = True
        try:
            # close() alone does not wake a thread blocked in accept() on
            # Linux: its thread would outlive the server
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        try:
            self.sock.close()
        except OSError:
            pass
        if self._thread is not threading.current_thread():
            self._thread.join(5)

    def replies(self):
        """The JobReplies ACKed so far, in arrival order."""
        return [m.obj for m in list(self.all) if m.tag == 'JOB_REPLY']

    def uids(self):
        return [reply.uid for reply in self.replies()]

    def _accept_loop(self):
        while not self._closed:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                break
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        try:
            with conn:
                conn.settimeout(self.timeout)
                deadline = time.monotonic() + self.timeout
                msg = dc.recv_msg(conn, None, deadline)
                tag, payload = dc.split_tag(msg)
                if tag == b'JOB_REPLY':
                    self._job_reply(conn, payload)
                elif tag == b'FILEXFER':
                    self._filexfer(conn, payload, deadline)
                elif tag in (b'PONG', b'TERMINATED', b'PING'):
                    self._put(Message(tag.decode(), dc.loads_plain(payload), msg))
                else:
                    self._put(Message(None, None, msg))
        except (OSError, dc.ProtocolError):
            pass

    def _put(self, message):
        self.all.append(message)
        self.messages.put(message)

    def _job_reply(self, conn, payload):
        reply = dc.loads_full(payload)
        message = Message('JOB_REPLY', reply, payload)
        if not self.ack:
            self.unacked.append(message)
            return          # close without ACK: the client looks dead
        if self.ack_delay:
            time.sleep(self.ack_delay)
        dc.send_msg(conn, b'ACK')
        self._put(message)

    def _filexfer(self, conn, payload, deadline):
        xf = dc.loads_full(payload)
        reply = dc.loads_full(dc.recv_msg(conn, None, deadline))
        dc.send_msg(conn, b'ACK')
        data = dc.recv_exact(conn, xf.stat_buf.st_size, deadline)
        dc.send_msg(conn, b'ACK')
        self.files[xf.name] = data
        self._put(Message('FILEXFER', xf, payload, extra={'reply': reply, 'data': data}))

    def wait(self, tag=None, timeout=10.0, predicate=None):
        """Next message (with ``tag``, matching ``predicate``), or None.
        Messages skipped over are dropped from the queue (not from .all)."""
        return next_from(self.messages, timeout, lambda message: (
            (tag is None or message.tag == tag)
            and (predicate is None or predicate(message.obj))))

    def wait_reply(self, uid, timeout=10.0, final=True):
        """The JobReply of job ``uid`` (by default its final one)."""
        def match(reply):
            return reply.uid == uid and (
                not final or reply.status != dc.DispyJob.ProvisionalResult)
        message = self.wait('JOB_REPLY', timeout, match)
        return message.obj if message else None


# ---------------------------------------------------------------- the driver

class Driver:
    """Plays a dispy 4.5 client against one node.

    Its results go to ``server`` (a ReplyServer it makes by default); with
    ``reply_port`` it runs none and announces that port instead (where the
    test listens later, or nobody does, so that the node stores results)."""

    def __init__(self, node_host, node_port, secret='', timeout=10.0, server=None,
                 scheduler_ip='127.0.0.1', reply_port=None):
        self.node_addr = (node_host, node_port)
        self.secret = secret
        self.timeout = timeout
        self.sign = random_hex(10)          # the client's own sign (sent in PING)
        self.node_sign = None
        self.auth = None
        self.server = None if reply_port else server or ReplyServer(timeout=timeout)
        self.reply_port = reply_port or self.server.port
        self.scheduler_ip = scheduler_ip
        self.computes = {}                  # compute id -> dc.Compute
        self.job_hashes = {}                # uid -> hash

    def close_server(self):
        if self.server is not None:
            self.server.close()

    # -- transport
    def connect(self):
        sock = socket.create_connection(self.node_addr, timeout=self.timeout)
        sock.settimeout(self.timeout)
        return sock

    def request(self, tag, obj, raw=False, auth=None, reply=True):
        """One request: auth + framed ``TAG:`` + payload.  Returns the reply
        frame, or None if the node closed the connection without one (or
        did not answer in time).  ``tag`` is bytes or str without ':'."""
        if isinstance(tag, str):
            tag = tag.encode()
        payload = obj if raw else dc.dumps(obj)
        auth = auth if auth is not None else (self.auth or JUNK_AUTH)
        with self.connect() as sock:
            sock.sendall(auth)
            dc.send_msg(sock, tag + b':' + payload)
            if not reply:
                return None
            return self._recv(sock)

    def _recv(self, sock):
        try:
            return dc.recv_msg(sock, None, time.monotonic() + self.timeout)
        except (OSError, dc.ProtocolError):
            return None

    # -- discovery
    def ping_info(self, version=dc.PROTOCOL_VERSION, port=None):
        return {'version': version, 'sign': self.sign, 'port': port or self.reply_port,
                'ip_addrs': ['127.0.0.1']}

    def ping_tcp(self, **kw):
        """TCP PING with junk auth (as the client does before it knows the
        node's sign); learns the node's sign and computes the auth.
        Returns the decoded pong dict (or None)."""
        frame = self.request(b'PING', dc.dumps_plain(self.ping_info(**kw)), raw=True,
                             auth=JUNK_AUTH)
        if frame is None:
            return None
        pong = dc.loads_plain(frame)
        if isinstance(pong, dict) and 'sign' in pong:
            self.node_sign = pong['sign']
            self.auth = dc.auth_code(self.secret, self.node_sign)
        return pong

    # -- computations
    def make_compute(self, code, name, dest_path=None, xfer_files=(), setup=None,
                     cleanup=None, compute_type=dc.Compute.func_type, compute_id=None,
                     pulse_interval=None, auth=None):
        return dc.Compute(
            type=compute_type, name=name, id=compute_id or int.from_bytes(os.urandom(4), 'big'),
            code=code, dest_path=dest_path, xfer_files=list(xfer_files), reentrant=False,
            setup=setup, cleanup=cleanup, scheduler_ip_addr=self.scheduler_ip,
            scheduler_port=self.reply_port, auth=auth or random_hex(10),
            job_result_port=self.reply_port, pulse_interval=pulse_interval)

    def compute(self, code, name, **kw):
        """Send COMPUTE for function source ``code`` defining ``name``.
        Returns (reply frame, dc.Compute)."""
        compute = self.make_compute(code, name, **kw)
        answer = self.request(b'COMPUTE', compute)
        if answer == b'ACK':
            self.computes[compute.id] = compute
        return answer, compute

    def xfer_file(self, path, compute_id, name=None):
        return dc.XferFile(name=name or str(path), stat_buf=os.stat(str(path)),
                           compute_id=compute_id, sep=os.sep)

    def xfer(self, path, compute_id=None, name=None, data=None):
        """FILEXFER: announce the file; on NAK stream its bytes.  Returns
        (first answer, final answer or None).  ``data`` overrides what is
        streamed (e.g. a short stream)."""
        if compute_id is None:
            compute_id = next(iter(self.computes))
        xf = self.xfer_file(path, compute_id, name)
        with self.connect() as sock:
            sock.sendall(self.auth or JUNK_AUTH)
            dc.send_msg(sock, b'FILEXFER:' + dc.dumps(xf))
            first = self._recv(sock)
            if first != b'NAK':
                return first, None
            if data is None:
                with open(str(path), 'rb') as fh:
                    data = fh.read()
            sock.sendall(data)
            if len(data) < xf.stat_buf.st_size:
                sock.shutdown(socket.SHUT_WR)
            return first, self._recv(sock)

    def setup(self, compute_id):
        return self.request(b'SETUP', compute_id)

    def job(self, compute_id, uid, args=(), kwargs=None, code='', xfer_files=(),
            job_hash=None):
        """Send JOB; returns the node's answer (b'ACK' or a NAK text)."""
        job = dc.DispyJobRecord(uid=uid, hash=job_hash or random_hex(10),
                                compute_id=compute_id,
                                args=pickle.dumps(tuple(args), dc.PICKLE_PROTOCOL),
                                kwargs=pickle.dumps(dict(kwargs or {}), dc.PICKLE_PROTOCOL),
                                xfer_files=list(xfer_files), code=code)
        self.job_hashes[uid] = job.hash
        return self.request(b'JOB', job)

    def terminate(self, compute_id, uid):
        job = dc.DispyJobRecord(uid=uid, hash=self.job_hashes.get(uid, ''),
                                compute_id=compute_id, args=b'', kwargs=b'',
                                xfer_files=[], code='')
        return self.request(b'TERMINATE_JOB', job)

    def _compute_auth(self, compute_id, auth):
        if auth is not None:
            return auth
        compute = self.computes.get(compute_id)
        return compute.auth if compute is not None else None

    # ``auth`` below is the computation's; ``node_auth`` overrides the
    # request's 40-byte prefix (e.g. the auth of a node's earlier run)
    def close(self, compute_id, auth=None, terminate_pending=False, node_auth=None):
        """CLOSE; the node answers nothing, so this returns once the node
        has handled the request and closed the connection."""
        return self.request(b'CLOSE', {'compute_id': compute_id,
                                       'auth': self._compute_auth(compute_id, auth),
                                       'terminate_pending': terminate_pending},
                            auth=node_auth)

    def _info_request(self, tag, compute_id, auth, node_auth=None):
        info = {'compute_id': compute_id, 'auth': self._compute_auth(compute_id, auth)}
        frame = self.request(tag, info, auth=node_auth)
        return None if frame is None else dc.loads_full(frame)

    def resend(self, compute_id, auth=None, node_auth=None):
        """RESEND_JOB_RESULTS -> count of pending results + running jobs."""
        return self._info_request(b'RESEND_JOB_RESULTS', compute_id, auth, node_auth)

    def pending_jobs(self, compute_id, auth=None, node_auth=None):
        """PENDING_JOBS -> {'done': [uids], 'pending': n}."""
        return self._info_request(b'PENDING_JOBS', compute_id, auth, node_auth)

    def jobs(self, compute_id, auth=None):
        """JOBS -> [{'uid': ..., 'hash': ..., 'start_time': ...}]."""
        return self._info_request(b'JOBS', compute_id, auth)

    def retrieve(self, compute_id, uid, job_hash=None, auth=None, ack=True, node_auth=None):
        """RETRIEVE_JOB -> the stored JobReply (or None); ACKs it if asked."""
        info = {'compute_id': compute_id, 'auth': self._compute_auth(compute_id, auth),
                'uid': uid, 'hash': job_hash if job_hash is not None
                else self.job_hashes.get(uid)}
        with self.connect() as sock:
            sock.sendall(node_auth or self.auth or JUNK_AUTH)
            dc.send_msg(sock, b'RETRIEVE_JOB:' + dc.dumps(info))
            frame = self._recv(sock)
            if frame is None:
                return None
            reply = dc.loads_full(frame)
            if ack and reply is not None:
                dc.send_msg(sock, b'ACK')
                # wait for the node to finish (it closes the connection)
                self._recv(sock)
            return reply
