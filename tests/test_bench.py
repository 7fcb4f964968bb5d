"""bench/epochs.py's phase recorder (bench/phases.py) on this repository's scripts: each phase it times is
a real call of the trainer's (a renamed function would otherwise leave a phase silently at zero)."""
import json
import os
import subprocess
import sys
import time

from fixtures import REPO


def test_phases_records_training_evaluation_and_writing_of_each_epoch(tmp_path):
    out = tmp_path / 'phases.json'
    launch = time.time()
    subprocess.run([sys.executable, os.path.join(REPO, 'bench', 'phases.py'), 'ours', REPO, 'train.py', str(out), '--',
                    '--dataset', 'digits', '--imb_factor', '0.1', '-a', 'resnet20', '--epochs', '1', '-b', '256',
                    '--seed', '0', '--root_log', str(tmp_path / 'log'), '--root_model', str(tmp_path / 'ckpt')],
                   check=True, capture_output=True, env={**os.environ, 'BENCH_LAUNCH': repr(launch),
                                                          'OMP_NUM_THREADS': '1'})
    record = json.loads(out.read_text())
    phases = [call[0] for call in record['calls']]
    # the epoch: train, evaluate, then the report (_log_eval) and the checkpoint (RunFolder.save)
    assert phases == ['training', 'evaluation', 'writing', 'writing']
    starts = [call[1] for call in record['calls']]
    assert launch < starts[0] and starts == sorted(starts) and record['exit'] >= record['calls'][-1][2]
    assert all(end >= start and cpu_end >= cpu_start for _, start, end, cpu_start, cpu_end in record['calls'])
