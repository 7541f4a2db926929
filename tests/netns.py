"""Real-network test harness: hosts, switches, routers and NAT gateways as
Linux network namespaces.

Everything lives in named network namespaces that a ``Lab`` creates (``ip
netns add``) and deletes again; nothing is added to the namespace the tests
run in, nor to the host's.  A *switch* is a namespace holding one Linux
bridge; a *host* gets a veth pair whose one end (``eth0``, ``eth1``, ...)
is in the host and whose other end is a bridge port in the switch.  Every
``ip`` command names its namespace (``ip -n NS ...``), so the harness works
the same from the host's network namespace or from the private one that
conftest moves pytest into.

Stable API::

    available() -> (ok, reason)       root, Linux, `ip`, `ip netns` usable
    nat_tool() -> 'nft' | 'iptables' | None
    lab = Lab(workdir)                 also a context manager; close() cleans up
    sw = lab.switch('lan')             namespace with bridge br0
    h = lab.host('client', hostname=None, hosts=None)
    lab.link(h, sw, '10.231.1.10/24', gateway=None)   -> ifname; first link
                                       also gets the default route (via
                                       gateway, else on-link)
    lab.stub(h, '10.231.99.1/24')     extra interface leading nowhere
    lab.router('rt', (swA, '10.231.1.1/24'), (swB, '10.231.2.1/24'))
    lab.nat_gateway('gw', public=(sw, ['10.231.50.1/24']),
                    private=(sw2, '10.231.60.1/24'),
                    forwards=[(pub_ip, port, priv_ip, priv_port), ...])
    h.addr                              first IPv4 address of the host
    h.run(argv, timeout) / h.spawn(argv, log_path, ...) -> Proc
    lab.start_node(h, args, ip_addr=, port=, name=, impl='ours'|'original')
                                       -> nodes.NodeProc (wait_ready() done)
    lab.start_client(h, script, *args, timeout) -> ClientProc
    ClientProc.result() -> legacy.ClientResult (waits, bounded)
    lab.python_in(h, code) -> CompletedProcess   (sys.executable -c code)

Names are ``dnt<pid>x<lab>-<role>``; namespaces of earlier runs whose pid is
gone are swept when a Lab starts.  close() kills every process started in a
lab namespace (by pid, from ``ip netns pids``), then deletes the namespaces
(which deletes their veths, bridges and netfilter rules with them).
"""

import atexit
import itertools
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import legacy
import nodes

NS_PREFIX = 'dnt'
_NAME_RE = re.compile(r'^%s(\d+)x\d+-' % NS_PREFIX)
_lab_ids = itertools.count(1)
_live_labs = set()
_live_lock = threading.Lock()
CMD_TIMEOUT = 20


class NetnsError(Exception):
    pass


def _run(argv, timeout=CMD_TIMEOUT, check=True, input=None):
    try:
        r = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           timeout=timeout, input=input)
    except subprocess.TimeoutExpired:
        raise NetnsError('%r timed out after %ss' % (' '.join(argv), timeout))
    except OSError as exc:
        raise NetnsError('%r failed: %s' % (' '.join(argv), exc))
    out = r.stdout.decode(errors='replace')
    if check and r.returncode != 0:
        raise NetnsError('%r exited %s: %s' % (' '.join(argv), r.returncode, out.strip()))
    r.output = out
    return r


def available():
    """(True, '') when this process can build namespaces, else (False, why)."""
    if not sys.platform.startswith('linux'):
        return False, 'network namespaces need Linux'
    if os.geteuid() != 0:
        return False, 'network namespaces need root'
    for tool in ('ip', 'unshare', 'mount'):
        if shutil.which(tool) is None:
            return False, '%r not found (apt-get install iproute2 util-linux mount)' % tool
    name = '%s%dx0-probe' % (NS_PREFIX, os.getpid())
    try:
        _run(['ip', 'netns', 'add', name])
    except NetnsError as exc:
        return False, 'ip netns add failed: %s' % exc
    try:
        _run(['ip', '-n', name, 'link', 'add', 'br0', 'type', 'bridge'])
        _run(['ip', '-n', name, 'link', 'add', 'va', 'type', 'veth', 'peer', 'name', 'vb'])
    except NetnsError as exc:
        return False, 'bridge/veth unavailable: %s' % exc
    finally:
        _run(['ip', 'netns', 'del', name], check=False)
    return True, ''


