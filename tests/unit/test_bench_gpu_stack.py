"""How the benchmark's stack launcher lays generators out on GPUs (issue 14): no GPU, no processes."""

from __future__ import annotations

import argparse
from pathlib import Path

from bench.gpu_stack import build, generator_addresses, generator_env, replica_gpus


def test_each_replica_gets_its_own_gpus() -> None:
    assert [replica_gpus(i, 1) for i in range(2)] == ["0", "1"]
    assert [replica_gpus(i, 2) for i in range(2)] == ["0,1", "2,3"]


def test_one_generator_on_one_gpu_keeps_the_environment_as_it_is() -> None:
    assert generator_env({"GENERATOR_MODEL": "m"}, 0, replicas=1, gpus_per_replica=1) == {
        "GENERATOR_MODEL": "m"
    }


def test_tensor_parallel_replica_sees_its_gpus_with_nvlink_multicast_off() -> None:
    env = generator_env({}, 0, replicas=1, gpus_per_replica=2)
    assert env == {
        "CUDA_VISIBLE_DEVICES": "0,1",
        "GENERATOR_TENSOR_PARALLEL_SIZE": "2",
        "NCCL_NVLS_ENABLE": "0",
    }
    # An explicit setting wins.
    assert generator_env({"NCCL_NVLS_ENABLE": "1"}, 0, 1, 2)["NCCL_NVLS_ENABLE"] == "1"


def test_replicas_behind_one_edge(tmp_path: Path) -> None:
    args = argparse.Namespace(
        env=["GENERATOR_MODEL=m", "EDGE_MAX_ACTIVE=512", "CACHER_REDIS_SERVER_BIN=/x"],
        data=str(tmp_path),
        replicas=2,
        gpus_per_replica=1,
    )
    generators, front = build(args)
    assert generator_addresses(2) == ["127.0.0.1:50052", "127.0.0.1:50062"]
    assert [g.processes["generator"].port for g in generators] == [50052, 50062]
    assert [g.processes["generator"].env["CUDA_VISIBLE_DEVICES"] for g in generators] == ["0", "1"]
    assert all(g.processes["generator"].env["GENERATOR_MODEL"] == "m" for g in generators)
    edge = front.processes["edge"].env
    assert edge["EDGE_GENERATOR_ADDR"] == "127.0.0.1:50052,127.0.0.1:50062"
    assert edge["EDGE_MAX_ACTIVE"] == "512"
    assert front.processes["cacher"].env["CACHER_REDIS_SERVER_BIN"] == "/x"
    assert set(front.processes) == {"cacher", "edge"}


def test_a_port_offset_moves_every_service_off_another_stacks_ports(tmp_path: Path) -> None:
    args = argparse.Namespace(env=[], data=str(tmp_path), replicas=1, gpus_per_replica=1, port_offset=700)
    (generator,), front = build(args)
    assert generator.processes["generator"].port == 50752
    assert front.processes["edge"].port == 50751 and front.processes["cacher"].port == 50754
    assert front.processes["edge"].env["EDGE_GENERATOR_ADDR"] == "127.0.0.1:50752"
    assert front.processes["edge"].env["EDGE_CACHER_ADDR"] == "127.0.0.1:50754"
    assert {p.metrics_port for p in (*generator.processes.values(), *front.processes.values())} == {
        9792,
        9791,
        9794,
    }
