"""Run the test suite as N pytest processes side by side (`make test`), each one a disjoint share of
the tests (conftest.py's --shard), and report as one run: every share's output, then one exit status.

    python tests/shards.py [pytest arguments]          # N = SHARDS, else the CPU count, at most 4

Why: most tests are one-threaded (bit-reproducible CPU kernels need a fixed thread count), so one
pytest process leaves all but one core idle. Each share runs with OMP_NUM_THREADS=1.
"""
import os
import subprocess
import sys
import tempfile
import time


def main(argv):
    n = int(os.environ.get('SHARDS') or min(4, os.cpu_count() or 1))
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    start = time.monotonic()
    runs = []
    for k in range(n):
        out = tempfile.TemporaryFile(mode='w+')
        cmd = [sys.executable, '-m', 'pytest', '-p', 'no:cacheprovider', f'--shard={k}/{n}', *argv]
        runs.append((k, out, subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)))
    codes = []
    for k, out, proc in runs:
        codes.append(proc.wait())
        out.seek(0)
        print(f'===== share {k + 1} of {n} (exit status {codes[-1]}) =====\n{out.read()}', flush=True)
    failed = [k + 1 for k, code in enumerate(codes) if code != 0]
    print(f'===== {n} shares in {time.monotonic() - start:.0f} s: '
          f'{"all passed" if not failed else "share " + ", ".join(map(str, failed)) + " failed"} =====')
    return next((code for code in codes if code != 0), 0)


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
