"""distributed/examples/train_ep.py under torchrun on 2 CPU processes (gloo),
as its README says to run it: it must finish and its loss must fall (the
same batch every step)."""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("dispatch", ["splits", "capacity"])
def test_train_ep_runs_under_torchrun(dispatch):
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           os.path.join(ROOT, "distributed", "examples", "train_ep.py"), "--steps", "4", "--dispatch", dispatch]
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    losses = [float(x) for x in re.findall(r"^step \d+ loss ([0-9.]+)$", run.stdout, flags=re.M)]
    assert len(losses) == 4, run.stdout
    assert losses[-1] < losses[0], losses
