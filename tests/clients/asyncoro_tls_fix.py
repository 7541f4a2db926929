"""Client-side fix for a TLS connect race in asyncoro 4.3.4 (dispy 4.5.5).

Drop this file next to your dispy client script and add one line before you
create a cluster::

    import asyncoro_tls_fix  # noqa: F401  (patches asyncoro on import)

The race: ``AsyncSocket._async_connect`` registers the socket with epoll
*before* it calls ``connect()``.  epoll reports a fresh, unconnected TCP
socket as ready at once, so the poller thread can run the connect callback
first; with TLS that callback starts the handshake on a socket that is not
connected yet, fails, closes it, and the client's ``connect()`` then dies
with EBADF ("Transfer of computation failed": the node is dropped, the jobs
never run).  No node can prevent it.  The fix only defers the epoll
registration until ``connect()`` has been issued; nothing else changes.

Importing it twice is harmless; it does nothing if asyncoro has no
``AsyncSocket._async_connect`` (another asyncoro version).
"""

__all__ = ['apply']


def apply():
    """Patch asyncoro.AsyncSocket (done on import).  Returns True if the
    patch is in place."""
    from asyncoro import AsyncSocket
    orig = getattr(AsyncSocket, '_async_connect', None)
    if orig is None:
        return False
    if getattr(orig, '_dispy_tls_fix', False):
        return True

    def _async_connect(self, *args):
        real = self._notifier
        deferred = []

        class _DeferAdd(object):
            """The notifier, except that ``add`` waits for connect()."""

            def add(self, fd, event):
                deferred.append((fd, event))

            def __getattr__(self, name):
                return getattr(real, name)

        self._notifier = _DeferAdd()
        try:
            orig(self, *args)
        finally:
            self._notifier = real
        for fd, event in deferred:
            real.add(fd, event)

    _async_connect._dispy_tls_fix = True
    AsyncSocket._async_connect = _async_connect
    return True


apply()
