"""The imports run one way: programs import libraries, libraries import pure modules, nothing imports back up.

The graph is read from the source with `ast` (every import, at module level and inside functions), so an import
hidden in a function to dodge a cycle counts as much as one at the top.
"""

import ast
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ('trainer', 'cxr_tfds', 'benchmarks')
# The programs: modules with absl flags or a main, run as `python -m NAME`. No other module may import one.
PROGRAMS = {
    'benchmarks.__main__', 'benchmarks.serve', 'benchmarks.tflite', 'cxr_tfds.build',
    'cxr_tfds.chest_xray_pneumonia.dummy_data.make_dummy_data', 'trainer.evaluate', 'trainer.export.__main__',
    'trainer.main', 'trainer.predict.__main__', 'trainer.serve.__main__', 'trainer.shift.__main__',
}
# The programs' edge (flag parsing, the one-line errors): imported by programs only.
PROGRAM_EDGE = {'trainer.cli'}
# What trainer.metrics must never pull in, even through another module.
FRAMEWORKS = ('tensorflow', 'keras', 'tf_keras', 'tensorflow_datasets')


def _module_name(path: pathlib.Path) -> str:
  parts = list(path.relative_to(REPO).with_suffix('').parts)
  if parts[-1] == '__init__':
    parts.pop()
  return '.'.join(parts)


def _sources() -> dict[str, ast.Module]:
  return {_module_name(path): ast.parse(path.read_text(), str(path))
          for package in PACKAGES for path in sorted((REPO / package).rglob('*.py'))}


def _imported(name: str, tree: ast.Module, modules) -> tuple[set[str], set[str]]:
  """(project modules `name` imports, top-level names of everything it imports), from imports anywhere in it."""
  package = name if name in _packages(modules) else name.rpartition('.')[0]
  project, top = set(), set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      targets = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ''
      if node.level:
        anchor = package.split('.')[:len(package.split('.')) - node.level + 1]
        base = '.'.join(anchor + ([base] if base else []))
      # `from trainer import export` imports the module trainer.export; `from x import function` imports x.
      targets = [f'{base}.{alias.name}' if f'{base}.{alias.name}' in modules else base for alias in node.names]
    else:
      continue
    for target in targets:
      top.add(target.split('.')[0])
      while target and target not in modules:  # `import a.b.c` of a non-module attribute: its module.
        target = target.rpartition('.')[0]
      if target and target != name:
        project.add(target)
  return project, top


def _packages(modules) -> set[str]:
  return {m.rpartition('.')[0] for m in modules if '.' in m}


def import_graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
  """({module: project modules it imports}, {module: top-level names of all it imports}) of the project."""
  sources = _sources()
  graph, tops = {}, {}
  for name, tree in sources.items():
    graph[name], tops[name] = _imported(name, tree, sources)
  return graph, tops


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """A cycle of `graph` as [a, b, ..., a], or None. Depth-first, so a cycle through any number of modules is found."""
  done, path, on_path = set(), [], set()

  def visit(node):
    path.append(node)
    on_path.add(node)
    for child in sorted(graph.get(node, ())):
      if child in on_path:
        return path[path.index(child):] + [child]
      if child not in done and (cycle := visit(child)):
        return cycle
    on_path.discard(path.pop())
    done.add(node)
    return None

  for node in sorted(graph):
    if node not in done and (cycle := visit(node)):
      return cycle
  return None


def _reachable(graph, start) -> set[str]:
  seen, todo = set(), [start]
  while todo:
    node = todo.pop()
    if node not in seen:
      seen.add(node)
      todo.extend(graph.get(node, ()))
  return seen


def test_the_cycle_finder_finds_direct_and_indirect_cycles():
  assert find_cycle({'a': {'b'}, 'b': {'c'}, 'c': set()}) is None
  assert find_cycle({'a': {'b'}, 'b': {'a'}}) == ['a', 'b', 'a']
  assert find_cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}, 'd': {'a'}}) == ['a', 'b', 'c', 'a']
  # A diamond is not a cycle.
  assert find_cycle({'a': {'b', 'c'}, 'b': {'d'}, 'c': {'d'}, 'd': set()}) is None


def test_the_graph_sees_imports_inside_functions():
  tree = ast.parse('import os\n\ndef f():\n  from trainer import export  # hidden\n  import trainer.runs\n')
  project, top = _imported('trainer.report', tree, {'trainer', 'trainer.export', 'trainer.runs', 'trainer.report'})
  assert project == {'trainer.export', 'trainer.runs'} and top == {'os', 'trainer'}


def test_no_module_imports_one_that_imports_it_back():
  graph, _ = import_graph()
  assert {'trainer.metrics', 'trainer.report', 'trainer.runs', 'trainer.files', 'trainer.errors'} <= set(graph)
  assert find_cycle(graph) is None, ' -> '.join(find_cycle(graph))


def test_the_programs_are_the_modules_with_flags_or_a_main():
  found = set()
  for name, tree in _sources().items():
    for node in tree.body:
      defines_flag = (isinstance(node, ast.Expr) and isinstance(node.value, ast.Call)
                      and isinstance(node.value.func, ast.Attribute) and node.value.func.attr.startswith('DEFINE_'))
      is_main = isinstance(node, ast.FunctionDef) and node.name == 'main'
      if defines_flag or is_main:
        found.add(name)
  assert found == PROGRAMS


def test_no_library_imports_a_program_or_the_programs_edge():
  graph, _ = import_graph()
  for name, imports in graph.items():
    if name not in PROGRAMS | PROGRAM_EDGE:
      assert not imports & (PROGRAMS | PROGRAM_EDGE), f'{name} imports {imports & (PROGRAMS | PROGRAM_EDGE)}'


def test_metrics_imports_no_framework_even_indirectly():
  graph, tops = import_graph()
  for name in _reachable(graph, 'trainer.metrics'):
    assert not tops[name] & set(FRAMEWORKS), f'{name} (imported by trainer.metrics) imports {tops[name]}'
  # And at run time, through whatever the package's __init__ does.
  code = ('import sys, trainer.metrics; loaded = [m for m in %r if m in sys.modules]; '
          'assert not loaded, loaded' % (FRAMEWORKS,))
  done = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True, check=False)
  assert done.returncode == 0, done.stderr
