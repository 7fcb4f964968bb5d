"""Run the test suite as N pytest processes side by side (`make test`) that share the tests out as they
go (conftest.py's --claims: each starts at its own N-th of the tests and runs the next test no other
has claimed), and report as one run: every share's output, then one exit status.

    python tests/shards.py [pytest arguments]          # N = SHARDS, else the CPU count, at most 4

Why: most tests are one-threaded (bit-reproducible CPU kernels need a fixed thread count), so one
pytest process leaves all but one core idle. Each share runs with OMP_NUM_THREADS=1. Claiming as they
go, rather than a fixed split, keeps the shares busy until the last test whatever the tests cost.
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
    claims = tempfile.TemporaryDirectory(prefix='claims.')
    for k in range(n):
        out = tempfile.TemporaryFile(mode='w+')
        cmd = [sys.executable, '-m', 'pytest', '-p', 'no:cacheprovider', f'--claims={claims.name}',
               f'--claims-from={k}/{n}', *argv]
        runs.append((k, out, subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)))
    codes = []
    for k, out, proc in runs:
        codes.append(proc.wait())
        out.seek(0)
        print(f'===== share {k + 1} of {n} (exit status {codes[-1]}) =====\n{out.read()}', flush=True)
    ran = len(os.listdir(claims.name))
    claims.cleanup()
    failed = [k + 1 for k, code in enumerate(codes) if code != 0]
    print(f'===== {n} shares, {ran} tests in {time.monotonic() - start:.0f} s: '
          f'{"all passed" if not failed else "share " + ", ".join(map(str, failed)) + " failed"} =====')
    return next((code for code in codes if code != 0), 0)


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
