"""Helpers for the recovery and crash-consistency tests.

- ``LegacyProc``: legacy.LegacyClient, a client script in the background.
(The protocol client and its result server are driver.Driver and
driver.ReplyServer.)
- ``node_is_free(port)`` / ``wait_node_free``: probe with a UDP PING whether
  the node answers with a TCP PONG, which it does only while it is free.
- ``scan_store(prefix)``: classify every file under a node's prefix and check
  that records and stored replies are whole.
"""

import os
import sys
import time
from pathlib import Path

from legacy import REPO, LegacyClient
from driver import udp_pongs

sys.path.insert(0, str(REPO))
import dispy_common as dc  # noqa: E402

REPLY_PREFIX = '_dispy_job_reply_'


LegacyProc = LegacyClient       # the name the recovery and service tests use


# ---------------------------------------------------------------- node probes

def node_is_free(node_port, wait=0.6):
    """True if the node answers a UDP PING with a TCP PONG (only a free node
    does)."""
    return bool(udp_pongs(node_port, wait=wait, first=True))


def wait_node_free(node_port, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if node_is_free(node_port, wait=min(0.6, max(0.05, deadline - time.monotonic()))):
            return True
    return False


def processes_gone(pids, timeout):
    from legacy import pid_alive, wait_for
    return wait_for(lambda: not [p for p in pids if pid_alive(p)], timeout)


# ---------------------------------------------------------------- store scan

def scan_store(prefix):
    """Classify the files under ``prefix``.

    Returns a dict: ``records`` {path: dict}, ``replies`` {path: dict},
    ``tmp`` [paths of .tmp-* files], ``corrupt`` [paths of .corrupt-* files],
    ``torn`` [(path, why)] for records/replies that do not load whole,
    ``other`` [paths]."""
    import re
    out = {'records': {}, 'replies': {}, 'tmp': [], 'corrupt': [], 'torn': [], 'other': []}
    prefix = Path(prefix)
    if not prefix.exists():
        return out
    for root, dirs, files in os.walk(str(prefix)):
        for name in files:
            path = os.path.join(root, name)
            if name.startswith('.tmp-'):
                out['tmp'].append(path)
            elif '.corrupt-' in name:
                out['corrupt'].append(path)
            elif name.startswith(REPLY_PREFIX):
                rec = _load(path)
                if isinstance(rec, dict) and isinstance(rec.get('uid'), int) \
                        and 'hash' in rec and isinstance(rec.get('reply'), bytes) \
                        and name == REPLY_PREFIX + str(rec['uid']):
                    try:
                        reply = dc.loads_records(rec['reply'])
                    except dc.ProtocolError as exc:
                        out['torn'].append((path, 'reply bytes: %s' % exc))
                        continue
                    out['replies'][path] = dict(rec, decoded=reply)
                else:
                    out['torn'].append((path, repr(rec)[:200]))
            elif root == str(prefix) and re.match(r'^\d+_[0-9a-fA-F]+$', name):
                rec = _load(path)
                if isinstance(rec, dict) and {'id', 'auth', 'dest_path', 'sign'} <= set(rec):
                    out['records'][path] = rec
                else:
                    out['torn'].append((path, repr(rec)[:200]))
            else:
                out['other'].append(path)
    return out


def _load(path):
    try:
        with open(path, 'rb') as fh:
            return dc.loads_plain(fh.read())
    except (OSError, dc.ProtocolError) as exc:
        return exc
