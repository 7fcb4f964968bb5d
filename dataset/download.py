"""Downloads of CIFAR-10/100 and SVHN, as the original's `download=True` did through torchvision.

The URLs and md5 sums are torchvision's (the data set classes' `url`, `filename`, `tgz_md5`,
`split_list`). torchvision's own `download_url` writes straight to the final file name and leaves
a corrupt or interrupted download there; here a file is written under a temporary name in the same
folder, checked against its md5 and only then renamed, and an archive is unpacked the same way, so
a file under its final name is always whole.
"""
import http.client
import os
import shutil
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
import zlib

from torchvision.datasets.utils import calculate_md5, check_integrity
from tqdm import tqdm

from errors import UserError
from fileio import atomic_path

TIMEOUT_S = 60  # per connect and per read: a stalled server ends the run instead of hanging it
CHUNK = 1 << 20
NETWORK_ERRORS = (OSError, http.client.HTTPException)  # URLError, HTTPError and timeouts are OSErrors


def _reason(e):
    # A plain URLError wraps the socket error; an HTTPError's own text carries the status code.
    if isinstance(e, urllib.error.URLError) and not isinstance(e, urllib.error.HTTPError):
        return e.reason
    return e


def fetch(url, folder, filename, md5):
    """`folder/filename`, downloaded from `url` unless a copy with this md5 is already there."""
    path = os.path.join(folder, filename)
    if check_integrity(path, md5):
        return path
    by_hand = f"download it yourself and put it into {os.path.abspath(folder)}"
    try:
        response = urllib.request.urlopen(url, timeout=TIMEOUT_S)
    except NETWORK_ERRORS as e:
        raise UserError(f"could not download {filename} from {url} ({_reason(e)}); {by_hand}") from None
    with response:
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create folder {folder}: {e.strerror}") from None
        print(f"Downloading {url} to {path}", flush=True)
        with atomic_path(path) as tmp:
            try:
                _copy(response, tmp, filename)
            except NETWORK_ERRORS as e:
                raise UserError(f"could not download {filename} from {url} ({_reason(e)}); {by_hand}") from None
            got = calculate_md5(tmp)
            if got != md5:
                raise UserError(f"the download of {filename} from {url} fails its md5 check (got {got}, "
                                f"expected {md5}), so it was deleted and {path} left as it was; run again "
                                f"to retry, or {by_hand}")
    return path


def _copy(response, path, filename):
    size = int(response.headers.get('Content-Length') or 0) or None
    with open(path, 'wb') as f, tqdm(total=size, unit='B', unit_scale=True, desc=filename, file=sys.stderr,
                                      disable=None) as bar:  # disable=None: a bar on a terminal only
        while chunk := response.read(CHUNK):
            f.write(chunk)
            bar.update(len(chunk))


def fetch_and_extract(url, folder, filename, md5):
    """Download the archive (unless intact) and unpack it into `folder`, each file appearing under
    its final name only once whole. The archive is kept, as torchvision keeps it."""
    archive = fetch(url, folder, filename, md5)
    try:
        staging = tempfile.mkdtemp(prefix=f'.{filename}.', suffix='.unpack', dir=folder)
    except OSError as e:
        raise UserError(f"cannot write into folder {folder}: {e.strerror}") from None
    try:
        with tarfile.open(archive) as tar:
            tar.extractall(staging, filter='data')  # 'data': no absolute paths, links out or devices
        for parent, _, files in os.walk(staging):
            target = os.path.join(folder, os.path.relpath(parent, staging))
            os.makedirs(target, exist_ok=True)
            for name in files:
                os.replace(os.path.join(parent, name), os.path.join(target, name))
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise UserError(f"could not unpack {archive} ({e}); delete it and run again to download it anew") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
