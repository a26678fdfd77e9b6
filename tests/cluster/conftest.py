import os
import tempfile
from pathlib import Path

import pytest

from tests.cluster.harness import Cluster, missing_tools


@pytest.fixture(scope="module")
def cluster():
    """Two Slurm nodes as network namespaces; torn down by PID afterwards, also when a test fails."""
    if os.geteuid() != 0:
        pytest.skip("the cluster tier needs root (network namespaces); .ci/run runs it as root")
    missing = missing_tools()
    if missing:
        pytest.skip(f"the cluster tier needs {', '.join(missing)}: apt-get install slurmctld slurmd slurm-client munge")
    root = Path(tempfile.mkdtemp(prefix="dsee-cluster-"))
    c = Cluster(root)
    c.start()
    try:
        yield c
    finally:
        c.stop()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failing test that used the cluster gets the tails of slurmctld.log and each slurmd log in its report
    (taken while the cluster still runs), so that the failure explains itself."""
    outcome = yield
    report = outcome.get_result()
    cluster = getattr(item, "funcargs", {}).get("cluster")
    if report.failed and isinstance(cluster, Cluster):
        report.sections.append((f"Slurm logs ({cluster.root}/log)", cluster.log_excerpts()))
