"""The project's layers, read from its source (issue 31, items 2 and 4).

The ground (errors, fileio, utils, dist, checkpoint, losses, signals, engine, schedules, models/, dataset/)
imports only the ground: never trainer/, a script, cli / rerun, or a method package (moco/, imagenet_inat/,
repro/, ltssl/). Every import counts, also one inside a function (a lazy import still makes the ground depend
on the floor above). And no module outside tests/ is over 600 lines.
"""
import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GROUND = ('errors', 'fileio', 'utils', 'dist', 'checkpoint', 'losses', 'signals', 'engine', 'schedules', 'models',
          'dataset')
MAX_LINES = 600

# Ground modules that still import from above, each with the change that removes it. An entry whose module no
# longer does fails the test, so the list cannot outlive its reason.
KNOWN = {
    'dataset/folder.py': {'moco', 'imagenet_inat'},  # issue 31 item 2: moco/loader.py and imagenet_inat/data.py's
                                                     # split files, transforms and statistics move into dataset/
}


def project_modules(root=ROOT):
    """The top-level names under which the repository's code is imported: its *.py files and packages."""
    names = set()
    for entry in os.listdir(root):
        path = os.path.join(root, entry)
        if entry.endswith('.py'):
            names.add(entry[:-3])
        elif os.path.isdir(path) and not entry.startswith('.') and any(
                f.endswith('.py') for f in os.listdir(path)):
            names.add(entry)
    return names


def python_files(*parts, root=ROOT):
    """Every .py file under root/parts (a file itself if it is one), as paths relative to root."""
    top = os.path.join(root, *parts)
    if os.path.isfile(top):
        return [os.path.relpath(top, root)] if top.endswith('.py') else []
    found = []
    for folder, dirs, files in os.walk(top):
        dirs[:] = sorted(d for d in dirs if not d.startswith('.') and d != '__pycache__')
        found += [os.path.relpath(os.path.join(folder, f), root) for f in sorted(files) if f.endswith('.py')]
    return found


def imported_top_levels(path, root=ROOT):
    """{top-level module name: first line} of every absolute import in the file, at any depth of its code."""
    with open(os.path.join(root, path)) as f:
        tree = ast.parse(f.read(), path)
    found = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [node.module]
        else:  # a relative import stays inside its own package
            continue
        for name in names:
            found.setdefault(name.split('.')[0], node.lineno)
    return found


def ground_files(root=ROOT):
    return [p for g in GROUND for p in python_files(g if os.path.isdir(os.path.join(root, g)) else g + '.py',
                                                     root=root)]


def upward_imports(root=ROOT):
    """{ground file: {module above the ground it imports: line}}."""
    above = project_modules(root) - set(GROUND)
    found = {}
    for path in ground_files(root):
        bad = {m: line for m, line in imported_top_levels(path, root).items() if m in above}
        if bad:
            found[path] = bad
    return found


def test_the_ground_is_all_there():
    """A renamed or moved ground module would leave the import test below checking nothing."""
    files = ground_files()
    for name in GROUND:
        assert any(p == name + '.py' or p.startswith(name + os.sep) for p in files), name
    assert {'trainer', 'train', 'pretrain_moco', 'cli', 'rerun', 'moco', 'imagenet_inat', 'repro', 'ltssl'} <= \
        project_modules() - set(GROUND)


def test_the_ground_imports_nothing_above_it():
    found = upward_imports()
    unexpected = {path: {m: line for m, line in bad.items() if m not in KNOWN.get(path, ())}
                  for path, bad in found.items()}
    unexpected = {path: bad for path, bad in unexpected.items() if bad}
    assert not unexpected, '; '.join(f"{path} line {line} imports {m}" for path, bad in unexpected.items()
                                     for m, line in bad.items())
    stale = {path: sorted(set(mods) - set(found.get(path, {}))) for path, mods in KNOWN.items()}
    assert not any(stale.values()), f"KNOWN lists imports that are gone, remove them: {stale}"


@pytest.mark.parametrize('code, caught', [
    ('import trainer\n', {'trainer'}),
    ('def f():\n    from trainer.reports import read_test_log\n', {'trainer'}),  # lazy, from a submodule
    ('import numpy, train_semi as ts\n', {'train_semi'}),
    ('from ltssl.method import SSLMethod\n', {'ltssl'}),
    ('from . import augment\nfrom dataset.samplers import ShuffleSampler\nimport torch\n', set()),
])
def test_an_upward_import_is_found(tmp_path, code, caught):
    """The checker itself, on a copy of the layout with one planted import in a ground module."""
    for name in ('errors.py', 'trainer/__init__.py', 'train_semi.py', 'ltssl/method.py', 'dataset/__init__.py'):
        os.makedirs(tmp_path / os.path.dirname(name), exist_ok=True)
        (tmp_path / name).write_text('')
    (tmp_path / 'dataset' / 'planted.py').write_text(code)
    assert set(upward_imports(str(tmp_path)).get(os.path.join('dataset', 'planted.py'), {})) == caught


def test_no_module_over_600_lines():
    """Short files a newcomer reads top to bottom (the developers' guide)."""
    long = {}
    for entry in sorted(os.listdir(ROOT)):
        if entry != 'tests' and not entry.startswith('.'):
            for path in python_files(entry):
                with open(os.path.join(ROOT, path)) as f:
                    n = sum(1 for _ in f)
                if n > MAX_LINES:
                    long[path] = n
    assert not long, f"over {MAX_LINES} lines: {long}"
