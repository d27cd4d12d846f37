"""Data parallel pieces without a job: device checks, the launch command, the rank environment, per-rank RNG.

The jobs themselves (2 gloo ranks through a real trainer) are in test_data_parallel_jobs.py.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from lorafleet_trainer import train_loop
from lorafleet_trainer.checkpoint import LoopState
from lorafleet_trainer.distributed import Ranks, devices_problem
from lorafleet_trainer.launch import requested_devices, worker_command


def test_device_counts_a_host_cannot_give_are_refused_with_the_reason() -> None:
    assert devices_problem(2, 2, cuda_devices=2, cpus=16) is None
    assert devices_problem(2, 2, cuda_devices=0, cpus=2) is None  # a CPU host: 2 gloo processes
    assert devices_problem(1, 1, cuda_devices=0, cpus=1) is None
    gpus = devices_problem(4, 4, cuda_devices=2, cpus=64)
    assert gpus is not None and gpus.startswith("resources.devices: 4 GPUs asked for, but this trainer host has 2")
    assert devices_problem(3, 3, cuda_devices=0, cpus=2) == (
        "resources.devices: 3 processes asked for, but this trainer host has no CUDA GPU and 2 CPU(s): "
        "on a CPU each process needs one"
    )
    unlaunched = devices_problem(2, 1, cuda_devices=8, cpus=64)
    assert unlaunched is not None and "started as 1 process(es)" in unlaunched


def test_the_launcher_starts_torchrun_for_several_devices(tmp_path: Path) -> None:
    assert worker_command("py", 1, tmp_path) == ["py", "-m", "lorafleet_trainer.worker", str(tmp_path)]
    command = worker_command("py", 2, tmp_path)
    assert command[:3] == ["py", "-m", "torch.distributed.run"]
    assert "--standalone" in command and "--nproc-per-node=2" in command
    assert command[-3:] == ["-m", "lorafleet_trainer.worker", str(tmp_path)]
    manifest = {"base_model": "m", "adapter_name": "a", "datasets": ["d.jsonl"]}
    assert requested_devices(manifest) == 1
    assert requested_devices(manifest | {"resources": {"devices": 4}}) == 4
    assert requested_devices({"not": "a manifest"}) == 1  # the worker reports what is wrong with it


def test_ranks_come_from_torchruns_environment() -> None:
    single = Ranks.from_environment({})
    assert (single.rank, single.world_size, single.is_main, single.distributed) == (0, 1, True, False)
    ranks = Ranks.from_environment({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"})
    assert (ranks.rank, ranks.world_size, ranks.is_main, ranks.distributed) == (1, 2, False, True)
    assert ranks.device(torch.device("cpu")) == torch.device("cpu")
    assert ranks.device(torch.device("cuda")) == torch.device("cuda", 1)  # one GPU per rank
    with pytest.raises(ValueError):
        Ranks(2, 2)
    # One process: the collectives are no-ops.
    assert single.sum([1.5]) == [1.5] and single.max([2.0, 0.0]) == [2.0, 0.0] and single.first_error("x") == "x"
    assert single.from_main({"a": 1}) == {"a": 1} and len(single.rng_states(torch.device("cpu"))) == 1


def test_each_rank_resumes_its_own_dropout_draws() -> None:
    torch.manual_seed(1)
    main_state = torch.get_rng_state()
    torch.manual_seed(2)
    other_state = torch.get_rng_state()
    state = LoopState(
        step=1,
        epoch=0,
        group=1,
        planner_state=random.Random(0).getstate(),
        plan_digest="",
        trained_tokens=0,
        train_seconds=0.0,
        optimizer={},
        torch_rng=main_state,
        other_ranks_rng=[{"cpu": other_state, "cuda": []}],
    )
    draws = {}
    for rank in (0, 1, 2):  # rank 2: a checkpoint without its state (another device count) falls back to rank 0's
        train_loop.restore_rng(state, rank, torch.device("cpu"))
        draws[rank] = torch.rand(4)
    torch.manual_seed(2)
    assert torch.equal(draws[1], torch.rand(4))
    assert not torch.equal(draws[0], draws[1]) and torch.equal(draws[0], draws[2])
