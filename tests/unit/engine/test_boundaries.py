"""Package boundaries: deepspeed is imported only inside dsee_dist/engine, and the product reads no
test-only environment variable (fault injection lives in tests/hooks)."""

import ast

from tests.conftest import REPO

PACKAGE = REPO / "dsee_dist"


def _imported_modules(path):
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module


def test_deepspeed_is_imported_only_by_the_engine_package():
    offenders = sorted(
        str(path.relative_to(REPO))
        for path in PACKAGE.rglob("*.py")
        if PACKAGE / "engine" not in path.parents
        and any(name == "deepspeed" or name.startswith("deepspeed.") for name in _imported_modules(path))
    )
    assert offenders == []


def test_the_engine_does_import_deepspeed():  # the check above would pass vacuously if nothing did
    engine_files = (PACKAGE / "engine").rglob("*.py")
    assert any("deepspeed" in set(_imported_modules(path)) for path in engine_files)


def test_the_product_reads_no_test_hook_variables():
    from tests.hooks import KILL_IN_SAVE, STEP_DELAY

    names = (KILL_IN_SAVE, STEP_DELAY, "DSEE_DEBUG_STEP_DELAY", "DSEE_FAULT_KILL_IN_SAVE", "DSEE_TEST_")
    found = [(str(p.relative_to(REPO)), name) for p in PACKAGE.rglob("*.py") for name in names if name in p.read_text()]
    assert found == []
