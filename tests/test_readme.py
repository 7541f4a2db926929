"""The README is the user's manual: it must render (a broken table shows
as raw text on PyPI and GitHub), and the test command it gives must be
the one CI runs."""

import io
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def test_readme_is_valid_restructuredtext():
    docutils_core = pytest.importorskip('docutils.core', reason='docutils: tests/requirements.txt')
    warnings = io.StringIO()
    docutils_core.publish_doctree((REPO / 'README.rst').read_text(), settings_overrides={
        'warning_stream': warnings, 'report_level': 2, 'halt_level': 5})
    assert warnings.getvalue() == ''


def test_readme_test_command_is_what_ci_runs():
    readme = (REPO / 'README.rst').read_text()
    ci = (REPO / '.ci' / 'run').read_text()
    assert '\n    bash tests/run\n' in readme
    assert 'bash tests/run' in ci


# ---------------------------------------------------------------- the README's examples
# (issue 22: they must work as written)

import json  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

from legacy import describe, free_port, start_client  # noqa: E402
from nodes import NodeProc  # noqa: E402
from dispy_common import DispyJob  # noqa: E402

UNIT_NAMES = ('dispynode.service', 'dispynode-jobuser.service')


def literal_blocks():
    """The README's literal blocks (text), in order."""
    docutils_core = pytest.importorskip('docutils.core', reason='docutils: tests/requirements.txt')
    from docutils import nodes as rst
    tree = docutils_core.publish_doctree((REPO / 'README.rst').read_text(), settings_overrides={
        'report_level': 5})
    find = getattr(tree, 'findall', tree.traverse)
    return [block.astext() for block in find(rst.literal_block)]


def block(marker):
    found = [text for text in literal_blocks() if marker in text]
    assert len(found) == 1, (marker, len(found))
    return found[0]


def readme_units():
    """{file name: text} of the systemd units in the README."""
    readme = (REPO / 'README.rst').read_text()
    units = {}
    for name in UNIT_NAMES:
        # the literal block that follows the unit's file name
        start = readme.index('::\n\n', readme.index('``/etc/systemd/system/%s``' % name)) + 4
        lines = []
        for line in readme[start:].split('\n'):
            if line and not line.startswith('    '):
                break
            lines.append(line[4:])
        units[name] = '\n'.join(lines).strip() + '\n'
        assert units[name] + '' in [b + '\n' for b in literal_blocks()], name
    assert len(set(units.values())) == len(UNIT_NAMES)
    return units


def _tool(name):
    if shutil.which(name) is None:
        if os.environ.get('CI') == 'true':
            pytest.fail('%s is missing under CI (tests/run installs it)' % name)
        pytest.skip('%s is missing (tests/run installs it)' % name)


