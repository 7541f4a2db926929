"""pytest configuration: legacy stack, the node fixture and network isolation.

The node fixture, ``node_factory``, is parametrised over how the node runs
(``node_mode``): ``local`` (our dispynode.py on 127.0.0.1), ``copied`` and
``renamed`` (our node run from a folder holding only a copy of the two
deployment files, the node file named dispynode.py or compute-node.py),
``netns`` (our node in a ``netns.Host`` the test passes as ``host=``) and
``original`` (dispy 4.5.5's node from the legacy venv).  A test declares the
modes it supports with ``@pytest.mark.node_modes(...)`` (default: local).
DISPYTEST_IMPLS (default 'ours') selects which run: 'ours' enables every
mode but 'original', 'original' that one.  The ``impl`` fixture says which
implementation a test got ('ours' or 'original').

The legacy dispy client always broadcasts a UDP PING to 255.255.255.255 when
it starts (and the original node broadcasts too). To keep that traffic off
the machine's networks, pytest_configure builds the legacy venv (which needs
the network for pip) and then, when running as root on Linux, moves the whole
pytest process into a new network namespace that has only loopback (plus a
route sending 255.255.255.255 to lo, else the legacy client's discovery dies
with ENETUNREACH). Every node and client subprocess inherits it. Opt out with DISPYTEST_NO_NETNS=1.
"""

import ctypes
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import legacy  # noqa: E402
from legacy import LegacyUnavailable, ensure_legacy_venv, free_port  # noqa: E402
from nodes import NodeProc, reap_all  # noqa: E402

CLONE_NEWNET = 0x40000000

_legacy_state = {'python': None, 'reason': None}
_netns_state = {'isolated': False, 'warned': False}


def _ensure_legacy():
    try:
        _legacy_state['python'] = ensure_legacy_venv()
        _legacy_state['reason'] = None
    except LegacyUnavailable as exc:
        _legacy_state['reason'] = exc.reason
    except Exception as exc:  # never let configure crash on this
        _legacy_state['reason'] = 'unexpected error building legacy venv: %r' % (exc,)


def _isolate_network(config):
    if os.environ.get('DISPYTEST_ISOLATED') == '1':
        _netns_state['isolated'] = True   # inherited from a parent that isolated itself
        return
    if os.environ.get('DISPYTEST_NO_NETNS') == '1':
        return
    if not sys.platform.startswith('linux') or os.geteuid() != 0:
        _warn_once(config, 'not root on Linux: dispy tests run on the host loopback; the legacy '
                           'client will broadcast UDP to 255.255.255.255')
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        _warn_once(config, 'unshare(CLONE_NEWNET) failed (%s): tests run on host network'
                           % os.strerror(err))
        return
    # lo up; and a route for the limited broadcast address via lo: the legacy
    # client and node broadcast to 255.255.255.255, and without a route that
    # fails with ENETUNREACH, which kills the legacy client's discovery.
    # 'src 127.0.0.1' matters: without it broadcasts leave from 0.0.0.0, the
    # node answers the PING with scheduler_ip_addr '0.0.0.0', and the client
    # may adopt that address for its computation.
    for cmd in (['ip', 'link', 'set', 'lo', 'up'],
                ['ip', 'route', 'add', 'broadcast', '255.255.255.255', 'dev', 'lo',
                 'table', 'local', 'src', '127.0.0.1']):
        r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        if r.returncode != 0:
            raise pytest.UsageError('in the new network namespace, %r failed: %s'
                                    % (' '.join(cmd), r.stdout.decode(errors='replace')))
    os.environ['DISPYTEST_ISOLATED'] = '1'
    _netns_state['isolated'] = True


def _warn_once(config, msg):
    if _netns_state['warned']:
        return
    _netns_state['warned'] = True
    tr = config.pluginmanager.get_plugin('terminalreporter')
    if tr is not None:
        tr.write_line('WARNING: ' + msg, yellow=True)
    else:
        warnings.warn(msg)


def pytest_configure(config):
    config.addinivalue_line('markers', 'interop: runs the legacy dispy 4.5.5 client or node')
    config.addinivalue_line('markers', 'slow: takes more than a few seconds')
    config.addinivalue_line('markers', 'ours_only: needs our node (the original node fails '
                                       'or hangs on this scenario)')
    config.addinivalue_line('markers', 'node_modes(*modes): how node_factory may run the node '
                                       '(local, netns, copied, renamed, original)')
    # xdist workers: only build in the controller; workers would just find the
    # marker file (the fcntl lock keeps concurrent builds safe anyway)
    _ensure_legacy()
    _isolate_network(config)


def pytest_report_header(config):
    lines = ['legacy stack: %s' % (_legacy_state['python'] or
                                   'UNAVAILABLE (%s)' % _legacy_state['reason'])]
    lines.append('network namespace isolation: %s' % (
        'yes' if _netns_state['isolated'] else 'no'))
    return lines


