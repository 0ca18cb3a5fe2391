"""The distributed tests on real processes (gloo, the CPU backend), 2 and 4
ranks: every op's DTensor strategies (strategy_cases.py) and ExpertParallel
(expert_parallel_cases.py). One spawn per world size runs them all: starting
the processes (imports) costs ~15-20 s each time on a 2-core machine, more
than the cases themselves. A failing case is named in the rank's traceback.
"""

import pytest
import torch.distributed as dist

from expert_parallel_cases import check_expert_parallel, check_peer_dies
from gloo_ranks import run_on_ranks
from strategy_cases import check_all_strategies
from torchtitan_cases import check_torchtitan_dispatcher


def _check_everything():
    check_all_strategies()
    check_expert_parallel()
    if dist.get_world_size() == 2:  # last: rank 1 exits
        return check_peer_dies("capacity", 2)


@pytest.mark.parametrize("world_size", [2, 4])
def test_strategies_and_expert_parallel(world_size):
    run_on_ranks(_check_everything, world_size)


def test_torchtitan_dispatcher():
    """torchtitan's MoE layer with MoeOpsTokenDispatcher under torchtitan's
    own EP = 2 (torchtitan_cases.py); a spawn of its own: torchtitan's
    import costs the other cases' spawns nothing."""
    run_on_ranks(check_torchtitan_dispatcher, 2)