def nat_tool():
    """'nft' or 'iptables' (whichever works), or None."""
    if shutil.which('nft'):
        return 'nft'
    if shutil.which('iptables'):
        return 'iptables'
    return None


def _ns_list():
    r = _run(['ip', 'netns', 'list'], check=False)
    return [line.split()[0] for line in r.output.splitlines() if line.strip()]


def _ns_pids(name):
    r = _run(['ip', 'netns', 'pids', name], check=False)
    return [int(p) for p in r.output.split() if p.isdigit()]


def _kill_ns_processes(name, timeout=5.0):
    """SIGKILL every process inside namespace ``name`` (all of them were
    started by a lab) and wait until they are gone."""
    deadline = time.monotonic() + timeout
    while True:
        pids = [p for p in _ns_pids(name) if p != os.getpid()]
        if not pids or time.monotonic() > deadline:
            return pids
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(0.05)


def _delete_ns(name):
    left = _kill_ns_processes(name)
    _run(['ip', 'netns', 'del', name], check=False)
    return left


def sweep_stale():
    """Delete lab namespaces left by earlier test processes that died."""
    for name in _ns_list():
        m = _NAME_RE.match(name)
        if m and int(m.group(1)) != os.getpid() and not legacy.pid_alive(int(m.group(1))):
            _delete_ns(name)


# ------------------------------------------------------------------ processes

class Proc(legacy.GroupLeader):
    """A process started inside a namespace (``ip netns exec`` execs the
    command, so ``pid`` is the command's own pid)."""

    def __init__(self, popen, log_path, argv, host):
        super().__init__(popen)
        self.log_path = Path(log_path)
        self.argv = argv
        self.host = host

    def log(self, tail=20000):
        try:
            return self.log_path.read_text(errors='replace')[-tail:]
        except OSError:
            return ''

    def __repr__(self):
        return '<Proc %s in %s: %s>' % (self.pid, self.host.name, ' '.join(self.argv[-6:]))


class ClientProc(Proc):
    """A legacy dispy client script running inside a host namespace."""

    def __init__(self, popen, log_path, argv, host, timeout, err_path):
        super().__init__(popen, log_path, argv, host)
        self.timeout = timeout
        self.started = time.monotonic()
        self.err_path = Path(err_path)

    def result(self):
        remaining = max(1.0, self.timeout - (time.monotonic() - self.started))
        timed_out = False
        try:
            self.popen.wait(remaining)
        except subprocess.TimeoutExpired:
            timed_out = True
            self.stop(signal.SIGKILL, timeout=1)
        out = self.log(10 ** 7)
        try:
            err = self.err_path.read_text(errors='replace')
        except OSError:
            err = ''
        if timed_out:
            raise AssertionError('client %s timed out after %ss\n--- stdout ---\n%s\n'
                                 '--- stderr ---\n%s' % (' '.join(self.argv), self.timeout,
                                                         out[-8000:], err[-8000:]))
        return legacy.ClientResult(self.popen.returncode, out, err, legacy._parse_result(out),
                                   self.argv)


# ----------------------------------------------------------------- namespaces

class Namespace:
    def __init__(self, lab, role, name):
        self.lab = lab
        self.role = role
        self.name = name

    def ip(self, *args, check=True):
        return _run(['ip', '-n', self.name] + [str(a) for a in args], check=check)

    def exec_argv(self, argv):
        return ['ip', 'netns', 'exec', self.name] + [str(a) for a in argv]

    def run(self, argv, timeout=CMD_TIMEOUT, check=True, input=None):
        return _run(self.exec_argv(argv), timeout=timeout, check=check, input=input)

    def sysctl(self, key, value):
        self.run(['sysctl', '-q', '-w', '%s=%s' % (key, value)])

    def __repr__(self):
        return '<%s %s>' % (type(self).__name__, self.name)


class Switch(Namespace):
    """A namespace with one bridge (br0); hosts plug veths into it."""

    def __init__(self, lab, role, name):
        super().__init__(lab, role, name)
        self.ports = itertools.count(1)
        self.ip('link', 'set', 'lo', 'up')
        self.ip('link', 'add', 'br0', 'type', 'bridge', 'stp_state', '0', 'forward_delay', '0')
        self.ip('link', 'set', 'br0', 'up')