@pytest.fixture(scope='session')
def legacy_python():
    """Path of the legacy venv's python (Python 3.6, dispy 4.5.5, asyncoro 4.3.4)."""
    if _legacy_state['python'] is None:
        _ensure_legacy()   # e.g. configure ran before a transient failure was fixed
    if _legacy_state['python'] is None:
        reason = _legacy_state['reason']
        if os.environ.get('CI') == 'true':
            pytest.fail('legacy dispy 4.5.5 stack unavailable under CI: %s' % reason)
        pytest.skip('legacy dispy 4.5.5 stack unavailable: %s (needs Python 3.6 via pyenv or '
                    'DISPY_LEGACY_PYTHON)' % reason)
    return _legacy_state['python']


OURS_MODES = {'local': {}, 'netns': {}, 'copied': {'copy_as': 'dispynode.py'},
              'renamed': {'copy_as': 'compute-node.py'}}


@pytest.fixture
def node_factory(tmp_path, node_mode):
    """Start nodes the way ``node_mode`` says, each in a fresh workdir; all
    are stopped at teardown.  ``node_factory(args=(...), wait=True, **kw)``
    (keywords go to nodes.NodeProc.start) returns a started (by default
    ready) node."""
    started = []

    def start(args=(), **kw):
        workdir = tmp_path / ('node%d' % (len(started) + 1))
        if node_mode == 'original':
            kw['impl'] = 'original'
        else:
            kw.update(OURS_MODES[node_mode])
        if 'copy_as' in kw:
            args = tuple(args) + ('--clean',)    # as the README starts a copied node
        host = kw.pop('host', None)
        if (host is not None) != (node_mode == 'netns') and node_mode != 'original':
            raise ValueError('a netns node needs host=, and only a netns node takes one')
        if host is not None:        # with the lab's defaults (dispy's port, no -i)
            node = host.lab.start_node(host, args, **kw)
        else:
            node = NodeProc.start(workdir, args, **kw)
        started.append(node)
        return node

    yield start
    for node in started:
        node.stop(timeout=5)
    for node in started:
        if node.deploy is not None:     # the node wrote nothing next to its files
            left = sorted(n for n in os.listdir(str(node.deploy)) if n != '__pycache__')
            assert left == sorted(['dispy_common.py', node.cmd[1].rsplit('/', 1)[1]]), left


@pytest.fixture
def client_port():
    """A fresh free port for a legacy client (TCP + UDP)."""
    return free_port()


# ------------------------------------------------------------ implementations

def _impls():
    """Node implementations enabled by env DISPYTEST_IMPLS (comma separated,
    'ours' and/or 'original'), default 'ours'."""
    impls = [i.strip() for i in os.environ.get('DISPYTEST_IMPLS', 'ours').split(',') if i.strip()]
    for i in impls:
        if i not in ('ours', 'original'):
            raise pytest.UsageError('DISPYTEST_IMPLS: unknown implementation %r' % i)
    return impls


def pytest_generate_tests(metafunc):
    if 'node_mode' not in metafunc.fixturenames:
        return
    marker = metafunc.definition.get_closest_marker('node_modes')
    declared = marker.args if marker else ('local',)
    for mode in declared:
        if mode not in OURS_MODES and mode != 'original':
            raise pytest.UsageError('%s: unknown node mode %r' % (metafunc.function.__name__,
                                                                  mode))
    impls = _impls()
    modes = [m for m in declared if ('original' if m == 'original' else 'ours') in impls]
    metafunc.parametrize('node_mode', modes, scope='function')


@pytest.fixture
def impl(node_mode):
    """The implementation the test's node_mode runs: 'ours' or 'original'."""
    return 'original' if node_mode == 'original' else 'ours'


@pytest.fixture(autouse=True)
def _impl_guard(request):
    """Tests marked ours_only are skipped for the original node unless
    DISPYTEST_RUN_OURS_ONLY=1 (to confirm the original really fails them)."""
    callspec = getattr(request.node, 'callspec', None)
    mode = callspec.params.get('node_mode') if callspec is not None else None
    marker = request.node.get_closest_marker('ours_only')
    if mode == 'original' and marker and os.environ.get('DISPYTEST_RUN_OURS_ONLY') != '1':
        pytest.skip('original dispy 4.5.5 node fails this scenario: %s'
                    % (marker.kwargs.get('reason') or (marker.args[0] if marker.args else '')))
    if mode in OURS_MODES and not (legacy.REPO / 'dispynode.py').exists():
        if os.environ.get('CI') == 'true':
            pytest.fail('dispynode.py missing')
        pytest.skip('dispynode.py not written yet')


def pytest_sessionfinish(session):
    reap_all()      # nodes stopped with stop_async


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under CI=true nothing may skip: a skip is reported as a failure."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and os.environ.get('CI') == 'true' and not hasattr(report, 'wasxfail'):
        report.outcome = 'failed'
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.longrepr = 'skipped under CI=true, which must run everything: %s' % (reason,)
