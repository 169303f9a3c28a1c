"""On the real two-node SLURM cluster (.ci/slurm-cluster, fixture ``slurm_cluster``): the cluster itself."""
import pytest

pytestmark = pytest.mark.cluster


def test_the_cluster_runs_one_task_on_each_of_two_nodes(slurm_cluster, tmp_path):
    out = slurm_cluster.run("srun", "--nodes=2", "--ntasks-per-node=1", "--time=1", "--label",
                            "printenv", "SLURMD_NODENAME", cwd=tmp_path)
    assert sorted(out.splitlines()) == ["0: n1", "1: n2"]
