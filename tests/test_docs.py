"""README and docs/: every relative link and every repository path they name exists; README stays a front page."""

import pathlib
import re

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
DOCUMENTS = ['README.md', *sorted(str(path.relative_to(REPO)) for path in (REPO / 'docs').glob('*.md'))]
# A path in backticks is taken for one of the repository's when it starts with a top-level folder of it (so
# `runs/...`, `~/...` and `MODEL_DIR/...`, which a user makes, are not) or is a file at the top level.
TOP_LEVEL = sorted(path.name for path in REPO.iterdir() if not path.name.startswith('.'))
_LINK = re.compile(r'\]\(([^)\s]+)\)')
_CODE = re.compile(r'```[a-z]*\n(.*?)```|`([^`\n]+)`', flags=re.S)


def _relative_links(text: str) -> list[str]:
  return [target for target in _LINK.findall(text) if not re.match(r'[a-z]+:|#', target)]


def _named_paths(text: str) -> list[str]:
  """The repository paths named in code, inline or fenced: `trainer/models.py`, `launch/recipe.sh`, `BUILD.md`..."""
  found = []
  code = ' '.join(block or span for block, span in _CODE.findall(text))
  for token in re.split(r'[\s"\'()]+', code):
    token = token.rstrip('.,:;')
    if '/' in token and token.split('/')[0] in TOP_LEVEL and not re.search(r'[*{}<>=$]|\.\.\.', token):
      found.append(token.rstrip('/'))
    elif token in TOP_LEVEL:
      found.append(token)
  return found


def _anchors(path: pathlib.Path) -> set[str]:
  """GitHub's anchors of a Markdown file's headings."""
  headings = re.findall(r'^#+ (.+)$', path.read_text(), flags=re.M)
  return {re.sub(r'[^\w\- ]', '', heading.lower()).replace(' ', '-') for heading in headings}


def test_the_helpers_find_links_and_paths():
  text = ('See [a](docs/training.md), [b](https://example.com), [c](#top), `trainer/models.py`, `runs/x/model.keras`, '
          '`launch/`, `BUILD.md`, `MODEL_DIR/eval_test/`, `trainer/*.py`, `kubectl apply -f launch/k.yaml`.\n'
          '```sh\nlaunch/recipe.sh ~/cxr_manual runs/recipe\n```\n')
  assert _relative_links(text) == ['docs/training.md']
  assert sorted(_named_paths(text)) == ['BUILD.md', 'launch', 'launch/k.yaml', 'launch/recipe.sh', 'trainer/models.py']


@pytest.mark.parametrize('name', DOCUMENTS)
def test_every_relative_link_resolves(name):
  document = REPO / name
  for target in _relative_links(document.read_text()):
    file, _, anchor = target.partition('#')
    path = (document.parent / file).resolve()
    assert path.exists(), f'{name} links to {target}, which does not exist'
    if anchor and path.suffix == '.md':
      assert anchor in _anchors(path), f'{name} links to {target}: {file} has no heading #{anchor}'


@pytest.mark.parametrize('name', DOCUMENTS)
def test_every_repository_path_named_exists(name):
  for path in _named_paths((REPO / name).read_text()):
    assert (REPO / path).exists(), f'{name} names {path}, which does not exist'


def test_readme_is_a_front_page():
  readme = (REPO / 'README.md').read_text()
  assert len(readme.encode()) <= 12_000
  assert 'not a medical device' in readme
  assert len({link for link in _relative_links(readme) if link.startswith('docs/')}) >= 4


@pytest.mark.parametrize('name', DOCUMENTS)
def test_no_sentence_talks_about_the_development_machine(name):
  text = (REPO / name).read_text().lower()
  for phrase in ('this machine', 'this 2-core', "this project's avx", 'the development machine', 'not run here'):
    assert phrase not in text, f'{name} says "{phrase}"'