class Host(Namespace):
    """A machine: its own network stack, optionally its own hostname and
    /etc/hosts (set for every process spawned in it)."""

    def __init__(self, lab, role, name, hostname=None, hosts=None):
        super().__init__(lab, role, name)
        self.ifaces = {}          # ifname -> 'a.b.c.d'
        self.hostname = hostname
        self.hosts_file = None
        if hosts is not None:
            self.hosts_file = lab.workdir / ('hosts-%s' % role)
            self.hosts_file.write_text(hosts)
        self._ifnum = itertools.count(0)
        self.ip('link', 'set', 'lo', 'up')
        # the limited broadcast (255.255.255.255), which the legacy client
        # sends, follows the default route: link() gives the first link one,
        # else sendto fails with ENETUNREACH

    @property
    def addr(self):
        return next(iter(self.ifaces.values()), None)

    def exec_argv(self, argv):
        """``ip netns exec`` (which also gives a private mount namespace),
        plus hostname (UTS namespace) and /etc/hosts (bind mount) if set."""
        argv = [str(a) for a in argv]
        if self.hostname is None and self.hosts_file is None:
            return ['ip', 'netns', 'exec', self.name] + argv
        script = 'set -e\n'
        if self.hostname is not None:
            script += 'hostname "$DNT_HOSTNAME"\n'
        if self.hosts_file is not None:
            script += 'mount --bind "$DNT_HOSTS" /etc/hosts\n'
        script += 'exec "$@"\n'
        env = ['env']
        if self.hostname is not None:
            env.append('DNT_HOSTNAME=%s' % self.hostname)
        if self.hosts_file is not None:
            env.append('DNT_HOSTS=%s' % self.hosts_file)
        return (['ip', 'netns', 'exec', self.name] + env +
                ['unshare', '--uts', '--mount', '--propagation', 'private', '--',
                 'sh', '-c', script, 'dnt-exec'] + argv)

    def spawn(self, argv, log_path, env=None, cwd=None, cls=Proc, err_path=None, **kw):
        full_env = dict(os.environ)
        full_env['PYTHONUNBUFFERED'] = '1'
        if env:
            full_env.update(env)
        full = self.exec_argv(argv)
        log_path = Path(log_path)
        with open(str(log_path), 'ab') as log:
            log.write(('$ %s\n' % ' '.join(full)).encode())
            log.flush()
            err = open(str(err_path), 'ab') if err_path else None
            try:
                popen = subprocess.Popen(full, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=err or subprocess.STDOUT, env=full_env,
                                         cwd=str(cwd) if cwd else str(self.lab.workdir),
                                         start_new_session=True)
            finally:
                if err:
                    err.close()
        if cls is ClientProc:
            proc = cls(popen, log_path, full, self, err_path=err_path, **kw)
        else:
            proc = cls(popen, log_path, full, self, **kw)
        self.lab._procs.append(proc)
        return proc


