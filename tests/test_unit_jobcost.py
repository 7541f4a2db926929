"""bench/jobcost.py, the benchmark's breakdown of a tiny job's CPU: its
classes of perf call chains, and a short real run of each measurement
(the worker it drives is our real worker, so a change to the worker's
channel protocol that breaks the benchmark fails here first)."""

import json
import subprocess
import sys
from pathlib import Path

import driver  # noqa: F401  (puts the repository on sys.path)

BENCH = Path(__file__).resolve().parent.parent / 'bench'
sys.path.insert(0, str(BENCH))

import jobcost  # noqa: E402


def test_classify_by_call_chain():
    # innermost frame first, as perf script prints them
    assert jobcost.classify(['copy_page_range', 'dup_mmap', 'copy_process', '__libc_fork']) \
        == 'fork'
    assert jobcost.classify(['unmap_page_range', 'exit_mmap', 'do_exit', '_exit']) == 'exit'
    assert jobcost.classify(['copy_mc_enhanced_fast_string', 'wp_page_copy', 'do_wp_page',
                             'exc_page_fault', 'asm_exc_page_fault', '_PyType_Lookup']) \
        == 'COW fault'
    assert jobcost.classify(['next_uptodate_folio', 'filemap_map_pages',
                             'asm_exc_page_fault']) == 'file-page fault'
    assert jobcost.classify(['mas_walk', 'exc_page_fault', 'asm_exc_page_fault']) \
        == 'other fault'
    assert jobcost.classify(['tcp_sendmsg', 'do_syscall_64', 'entry_SYSCALL_64']) \
        == 'system call'
    assert jobcost.classify(['_PyEval_EvalFrameDefault', '[unknown]']) == 'user space'
    # a fault taken while exiting is the exit's
    assert jobcost.classify(['do_wp_page', 'asm_exc_page_fault', 'do_exit']) == 'exit'
    # compiler suffixes; a write to a private file page is a copy too
    assert jobcost.classify(['wp_page_copy.isra.0', 'handle_mm_fault']) == 'COW fault'
    assert jobcost.classify(['do_cow_fault', 'filemap_fault', 'handle_mm_fault']) \
        == 'COW fault'
    # an interrupt taken in user space is the kernel's, not the job's code
    assert jobcost.classify(['handle_softirqs', 'irq_exit_rcu', '_PyObject_Malloc'],
                            in_kernel=True) == 'other kernel'


PERF_SCRIPT = '''python 3.11   4702
\tffffffff815e36cd unmap_page_range ([kernel.kallsyms])
\tffffffff81589512 exit_mmap ([kernel.kallsyms])
\t          10ab59 _exit (/usr/lib/x86_64-linux-gnu/libc.so.6)

python 3.11   4703
\t          26f533 _PyFrame_Push (/usr/lib/libpython3.11.so.1.0)
\t    7feb1d56cc80 [unknown] ([unknown])

perf-exec 12
\tffffffff81000130 entry_SYSCALL_64_after_hwframe ([kernel.kallsyms])
'''


def test_parse_perf_script_takes_the_pid_from_the_end_and_the_place_from_the_first_frame():
    samples = jobcost.parse_perf_script(PERF_SCRIPT)
    assert [(comm, pid, kernel) for comm, pid, kernel, _ in samples] == [
        ('python 3.11', 4702, True), ('python 3.11', 4703, False), ('perf-exec', 12, True)]
    assert samples[0][3] == ['unmap_page_range', 'exit_mmap', '_exit']
    assert [jobcost.classify(st, kernel) for _, _, kernel, st in samples] == [
        'exit', 'user space', 'system call']


def run(*args):
    out = subprocess.run([sys.executable, str(BENCH / 'jobcost.py'),
                          '--repo', str(BENCH.parent)] + list(args),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=120)
    assert out.returncode == 0, out.stderr.decode()[-2000:]
    return [json.loads(line) for line in out.stdout.decode().splitlines()]


def test_drive_runs_real_jobs_through_one_worker():
    (result,) = run('--only', 'drive', '--jobs', '60')
    assert result['what'] == 'drive' and result['jobs'] == 60
    # every job was a fork: the job processes' faults are counted per job
    assert result['job_faults'] > 10
    assert result['worker_ms'] >= 0 and result['jobs_ms'] > 0
    assert result['total_ms'] == result['worker_ms'] + result['jobs_ms']


def test_floor_of_the_worker_image_is_larger_than_a_bare_interpreter():
    bare, image = run('--only', 'bare', '--forks', '40') + run('--only', 'floor',
                                                              '--forks', '40')
    assert bare['bare'] is True and image['bare'] is False
    assert image['anon_kb'] > bare['anon_kb'] + 2048     # dispynode + implicit modules
    assert image['child_faults'] > 0 and image['total_ms'] > 0
