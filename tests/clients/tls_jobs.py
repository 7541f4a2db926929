"""N function jobs over TLS (shared self-signed certificate model of dispy 4.5).

argv: node_port client_port certfile=PATH [keyfile=PATH] [jobs=5] [secret=...]
      [wait=60] [give_up=0] [race_fix=1]

race_fix=1 works around a client-side race in asyncoro 4.3.4 that has
nothing to do with the node: ``AsyncSocket._async_connect`` registers the
socket with epoll *before* calling ``connect()``.  epoll reports a fresh,
unconnected TCP socket as writable (EPOLLOUT|EPOLLHUP) at once, so the poller
thread can run the connect callback first; with TLS that callback wraps and
handshakes a socket that is not connected yet, fails, closes it, and the
coroutine's ``connect()`` then dies with EBADF ("Transfer of computation
failed" -> the node is dropped).  The fix only defers the epoll registration
until ``connect()`` has been issued; it is the module asyncoro_tls_fix.py that
users drop next to their client code.
"""


def fix_asyncoro_connect_race():
    """The shipped client-side fix (asyncoro_tls_fix.py, next to this file)."""
    import asyncoro_tls_fix
    assert asyncoro_tls_fix.apply()


def compute(n):
    import time
    time.sleep(0.02)
    print('tls-out-%d' % n)
    return n * 3 + 1


if __name__ == '__main__':
    import _common as c

    def main():
        node_port, client_port, extra = c.ports()
        o = c.options(extra, jobs=5, secret='', wait=60.0, give_up=0.0,
                      certfile='', keyfile='', race_fix=True)
        if o['race_fix']:
            fix_asyncoro_connect_race()
        cluster, jobs, res = c.numbered(compute, node_port, client_port, o,
                                        certfile=o['certfile'] or None,
                                        keyfile=o['keyfile'] or None)
        c.finish(res, cluster)

    c.run(main, timeout=100)
