"""The links of README.md and docs/*.md (issue 31, item 3): every relative link [text](path#anchor) names a file
or folder of the repository, and its anchor a heading of that file (GitHub's slugs) or an <a id=...>; the
README's layout table matches the tree (each path it names exists, each tracked top-level file
and folder has its row); the README stays a landing page of at most 400 lines."""
import os
import re
import subprocess

import pytest

from fixtures import REPO

PAGES = ['README.md', *sorted(os.path.join('docs', name) for name in os.listdir(os.path.join(REPO, 'docs'))
                              if name.endswith('.md'))]
README_MAX_LINES = 400


FENCED = re.compile(r'^ {0,3}```.*?^ {0,3}```[^\n]*$', flags=re.S | re.M)


def slug(heading):
    """GitHub's anchor of a heading: lower case, punctuation other than '-' and '_' dropped (backticks, dots, em
    dashes, colons, brackets), each space a '-'. A link in the heading counts by its text."""
    text = re.sub(r'\[([^\]]*)\]\([^)]*\)', r'\1', heading.strip()).lower()
    return re.sub(r'[^\w\- ]', '', text).replace(' ', '-')


def anchors(path):
    """The anchors of a markdown file: its headings' slugs (a repeated one gets -1, -2, ... as on GitHub) and the
    ids of its <a id=...> / <a name=...> tags."""
    with open(path, encoding='utf-8') as f:
        text = f.read()
    found, seen = set(), {}
    for heading in re.findall(r'^#{1,6} +(.+?) *#* *$', FENCED.sub('', text),
                              flags=re.M):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        found.add(base if n == 0 else f'{base}-{n}')
    found.update(re.findall(r'<a\s+(?:id|name)="([^"]+)"', text))
    return found


def links(path):
    """The [text](target) links of a markdown file, outside code; text may run over lines."""
    with open(path, encoding='utf-8') as f:
        text = FENCED.sub('', f.read())
    text = re.sub(r'`[^`\n]*`', 'CODE', text)
    return re.findall(r'\[[^\]]*\]\(([^)\s]+)\)', text)


def broken_links(path):
    """Each relative link of the file at `path` that names no existing file, or an anchor its target lacks."""
    broken = []
    for target in links(path):
        if re.match(r'[a-z][a-z0-9+.-]*:', target):  # http:, https:, mailto:
            continue
        file, _, anchor = target.partition('#')
        resolved = os.path.normpath(os.path.join(os.path.dirname(path), file)) if file else path
        if not os.path.exists(resolved):
            broken.append((target, 'no such file'))
        elif anchor and (not resolved.endswith('.md') or anchor not in anchors(resolved)):
            broken.append((target, 'no such heading'))
    return broken


def layout_paths():
    """The paths of the README's "Project layout" table: every `code` span of its first column."""
    with open(os.path.join(REPO, 'README.md'), encoding='utf-8') as f:
        section = f.read().split('\n## Project layout\n', 1)[1].split('\n## ', 1)[0]
    rows = [line for line in section.splitlines() if line.startswith('|')][2:]  # after the header and its rule
    return [path for row in rows for path in re.findall(r'`([^`]+)`', row.split('|')[1])]


@pytest.mark.parametrize('page', PAGES)
def test_every_relative_link_resolves(page):
    assert links(os.path.join(REPO, page)) or page != 'README.md'
    assert broken_links(os.path.join(REPO, page)) == []


def test_the_readme_links_every_docs_page():
    """A page no one links to is a page no one finds: the README links each docs page, or the index that does."""
    linked = {os.path.normpath(os.path.join(REPO, t.partition('#')[0])) for t in links(os.path.join(REPO, 'README.md'))}
    index = {os.path.normpath(os.path.join(REPO, 'docs', t.partition('#')[0]))
             for t in links(os.path.join(REPO, 'docs', 'README.md'))}
    assert os.path.join(REPO, 'docs', 'README.md') in linked
    assert [p for p in PAGES if os.path.join(REPO, p) not in linked | index and p != 'README.md'] == []


def top_level_entries():
    """The repository's tracked top-level files and folders (a folder with a trailing '/'), hidden ones and the
    README itself left out."""
    files = subprocess.run(['git', 'ls-files'], cwd=REPO, capture_output=True, text=True, check=True).stdout
    entries = {path.split('/')[0] + ('/' if '/' in path else '') for path in files.splitlines()}
    return {entry for entry in entries if not entry.startswith('.')} - {'README.md'}


def test_the_layout_table_matches_the_tree():
    """Every path the table names exists, and every tracked top-level file and folder has its row."""
    paths = layout_paths()
    assert {'train.py', 'dataset/', 'tests/'} <= set(paths)
    missing = [p for p in paths if not os.path.exists(os.path.join(REPO, p))]
    unlisted = sorted(top_level_entries() - set(paths))
    assert (missing, unlisted) == ([], []), f'named but missing: {missing}; tracked but not in the table: {unlisted}'


def test_readme_is_a_landing_page():
    with open(os.path.join(REPO, 'README.md'), encoding='utf-8') as f:
        n = len(f.read().splitlines())
    assert n <= README_MAX_LINES, f'README.md has {n} lines; move reference to a docs/ page'


def test_slugs_as_github_makes_them():
    """Anchors GitHub rendered for headings of this project's pages, written out."""
    assert slug('SLURM: `--launcher slurm`') == 'slurm---launcher-slurm'
    assert slug('`jpeg_loader.py` — the imagenet_inat JPEG loader alone') == \
        'jpeg_loaderpy--the-imagenet_inat-jpeg-loader-alone'
    assert slug('The miniature: `--table digits-mini`') == 'the-miniature---table-digits-mini'
    assert slug('What `gen_pseudolabels.py` does and writes') == 'what-gen_pseudolabelspy-does-and-writes'
    assert slug('Accuracy parity') == 'accuracy-parity'


def test_a_broken_link_or_anchor_is_found(tmp_path):
    """The checker on a page with good and bad links: a missing file, a missing heading, a link split over
    lines, and what it must leave alone (a URL, code, a repeated heading's second anchor, an <a id>)."""
    (tmp_path / 'docs').mkdir()
    (tmp_path / 'other.md').write_text('# Other page\n\n## Flags & defaults\n\n## Flags & defaults\n\n'
                                       '- <a id="kept"></a>**kept**\n')
    page = tmp_path / 'docs' / 'page.md'
    page.write_text('# Page\n\nSee [the other\npage](../other.md), [flags](../other.md#flags--defaults),\n'
                    '[again](../other.md#flags--defaults-1), [kept](../other.md#kept), [here](#page),\n'
                    '[web](https://example.com/x.md#y), `[code](nothing.md)`,\n'
                    '```bash\necho [block](nothing.md)\n```\n'
                    '[gone](../missing.md), [bad anchor](../other.md#flags), [bad here](#nowhere),\n'
                    '[split\nover lines](../missing2.md#x).\n')
    assert broken_links(str(page)) == [('../missing.md', 'no such file'), ('../other.md#flags', 'no such heading'),
                                       ('#nowhere', 'no such heading'), ('../missing2.md#x', 'no such file')]
