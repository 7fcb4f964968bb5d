import os
import pickle

import numpy as np
import pytest

from errors import UserError
from fileio import RunLock, atomic_pickle_dump, atomic_write_text, safe_pickle_load


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, 'w'))


def test_safe_pickle_round_trip(tmp_path):
    obj = {'data': np.arange(12, dtype=np.uint8).reshape(2, 2, 3), 'extrapolated_targets': np.array([1, 2]),
           'name': 'x', 'nested': [1, (2, 3.5)]}
    path = tmp_path / 'a.pickle'
    atomic_pickle_dump(obj, path)
    back = safe_pickle_load(str(path))
    assert np.array_equal(back['data'], obj['data']) and back['nested'] == [1, (2, 3.5)]


def test_safe_pickle_refuses_code(tmp_path):
    marker = tmp_path / 'pwned'
    path = tmp_path / 'evil.pickle'
    path.write_bytes(pickle.dumps({'data': _Evil(str(marker))}))
    with pytest.raises(UserError, match='refusing'):
        safe_pickle_load(str(path), what='TinyImages selection')
    assert not marker.exists()


def test_safe_pickle_missing_and_truncated(tmp_path):
    with pytest.raises(UserError, match='not found'):
        safe_pickle_load(str(tmp_path / 'nope.pickle'), what='pseudo-label file', hint='run gen_pseudolabels.py')
    path = tmp_path / 'cut.pickle'
    path.write_bytes(pickle.dumps({'a': np.zeros(100)})[:50])
    with pytest.raises(UserError, match='corrupt'):
        safe_pickle_load(str(path))


def test_atomic_write_leaves_no_temp_files(tmp_path):
    path = tmp_path / 'out.txt'
    atomic_write_text(str(path), 'one')
    atomic_write_text(str(path), 'two')
    assert path.read_text() == 'two'
    assert os.listdir(tmp_path) == ['out.txt']


def test_atomic_write_failure_keeps_old_file(tmp_path):
    from fileio import atomic_path
    path = tmp_path / 'out.txt'
    path.write_text('old')
    with pytest.raises(RuntimeError):
        with atomic_path(str(path)) as tmp:
            with open(tmp, 'w') as f:
                f.write('half')
            raise RuntimeError('killed')
    assert path.read_text() == 'old' and os.listdir(tmp_path) == ['out.txt']


def test_run_lock_refuses_live_owner_and_takes_over_stale(tmp_path):
    first = RunLock(str(tmp_path)).acquire()
    with pytest.raises(UserError, match=f'process {os.getpid()}'):
        RunLock(str(tmp_path)).acquire()
    first.release()
    # a lock left by a dead process is taken over
    import socket
    (tmp_path / '.lock').write_text(f"{socket.gethostname()} 999999999")
    lock = RunLock(str(tmp_path)).acquire()
    assert lock.held
    lock.release()


# ------------------------------------------------------------------ file modes (was in test_pinned.py)

def test_atomic_writes_get_the_mode_of_any_new_file(tmp_path):
    from fileio import atomic_write_bytes
    umask = os.umask(0)
    os.umask(umask)
    atomic_write_bytes(str(tmp_path / 'ckpt.pth.tar'), b'x')
    with open(tmp_path / 'plain', 'wb') as f:  # what the original's torch.save(state, filename) gets
        f.write(b'x')
    assert os.stat(tmp_path / 'ckpt.pth.tar').st_mode == os.stat(tmp_path / 'plain').st_mode