class Lab(legacy.ClosesOnExit):
    """A set of namespaces and the processes in them; close() removes all."""

    def __init__(self, workdir=None):
        ok, why = available()
        if not ok:
            raise NetnsError(why)
        sweep_stale()
        self.id = next(_lab_ids)
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix='dnt-lab-'))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.namespaces = []
        self._procs = []
        self._closed = False
        with _live_lock:
            _live_labs.add(self)

    # -- building
    def _ns_name(self, role):
        if not re.match(r'^[A-Za-z0-9_.]+$', role):
            raise ValueError('bad role %r' % role)
        return '%s%dx%d-%s' % (NS_PREFIX, os.getpid(), self.id, role)

    def _new(self, cls, role, **kw):
        name = self._ns_name(role)
        _run(['ip', 'netns', 'add', name])
        self.namespaces.append(name)
        ns = cls(self, role, name, **kw)
        return ns

    def switch(self, role):
        return self._new(Switch, role)

    def host(self, role, hostname=None, hosts=None):
        return self._new(Host, role, hostname=hostname, hosts=hosts)

    def link(self, host, switch, cidr, gateway=None, default_route=None):
        """Plug ``host`` into ``switch`` with address ``cidr``; returns the
        host-side interface name.  The host's first link gets the default
        route (via ``gateway``, else on-link) unless default_route=False."""
        if default_route is None:
            default_route = not host.ifaces
        ifname = 'eth%d' % next(host._ifnum)
        port = 'p%d' % next(switch.ports)
        switch.ip('link', 'add', port, 'type', 'veth', 'peer', 'name', ifname,
                  'netns', host.name)
        switch.ip('link', 'set', port, 'master', 'br0', 'up')
        host.ip('addr', 'add', cidr, 'brd', '+', 'dev', ifname)
        host.ip('link', 'set', ifname, 'up')
        host.ifaces[ifname] = cidr.split('/')[0]
        if default_route:
            if gateway:
                host.ip('route', 'add', 'default', 'via', gateway, 'dev', ifname)
            else:
                host.ip('route', 'add', 'default', 'dev', ifname)
        return ifname

    def stub(self, host, cidr, ifname='aux0'):
        """Give ``host`` an extra interface ``ifname`` with address
        ``cidr`` that leads nowhere (a veth pair with both ends in host)."""
        host.ip('link', 'add', ifname, 'type', 'veth', 'peer', 'name', ifname + 'p')
        host.ip('addr', 'add', cidr, 'brd', '+', 'dev', ifname)
        host.ip('link', 'set', ifname + 'p', 'up')
        host.ip('link', 'set', ifname, 'up')
        return ifname

    def router(self, role, *legs):
        """A host with one interface per (switch, cidr) leg and IPv4
        forwarding on; no default route."""
        rt = self.host(role)
        for sw, cidr in legs:
            self.link(rt, sw, cidr, default_route=False)
        rt.sysctl('net.ipv4.ip_forward', 1)
        return rt

    def nat_gateway(self, role, public, private, forwards, tool=None):
        """A NAT gateway: ``public`` = (switch, [cidr, ...]) (several public
        addresses allowed), ``private`` = (switch, cidr).  ``forwards`` is a
        list of (public_ip, port, private_ip, private_port): UDP and TCP to
        public_ip:port are DNATed to private_ip:private_port.  Traffic from
        the private side leaving on the public side is masqueraded; the
        public side reaches the private side only through the DNAT rules.
        A private address that is a DNAT target is SNATed to its public
        address on the way out (1:1 NAT); the rest is masqueraded."""
        tool = tool or nat_tool()
        if tool is None:
            raise NetnsError('neither nft nor iptables is installed '
                             '(apt-get install nftables)')
        gw = self.host(role)
        pub_sw, pub_cidrs = public
        priv_sw, priv_cidr = private
        pub_if = self.link(gw, pub_sw, pub_cidrs[0], default_route=False)
        for extra in pub_cidrs[1:]:
            gw.ip('addr', 'add', extra, 'dev', pub_if)
        priv_if = self.link(gw, priv_sw, priv_cidr, default_route=False)
        priv_net = _network(priv_cidr)
        gw.sysctl('net.ipv4.ip_forward', 1)
        # outgoing traffic of a forwarded private address leaves from its
        # public address (1:1); anything else is masqueraded
        snat = {}
        for pub_ip, _, priv_ip, _ in forwards:
            snat.setdefault(priv_ip, pub_ip)
        if tool == 'nft':
            rules = ['table ip dnt_nat {',
                     ' chain prerouting { type nat hook prerouting priority -100; policy accept;']
            for pub_ip, port, priv_ip, priv_port in forwards:
                for proto in ('tcp', 'udp'):
                    rules.append('  ip daddr %s %s dport %d dnat to %s:%d'
                                 % (pub_ip, proto, port, priv_ip, priv_port))
            rules += [' }',
                      ' chain postrouting { type nat hook postrouting priority 100; '
                      'policy accept;',
                      ] + ['  oifname "%s" ip saddr %s snat to %s' % (pub_if, priv_ip, pub_ip)
                           for priv_ip, pub_ip in snat.items()] + [
                      '  oifname "%s" ip saddr %s masquerade' % (pub_if, priv_net),
                      ' }', '}',
                      'table ip dnt_filter {',
                      ' chain forward { type filter hook forward priority 0; policy drop;',
                      '  ct state established,related accept',
                      '  ct status dnat accept',
                      '  iifname "%s" oifname "%s" accept' % (priv_if, pub_if),
                      ' }', '}']
            gw.run(['nft', '-f', '-'], input=('\n'.join(rules) + '\n').encode())
        else:
            for pub_ip, port, priv_ip, priv_port in forwards:
                for proto in ('tcp', 'udp'):
                    gw.run(['iptables', '-t', 'nat', '-A', 'PREROUTING', '-d', pub_ip, '-p',
                            proto, '--dport', str(port), '-j', 'DNAT', '--to-destination',
                            '%s:%d' % (priv_ip, priv_port)])
            for priv_ip, pub_ip in snat.items():
                gw.run(['iptables', '-t', 'nat', '-A', 'POSTROUTING', '-o', pub_if, '-s', priv_ip,
                        '-j', 'SNAT', '--to-source', pub_ip])
            gw.run(['iptables', '-t', 'nat', '-A', 'POSTROUTING', '-o', pub_if, '-s', priv_net,
                    '-j', 'MASQUERADE'])
            gw.run(['iptables', '-P', 'FORWARD', 'DROP'])
            gw.run(['iptables', '-A', 'FORWARD', '-m', 'conntrack', '--ctstate',
                    'ESTABLISHED,RELATED', '-j', 'ACCEPT'])
            gw.run(['iptables', '-A', 'FORWARD', '-m', 'conntrack', '--ctstate', 'DNAT',
                    '-j', 'ACCEPT'])
            gw.run(['iptables', '-A', 'FORWARD', '-i', priv_if, '-o', pub_if, '-j', 'ACCEPT'])
        gw.nat_tool = tool
        return gw

    # -- processes
    def start_node(self, host, args=(), port=None, ip_addr=None, name=None, **kw):
        """Start a node in ``host`` with nodes.NodeProc (``impl``, ``wait``,
        ``python``, ``env``, ``debug`` as there).  ``ip_addr`` is passed as -i
        (None: no -i; the node picks its address); ``port`` as -p (None: the
        default 51348)."""
        workdir = self.workdir / ('node%d-%s' % (len(self._procs), host.role))
        args = (['--name', name] if name else []) + list(args)
        return nodes.NodeProc.start(workdir, args, port=port or 51348, ip_addr=ip_addr,
                                    host=host, **kw)

    def start_client(self, host, script, *args, timeout=90, env=None, python=None):
        """Start a legacy client script (a name in tests/clients or a path)
        in ``host``, with the legacy venv's python; returns a ClientProc."""
        path, _ = legacy.client_script(script)
        idx = len(self._procs)
        cwd = self.workdir / ('client%d-%s' % (idx, host.role))
        cwd.mkdir(parents=True, exist_ok=True)
        argv = [str(python or legacy.ensure_legacy_venv()), str(path)] + [str(a) for a in args]
        return host.spawn(argv, cwd / 'stdout.log', env=legacy.client_env(max(5.0, timeout - 5),
                                                                         env),
                          cwd=cwd, cls=ClientProc,
                          timeout=timeout, err_path=cwd / 'stderr.log')

    def run_client(self, host, script, *args, timeout=90, **kw):
        return self.start_client(host, script, *args, timeout=timeout, **kw).result()

    def python_in(self, host, code, timeout=30, env=None):
        """Run ``sys.executable -c code`` in host (hostname/hosts applied)
        with the repository on sys.path."""
        full_env = dict(os.environ)
        full_env['PYTHONPATH'] = str(legacy.REPO)
        if env:
            full_env.update(env)
        try:
            return subprocess.run(host.exec_argv([sys.executable, '-c', code]),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  timeout=timeout, env=full_env, universal_newlines=True)
        except subprocess.TimeoutExpired:
            raise NetnsError('python in %s timed out' % host.name)

    # -- teardown
    def close(self):
        """Stop every process, then delete every namespace.  Returns a list
        of problems (namespaces that would not go away)."""
        if self._closed:
            return []
        self._closed = True
        for proc in self._procs:
            if proc.alive():
                proc.send_signal(signal.SIGKILL)
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                proc.popen.wait(5)
            except subprocess.TimeoutExpired:
                pass
        problems = []
        for name in reversed(self.namespaces):
            left = _delete_ns(name)
            if left:
                problems.append('%s: processes %s would not die' % (name, left))
        remaining = set(_ns_list())
        problems += ['namespace %s still exists' % n for n in self.namespaces if n in remaining]
        with _live_lock:
            _live_labs.discard(self)
        return problems


def _network(cidr):
    import ipaddress
    return str(ipaddress.IPv4Interface(cidr).network)


@atexit.register
def _close_all():
    with _live_lock:
        labs = list(_live_labs)
    for lab in labs:
        try:
            lab.close()
        except Exception:
            pass
