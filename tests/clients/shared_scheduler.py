"""Run the legacy dispyscheduler (``python -m dispy.dispyscheduler``) with
its broadcast sockets bound to 127.0.0.1 (see recovery_common).

argv: the dispyscheduler options, passed through unchanged.
"""

if __name__ == '__main__':
    import runpy
    import sys
    import recovery_common
    recovery_common.bind_broadcasts()
    sys.argv[0] = 'dispyscheduler'
    runpy.run_module('dispy.dispyscheduler', run_name='__main__', alter_sys=True)
