"""The package's import graph, read with `ast` (imports inside functions included): no module imports itself
back through others, and the arrows point down the layers, never from a lower package up into the recipes."""

import ast

from tests.conftest import REPO

PACKAGE = REPO / "dsee_dist"
# Every package below the recipes (the runs and commands); only the recipes and the entry modules
# (cli.py, train.py, generate.py, __main__.py) may import dsee_dist.recipes.
LOWER_LAYERS = ("utils", "config", "models", "data", "dsee", "engine", "eval", "pruning")


def _module_name(path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict:
    return {_module_name(path): path for path in PACKAGE.rglob("*.py")}


def _imports(name: str, path, modules: dict) -> set[str]:
    """The dsee_dist modules `name` imports (the module itself, or its package where a name is not a module)."""

    def known(dotted: str) -> str:
        while dotted and dotted not in modules:
            dotted = dotted.rpartition(".")[0]
        return dotted

    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {known(alias.name) for alias in node.names if alias.name.split(".")[0] == "dsee_dist"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source.split(".")[0] != "dsee_dist":
                continue
            for alias in node.names:  # `from dsee_dist.engine import checkpoint` imports the module checkpoint
                dotted = f"{source}.{alias.name}"
                found.add(dotted if dotted in modules else known(source))
    found.discard(name)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as [a, b, ..., a], or None (depth-first search, iterative)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for root in sorted(graph):
        if root in state:
            continue
        path, stack = [root], [iter(sorted(graph[root]))]
        state[root] = 1
        while stack:
            child = next(stack[-1], None)
            if child is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(child) == 1:
                return path[path.index(child) :] + [child]
            elif child not in state:
                state[child] = 1
                path.append(child)
                stack.append(iter(sorted(graph.get(child, ()))))
    return None


def test_the_graph_is_read():  # the checks below would pass vacuously on an empty graph
    graph = import_graph()
    assert "dsee_dist.recipes.run" in graph["dsee_dist.train"]
    assert "dsee_dist.config.validation" in graph["dsee_dist.config.loading"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_module_imports_itself_back():
    assert find_cycle(import_graph()) is None


def test_lower_layers_never_import_the_recipes():
    offenders = sorted(
        f"{name} -> {target}"
        for name, targets in import_graph().items()
        if name.split(".")[1:2] and name.split(".")[1] in LOWER_LAYERS
        for target in targets
        if target == "dsee_dist.recipes" or target.startswith("dsee_dist.recipes.")
    )
    assert offenders == []


def test_fine_tuning_does_not_import_the_two_stage_recipe():  # the training command chooses between them
    graph = import_graph()
    assert "dsee_dist.recipes.two_stage" not in graph["dsee_dist.recipes.finetune"]
    assert {"dsee_dist.recipes.finetune", "dsee_dist.recipes.two_stage"} <= graph["dsee_dist.recipes.run"]


def test_config_imports_only_itself_and_the_errors():  # a bad config fails before anything heavy is imported
    outside = sorted(
        f"{name} -> {target}"
        for name, targets in import_graph().items()
        if name == "dsee_dist.config" or name.startswith("dsee_dist.config.")
        for target in targets
        if not (target.startswith("dsee_dist.config") or target == "dsee_dist.errors")
    )
    assert outside == []


def test_the_packages_form_layers():  # no two packages import each other, however indirectly
    packages: dict[str, set[str]] = {}
    for name, targets in import_graph().items():
        outer = name.split(".")[1] if "." in name else name
        packages.setdefault(outer, set()).update(t.split(".")[1] for t in targets if t.split(".")[1] != outer)
    assert {"utils", "models", "engine", "recipes"} <= set(packages)
    assert find_cycle(packages) is None