def test_readme_units_are_hardened_and_keep_their_results(tmp_path):
    """systemd-analyze security scores each unit 4.0 or better (the units
    the README had scored 9.2 and 9.6); each creates its state directory,
    runs as a created user (or root that drops to --job_user), and has no
    --clean (a restart must keep stored results)."""
    _tool('systemd-analyze')
    units = readme_units()
    sysusers = block('u dispynode ')
    for name, text in units.items():
        path = tmp_path / name
        path.write_text(text)
        service = text.split('[Service]', 1)[1].split('\n[', 1)[0]
        exec_start = re.search(r'^ExecStart=((?:.*\\\n)*.*)$', service, re.M).group(1)
        assert '--clean' not in exec_start and '--daemon' in exec_start, name
        assert re.search(r'^Type=notify$', service, re.M), name
        assert re.search(r'^StateDirectory=dispynode$', service, re.M), name
        assert '--dest_path_prefix /var/lib/dispynode ' in exec_start
        user = re.search(r'^User=(\S+)$', service, re.M)
        job_user = re.search(r'--job_user (\S+)', exec_start)
        assert (user is None) != (job_user is None), name     # one or the other
        assert 'u %s ' % (user or job_user).group(1) in sysusers, name
        assert 'MemoryDenyWriteExecute' not in service     # ctypes, cffi, JITs need it
        r = subprocess.run(['systemd-analyze', 'security', '--offline=true', '--no-pager',
                            str(path)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           universal_newlines=True, timeout=120)
        score = re.search(r'Overall exposure level for %s: (\d+\.\d+)' % re.escape(name),
                          r.stdout)
        assert score, r.stdout[-3000:]
        assert float(score.group(1)) <= 4.0, (name, r.stdout[-4000:])
        stated = re.search(r'scores them (\d\.\d) and (\d\.\d)',
                           (REPO / 'README.rst').read_text())
        assert stated.group(UNIT_NAMES.index(name) + 1) == score.group(1), (name, score)


def _syscall_set(group, cache={}):
    if group not in cache:
        out = subprocess.run(['systemd-analyze', 'syscall-filter', '--no-pager', group],
                             stdout=subprocess.PIPE, universal_newlines=True, check=True,
                             timeout=60).stdout
        names = set()
        for line in out.splitlines()[1:]:
            word = line.strip()
            if word.startswith('@'):
                names |= _syscall_set(word)
            elif word and not word.startswith('#'):
                names.add(word)
        cache[group] = names
    return cache[group]


def unit_syscalls(text):
    """The system calls a unit's SystemCallFilter= lines allow."""
    allowed = None
    for line in re.findall(r'^SystemCallFilter=(.*)$', text, re.M):
        deny = line.startswith('~')
        names = set()
        for word in line.lstrip('~').split():
            names |= _syscall_set(word) if word.startswith('@') else {word}
        if deny:
            allowed -= names
        else:
            allowed = names if allowed is None else allowed | names
    return allowed


@pytest.mark.interop
@pytest.mark.slow
def test_readme_units_allow_every_system_call_the_node_and_jobs_make(tmp_path, legacy_python):
    """The node, its workers and legacy clients' jobs (functions, files
    sent both ways, provisional results, a cancel), traced with strace: each
    system call they make is one the units' SystemCallFilter= allows (a
    call outside it would fail with EPERM under systemd)."""
    _tool('systemd-analyze')
    _tool('strace')
    port = free_port()
    summary = tmp_path / 'syscalls'
    node = NodeProc.start(tmp_path, port=port, wrap=[
        'strace', '-f', '-qq', '-c', '-U', 'name', '-o', str(summary)], timeout=60)
    try:
        for script, args in (('basic_jobs.py', ['jobs=4']), ('send_files.py', []),
                             ('provisional.py', []), ('cancel_job.py', [])):
            client = start_client(script, port, free_port(), *args, timeout=90)
            res = client.result(90)
            assert res.data and 'error' not in res.data and not res.data.get('watchdog'), \
                describe(res, node)
    finally:
        os.killpg(node.pid, signal.SIGTERM)     # the node stops, then strace writes its counts
        try:
            node.proc.wait(30)
        finally:
            node.stop()
    used = set(line.split()[0] for line in summary.read_text().splitlines()[2:]
               if line.strip() and not line.startswith(('-', 'total')))
    assert {'execve', 'sendto', 'setsid', 'socketpair', 'wait4'} <= used, used
    for name, text in readme_units().items():
        assert sorted(used - unit_syscalls(text)) == [], name


def test_readme_client_example_runs_against_our_node(tmp_path, legacy_python):
    """The client example, verbatim but for the node's address (and free
    ports), with the node started as the README says."""
    example = block('dispy.JobCluster(compute')
    assert "nodes=['192.0.2.10']" in example
    # ... and the README says that nodes= must name the node (4.5.5 uses no other)
    text = ' '.join((REPO / 'README.rst').read_text().split())
    assert "on the machine ``192.0.2.10``: put your node's address there. In 4.5.5, " \
        "``nodes=`` is the list of nodes the client may use" in text
    node = NodeProc.start(tmp_path, env={'DISPYNODE_SECRET': 's3cret'})
    client_port = free_port()
    script = example.replace("'192.0.2.10'", "'127.0.0.1'").replace(
        'dispy.JobCluster(compute, ', 'dispy.JobCluster(compute, node_port=%d, port=%d, '
        % (node.port, client_port))
    client = start_client(script + '\nimport os\nos._exit(0)\n', timeout=90, cwd=str(tmp_path))
    try:
        res = client.result(90)
    finally:
        node.stop()
    lines = [line.split() for line in res.stdout.splitlines() if line.strip()
             and not line.startswith('20')]       # (asyncoro's banner)
    assert res.returncode == 0 and [line[0] for line in lines] == [
        str(n * n) for n in range(10)], describe(res, node)
    assert all(line[-1] == '127.0.0.1' for line in lines), describe(res, node)


def dockerfile():
    dockerfile_parse = pytest.importorskip('dockerfile_parse',
                                           reason='dockerfile-parse: tests/requirements.txt')
    import io
    text = block('FROM python:')
    parser = dockerfile_parse.DockerfileParser(fileobj=io.BytesIO(text.encode()))
    return text, parser.structure


def _exec_form(value):
    words = json.loads(value)
    assert isinstance(words, list) and all(isinstance(w, str) for w in words), value
    return words


def test_readme_dockerfile(tmp_path):
    """The Dockerfile parses; it runs the node as a non-root user, on a
    VOLUME that is its prefix, with a HEALTHCHECK that is ``dispynode
    status``; the run line has --init; the README says when --network host
    is needed.  (No docker engine here: the entry point and the health
    check run as plain processes, with the paths mapped.)"""
    text, structure = dockerfile()
    known = {'FROM', 'RUN', 'COPY', 'USER', 'VOLUME', 'EXPOSE', 'HEALTHCHECK', 'ENTRYPOINT',
             'CMD', 'ENV', 'WORKDIR', 'LABEL', 'ARG'}
    by = {}
    for item in structure:
        assert item['instruction'] in known, item
        by.setdefault(item['instruction'], []).append(item['value'])
    assert by['FROM'][0].startswith('python:3.')
    user = by['USER'][-1]
    assert user not in ('root', '0') and re.search(r'useradd [^&;]*\s%s(\s|$)' % user,
                                                   by['RUN'][0]), by
    copied = by['COPY'][0].split()
    assert copied[:-1] == ['dispynode.py', 'dispy_common.py'] and all(
        (REPO / f).is_file() for f in copied[:-1])
    entry = _exec_form(by['ENTRYPOINT'][0])
    prefix = entry[entry.index('--dest_path_prefix') + 1]
    assert _exec_form(by['VOLUME'][0]) == [prefix] and '--clean' not in entry
    assert re.search(r'install -d -o %s -g \S+ -m 0700 %s' % (user, prefix), by['RUN'][0])
    assert '51348/tcp' in by['EXPOSE'][0] and '51348/udp' in by['EXPOSE'][0]
    health = by['HEALTHCHECK'][0]
    assert re.match(r'(--\w+(-\w+)*=\S+\s+)+CMD\s+\[', health), health
    check = _exec_form(health.split('CMD', 1)[1].strip())
    assert check[1:3] == [entry[1], 'status']
    run = block('docker run')
    assert re.search(r'docker run .*--init', run) and '-v dispynode-store:%s' % prefix in run
    readme = (REPO / 'README.rst').read_text()
    assert '``--network host`` is needed for discovery by broadcast' in readme

    # the entry point and the health check, with the image's paths mapped here
    here = {'/opt/dispynode/dispynode.py': str(REPO / 'dispynode.py'),
            prefix: str(tmp_path / 'store'), 'python3': sys.executable}
    mapped = [here.get(w, w) for w in entry]
    port = free_port()
    rest = mapped[2:]
    at = rest.index('--dest_path_prefix')
    del rest[at:at + 2]         # (NodeProc passes the same prefix)
    node = NodeProc.start(tmp_path, python=mapped[0], script=mapped[1], prefix=here[prefix],
                          port=port, args=rest, env={'DISPYNODE_SECRET': 'x'})
    probe = [here.get(w, w) for w in check]
    try:
        ok = subprocess.run(probe, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            universal_newlines=True, timeout=30)
        assert ok.returncode == 0 and ':%d' % port in ok.stdout, ok
    finally:
        node.stop()
    gone = subprocess.run(probe, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=30)
    assert gone.returncode == 1 and 'no node' in gone.stderr, gone


# What the hardened units take away from the node, as far as this machine can
# do it without systemd as PID 1: no capabilities, no new privileges, every
# file system read-only but the prefix, a private /tmp.
# $1: the prefix; $2: a ':'-separated list of folders under /tmp that the
# node needs (a clone and its venv may lie there; the private /tmp would hide
# them): they are bound back, reached through a descriptor of the old /tmp.
HARDENED = r'''
set -e
prefix="$1"; keep="$2"; shift 2
mount --make-rprivate /
mount --bind "$prefix" "$prefix"
for mp in $(awk '{print $5}' /proc/self/mountinfo | sort -u); do
    case "$mp" in /proc*|/sys*|/dev*|"$prefix") continue ;; esac
    mount -o remount,bind,ro "$mp" 2>/dev/null || true
done
exec 3</tmp
mount -t tmpfs -o mode=1777 tmpfs /tmp
IFS=:
for dir in $keep; do
    rel="${dir#/tmp/}"
    mkdir -p "/tmp/$rel"
    mount --no-canonicalize --bind "/proc/self/fd/3/$rel" "/tmp/$rel"   # (not resolved anew)
done
unset IFS
exec 3<&-
exec setpriv --no-new-privs --bounding-set -all --inh-caps -all "$@"
'''


def _kept_under_tmp():
    """The folders under /tmp that the node under HARDENED needs: the
    repository (with the test venv) and the Python's prefix."""
    dirs = {str(REPO), os.path.realpath(sys.prefix), os.path.realpath(sys.base_prefix)}
    return ':'.join(sorted(d for d in dirs if d.startswith('/tmp/')))


@pytest.mark.interop
def test_jobs_run_under_the_units_restrictions(tmp_path, legacy_python):
    """Legacy jobs run (and fork) with the units' restrictions: no
    capabilities, no new privileges, a read-only system, a private /tmp;
    they write where the units let them (their directory, /tmp) and
    nowhere else, and cannot change their user."""
    if os.geteuid() != 0:
        (pytest.fail if os.environ.get('CI') == 'true' else pytest.skip)(
            'needs root (to build the restricted mount namespace)')
    _tool('setpriv')
    import tempfile
    base = tempfile.mkdtemp(prefix='dispytest-hardened-', dir='/var/tmp')  # (not under /tmp)
    try:
        prefix = os.path.join(base, 'prefix')
        os.mkdir(prefix, 0o700)
        node = NodeProc.start(tmp_path, prefix=prefix, args=['-s', 'x'], wrap=[
            'unshare', '--mount', 'sh', '-c', HARDENED, 'sh', prefix, _kept_under_tmp()])
        try:
            with open('/proc/%d/status' % node.pid) as fh:     # (unshare execs it)
                status = dict(line.split(':', 1) for line in fh.read().splitlines())
            assert int(status['CapEff'], 16) == 0 and int(status['CapBnd'], 16) == 0, status
            assert status['NoNewPrivs'].strip() == '1', status
            client = start_client('hardened_probe.py', node.port, free_port(), 'secret=x',
                                  timeout=90)
            res = client.result(90)
        finally:
            node.stop()
        assert res.data and res.data.get('all_final'), describe(res, node)
        results = [j['result'] for j in res.data['jobs']]
        assert [j['status'] for j in res.data['jobs']] == [DispyJob.Finished] * 3
        assert results == [{'cwd': 'ok', 'tmp': 'ok', 'etc': 'EROFS', 'setuid': 'EPERM',
                            'fork': 'ok'}] * 3, describe(res, node)
    finally:
        shutil.rmtree(base, ignore_errors=True)

