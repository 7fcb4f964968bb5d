"""The layers a newcomer reads (issue 31): dataset/ is the home of all data, the ground imports nothing from the
floors above it, every file of the project opens with a comment saying what it holds, and no module is over 600
lines.

These read the source (ast, text), so they see lazy imports inside functions too, and run no project code.
"""
import ast
import os
import subprocess

from fixtures import REPO

# The ground: what every script and method builds on. It may import itself and third-party packages only.
GROUND_MODULES = ('errors', 'fileio', 'utils', 'dist', 'checkpoint', 'losses', 'engine', 'signals', 'schedules')
GROUND_PACKAGES = ('models', 'dataset')
GROUND = GROUND_MODULES + GROUND_PACKAGES


def project_files():
    """Paths (relative to the repository) of the project's files outside tests/: git's list where there is one, so
    that a user's copies (the original's imagenet_inat/data/*.py beside its split files) are not taken for ours."""
    try:
        out = subprocess.run(['git', 'ls-files', '-z'], cwd=REPO, capture_output=True, text=True, check=True).stdout
        files = out.split('\0')
    except (OSError, subprocess.CalledProcessError):  # an unpacked release: walk the tree instead
        files = []
        for folder, dirs, names in os.walk(REPO):
            dirs[:] = [d for d in dirs if not d.startswith('.') and d not in ('__pycache__', 'data', 'log', 'checkpoint',
                                                                            'runs', 'results')]
            files += [os.path.relpath(os.path.join(folder, n), REPO) for n in names if not n.startswith('.')]
    return sorted(f for f in files if f and not f.startswith('tests/') and os.path.isfile(os.path.join(REPO, f)))


def ground_files():
    files = [f'{name}.py' for name in GROUND_MODULES]
    for package in GROUND_PACKAGES:  # sub-packages too: a dataset/<name>/ added later is ground as well
        for folder, dirs, names in os.walk(os.path.join(REPO, package)):
            dirs[:] = sorted(d for d in dirs if d != '__pycache__')
            files += sorted(os.path.relpath(os.path.join(folder, n), REPO) for n in names if n.endswith('.py'))
    return files


def parse(path):
    with open(os.path.join(REPO, path), encoding='utf-8') as f:
        return ast.parse(f.read(), path)


def imported_modules(path):
    """(line, dotted module name) of every import in the file at `path` (relative to the repository, or absolute)
    at any depth, lazy imports inside functions included, and of every import_module / __import__ of a literal."""
    package = os.path.dirname(path).replace('/', '.')
    found = []
    for node in ast.walk(parse(path)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            # a relative import stays inside its own package
            found.append((node.lineno, (node.module or '') if node.level == 0 else package))
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and ast.unparse(node.func) in ('importlib.import_module', 'import_module', '__import__')):
            found.append((node.lineno, node.args[0].value))
    return found


def local_names():
    """The repository's top-level modules and folders: what an import could reach above the ground."""
    return {entry[:-3] if entry.endswith('.py') else entry for entry in os.listdir(REPO)
            if entry.endswith('.py') or (os.path.isdir(os.path.join(REPO, entry)) and not entry.startswith('.'))}


def upward_imports(path, local):
    """'path:line imports X' for each import in `path` of a project module that is not the ground."""
    return [f"{path}:{line} imports {module}" for line, module in imported_modules(path)
            if module.split('.')[0] in local and module.split('.')[0] not in GROUND]


def test_the_ground_imports_nothing_from_above():
    """errors, fileio, utils, dist, checkpoint, losses, engine, signals, schedules, models/ and dataset/ import
    neither the scripts nor trainer nor a method package (moco/, imagenet_inat/, repro/, ltssl/), not even inside a
    function."""
    files = ground_files()
    assert {'dataset/folder.py', 'dataset/splitfile.py', 'dataset/statistics.py', 'models/resnet.py'} <= set(files)
    local = local_names()
    assert {'trainer', 'train', 'cli', 'pretrain_moco', 'moco', 'imagenet_inat', 'repro', 'ltssl', 'tools'} <= local
    assert [line for path in files for line in upward_imports(path, local)] == []


