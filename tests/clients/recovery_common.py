"""Shared by the recovery_*.py / shared_*.py client scripts.

``bind_broadcasts()`` must run before ``import dispy``.  In the tests'
network namespace the limited broadcast (255.255.255.255) is routed via
``lo`` without a source address, so a broadcast sent from an unbound socket
leaves with source address 0.0.0.0.  A node that answers such a PING with a
PONG naming ``scheduler_ip_addr='0.0.0.0'`` makes the legacy client tell the
node its address is 0.0.0.0, and the node then refuses the client's jobs
(seen against our node; see test_recovery.test_pong_ignores_unspecified_peer).
On a real network a broadcast carries the interface's address, so the
scripts bind their broadcast sockets to 127.0.0.1 first: discovery still
broadcasts, just with the source address a real host would use.
"""

import socket as _socket

_Original = _socket.socket


class _BoundBroadcastSocket(_Original):
    def sendto(self, data, *args):
        addr = args[-1] if args else None
        if isinstance(addr, tuple) and addr and addr[0] in ('<broadcast>', '255.255.255.255'):
            try:
                if self.family == _socket.AF_INET and self.getsockname()[1] == 0:
                    self.bind(('127.0.0.1', 0))
            except OSError:
                pass
        return super().sendto(data, *args)


def bind_broadcasts():
    _socket.socket = _BoundBroadcastSocket
