"""Legacy behaviours compared side by side with the 4.5.5 node (issue 21).

argv: node_port client_port case=<name> [marker=<path>] [jobs=3]
One cluster per run; res['jobs'] = the job_info of each job (job.id = the
job's argument), res['all_final'].
  interrupt   jobs 'main_caught', 'main_uncaught', 'sigint_caught',
              'sigint_uncaught': _thread.interrupt_main() / SIGINT to the
              job process itself, KeyboardInterrupt caught or not
  chdir       setup ends in the subdirectory 'sub'; each job reports its
              cwd and whether the depends file is there
  setup_fail  setup returns 1, cleanup writes 'cleanup ran' to marker; the
              jobs cannot run: the run ends once the marker exists
              (res['marker']) or after 20 s
  dest_dot    dest_path='.': each job reports its cwd
  names       a job that warns (UserWarning) and one that raises
  load_fail   compute's default argument names a client-only global: each
              job reports the NameError
  numpy       jobs returning numpy arrays and scalars: res['numpy'] holds,
              per job, dtype, shape and values as the client loaded them
"""

import os
import time

LIMIT = 3   # a client-only global: not in the computation's code


def interrupt(kind):
    import _thread
    import signal
    print('before ' + kind)
    try:
        if kind.startswith('main'):
            _thread.interrupt_main()
        else:
            os.kill(os.getpid(), signal.SIGINT)
        deadline = time.time() + 5
        while time.time() < deadline:     # the interrupt arrives between bytecodes
            pass
    except KeyboardInterrupt:
        if kind.endswith('_caught'):
            return 'caught'
        raise
    return 'not interrupted'


def setup_chdir():
    os.mkdir('sub')
    os.chdir('sub')
    return 0


def where(name):
    return [os.getcwd(), os.path.exists(name)]


def setup_fails(marker):
    return 1


def cleanup_marks(marker):
    with open(marker, 'w') as fh:
        fh.write('cleanup ran')


def names(kind):
    import warnings
    if kind == 'warn':
        warnings.warn('careful')
        return 'warned'
    raise ValueError('job raised')


def scaled(n, factor=LIMIT):
    return n * factor


def arrays(kind):
    import numpy
    if kind == 'float64':
        return numpy.arange(6, dtype=numpy.float64).reshape(2, 3) / 4
    if kind == 'int32':
        return numpy.array([[1, -2], [3, 2 ** 30]], dtype=numpy.int32)
    if kind == 'complex':
        return numpy.array([1 + 2j, -0.5j], dtype=numpy.complex128)
    if kind == 'scalar_f':
        return numpy.float64(2.5)
    if kind == 'scalar_i':
        return numpy.int64(-7)
    if kind == 'mixed':
        return {'a': numpy.array([True, False]), 'b': [numpy.float32(0.25)]}
    if kind == 'stringdtype':      # numpy 2 only: no numpy 1.x equivalent
        return numpy.array(['x', 'yz'], dtype=numpy.dtypes.StringDType())
    return None


def describe_numpy(value):
    import numpy
    if isinstance(value, dict):
        return {k: describe_numpy(v) for k, v in sorted(value.items())}
    if isinstance(value, list):
        return [describe_numpy(v) for v in value]
    if isinstance(value, (numpy.ndarray, numpy.generic)):
        return {'type': type(value).__name__, 'dtype': str(value.dtype),
                'shape': list(numpy.shape(value)), 'values': numpy.asarray(value).tolist()
                if value.dtype.kind != 'c' else [[z.real, z.imag] for z in
                                                 numpy.asarray(value).ravel().tolist()]}
    return {'repr': repr(value)}


if __name__ == '__main__':
    import functools
    import _common as c

    def main():
        node_port, client_port, extra = c.ports()
        o = c.options(extra, case='names', marker='', jobs=3)
        case = o['case']
        kw, args = {}, []
        if case == 'interrupt':
            func, args = interrupt, ['main_caught', 'main_uncaught', 'sigint_caught',
                                     'sigint_uncaught']
        elif case == 'chdir':
            dep = 'dep-%d.txt' % os.getpid()
            with open(dep, 'w') as fh:
                fh.write('x')
            func, args = where, [dep] * o['jobs']
            kw = dict(depends=[dep], setup=setup_chdir)
        elif case == 'setup_fail':
            func, args = where, ['x']
            kw = dict(setup=functools.partial(setup_fails, o['marker']),
                      cleanup=functools.partial(cleanup_marks, o['marker']))
        elif case == 'dest_dot':
            func, args = where, ['x'] * o['jobs']
            kw = dict(dest_path='.')
        elif case == 'names':
            func, args = names, ['warn', 'raise']
        elif case == 'load_fail':
            func, args = scaled, list(range(o['jobs']))
        elif case == 'numpy':
            func, args = arrays, ['float64', 'int32', 'complex', 'scalar_f', 'scalar_i',
                                  'mixed', 'stringdtype']
        else:
            raise ValueError('unknown case %r' % case)
        cluster = c.cluster(func, node_port, client_port, **kw)
        jobs = c.submit(cluster, [(a,) for a in args], ids=args)
        res = {'case': case}
        if case == 'setup_fail':
            res['marker'] = c.wait_until(lambda: os.path.exists(o['marker']), 20)
            res['statuses'] = [j.status for j in jobs]
            c.finish(res, cluster, close_timeout=3)
        c.collect(cluster, jobs, res, wait=40)
        if case == 'numpy':
            res['numpy'] = [describe_numpy(j.result) for j in jobs]
        c.finish(res, cluster)

    c.run(main, timeout=90)