def test_the_import_reader_sees_lazy_and_literal_imports(tmp_path):
    probe = tmp_path / 'probe.py'
    probe.write_text('"""A probe."""\nimport os\nimport dataset.splitfile\nfrom errors import UserError\n\n\n'
                     'def f():\n    from moco.loader import SplitFileDataset\n    import trainer as t\n'
                     '    return importlib.import_module("imagenet_inat.data")\n')
    assert upward_imports(str(probe), local_names()) == [
        f"{probe}:8 imports moco.loader", f"{probe}:9 imports trainer", f"{probe}:10 imports imagenet_inat.data"]


def test_data_sets_statistics_and_transforms_live_in_dataset():
    """Outside dataset/: no torch Dataset class, no RGB statistic (three floats in (0, 1)), no torchvision
    transforms (bench/ times them); moco/ and imagenet_inat/ take theirs from dataset/."""
    found = []
    for path in project_files():
        if not path.endswith('.py') or path.startswith('dataset/'):
            continue
        for node in ast.walk(parse(path)):
            if isinstance(node, ast.ClassDef) and any('Dataset' in ast.unparse(base) for base in node.bases):
                found.append(f"{path}:{node.lineno}: data set {node.name}")
            elif (isinstance(node, ast.Tuple) and len(node.elts) == 3
                  and all(isinstance(e, ast.Constant) and isinstance(e.value, float) and 0 < e.value < 1
                          for e in node.elts)):
                found.append(f"{path}:{node.lineno}: statistic {ast.unparse(node)}")
        found += [f"{path}:{line}: imports {module}" for line, module in imported_modules(path)
                  if module.startswith('torchvision.transforms') and not path.startswith('bench/')]
        found += [f"{path}:{line}: from torchvision import transforms" for line, module in imported_modules(path)
                  if module == 'torchvision' and not path.startswith('bench/')
                  and 'transforms' in open(os.path.join(REPO, path), encoding='utf-8').read().splitlines()[line - 1]]
    assert found == []


def opening_comment(path):
    """The text a file opens with: a .py file's docstring or leading comment, another's first comment line after
    any #! line; None if it opens with anything else."""
    with open(os.path.join(REPO, path), encoding='utf-8') as f:
        text = f.read()
    if path.endswith('.py'):
        docstring = ast.get_docstring(ast.parse(text, path))
        if docstring is not None:
            return docstring
    lines = [line for line in text.splitlines() if line.strip() and not line.startswith('#!')]
    return lines[0].lstrip('#').strip() if lines and lines[0].startswith('#') else None


# Files whose format has comments: each must open with one (csv, md, png and the like do not).
COMMENTED = ('.py', '.sh', '.yaml', '.yml', '.txt', '.toml', '.cfg')
NOT_A_DESCRIPTION = ('noqa', '-*-', 'type:', 'pylint', 'flake8', 'fmt:')


def test_every_file_opens_with_a_comment_saying_what_it_holds():
    checked, missing = 0, []
    for path in project_files():
        name = os.path.basename(path)
        with open(os.path.join(REPO, path), 'rb') as f:
            shebang = f.read(2) == b'#!'
        if not (path.endswith(COMMENTED) or name in ('Makefile', '.gitignore') or shebang):
            continue
        checked += 1
        text = opening_comment(path)
        if text is None or len(text.split()) < 4 or text.startswith(NOT_A_DESCRIPTION):
            missing.append(f"{path}: {text!r}")
    assert checked > 80  # every script, module, config and build file of the project, not an empty list
    assert missing == []


def test_no_module_over_600_lines():
    """Short files a newcomer reads top to bottom (the developers' guide): trainer/ is split by job for this."""
    long = {}
    for path in project_files():
        if path.endswith('.py'):
            with open(os.path.join(REPO, path), encoding='utf-8') as f:
                lines = sum(1 for _ in f)
            if lines > 600:
                long[path] = lines
    assert long == {}
