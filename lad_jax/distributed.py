"""Several processes (one per host) under `jax.distributed`, with the number of hosts invisible to the math.

The contract every multi-host path in lad_jax follows: **host data is global**. Every process holds the same global
numpy arrays (the same prompt batch, the same gathered rollout, the same minibatches), and a global `jax.Array` is
built from them with `global_array`, where each device takes exactly its own index range of the global array. So a
row lands on the same devices whatever the mesh layout or the devices per host (a tensor axis that spans hosts, two
hosts sharing batch rows), and no two hosts ever write different data into one row. Device results come back to
every host whole (`to_host`). Work that is costly per row and runs on the host (reward scoring, sandboxed programs)
is split instead: each process scores a contiguous share of the rows and the shares are all-gathered
(`score_rows`), so every row is scored exactly once and all hosts agree on every reward.

Start-up: `initialize(mesh_section)` is the one place that calls `jax.distributed.initialize`; it must run before
any other JAX call. `mesh.distributed=auto` starts it when the environment names a multi-process job (TPU pod,
SLURM, MPI, `JAX_COORDINATOR_ADDRESS`) or when `mesh.coordinator_address` is set; launches without a cluster
manager pass `mesh.coordinator_address`, `mesh.num_processes` and `mesh.process_id` (JAX 0.10 reads only the
coordinator address from the environment).
"""
from __future__ import annotations

import os
import zlib
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np

from lad_jax.config_checks import ConfigError

_MULTIPROCESS_ENV = ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS", "MEGASCALE_COORDINATOR_ADDRESS",
                     "TPU_WORKER_HOSTNAMES", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")


def wants_distributed(mode: str, env: Mapping[str, str] = os.environ, coordinator_address: str | None = None) -> bool:
    """mesh.distributed: on / off, or auto = a coordinator is configured or the environment names a multi-process
    job."""
    if mode == "on":
        return True
    if mode == "off":
        return False
    if coordinator_address:
        return True
    if env.get("SLURM_NTASKS") and int(env["SLURM_NTASKS"]) <= 1:
        return False
    if env.get("OMPI_COMM_WORLD_SIZE") and int(env["OMPI_COMM_WORLD_SIZE"]) <= 1:
        return False
    hosts = env.get("TPU_WORKER_HOSTNAMES")
    if hosts is not None and len(hosts.split(",")) <= 1:
        return False
    return any(env.get(k) for k in _MULTIPROCESS_ENV)


def initialize_kwargs(mesh, env: Mapping[str, str] = os.environ) -> dict[str, Any]:
    """The `jax.distributed.initialize` arguments for a `MeshSection` (config checks already ran)."""
    kwargs: dict[str, Any] = {}
    if mesh.coordinator_address:
        kwargs["coordinator_address"] = mesh.coordinator_address
    if mesh.num_processes is not None:
        if not (mesh.coordinator_address or env.get("JAX_COORDINATOR_ADDRESS")):
            raise ConfigError(f"mesh.num_processes={mesh.num_processes} is set but no coordinator is: set "
                              "mesh.coordinator_address=HOST:PORT (process 0's address) or JAX_COORDINATOR_ADDRESS")
        kwargs["num_processes"] = mesh.num_processes
        kwargs["process_id"] = mesh.process_id
    return kwargs


def initialize(mesh, env: Mapping[str, str] = os.environ) -> None:
    """Starts `jax.distributed` when `mesh` (a config `MeshSection`) asks for it; a no-op when already started."""
    if not wants_distributed(mesh.distributed, env, mesh.coordinator_address):
        return
    kwargs = initialize_kwargs(mesh, env)
    if not jax.distributed.is_initialized():
        try:
            jax.distributed.initialize(**kwargs)
        except ValueError as e:  # e.g. no cluster manager found and no coordinator given
            raise ConfigError(f"jax.distributed.initialize() failed: {e}. Outside a TPU pod, SLURM or MPI job set "
                              "mesh.coordinator_address=HOST:PORT (process 0's), mesh.num_processes and "
                              "mesh.process_id, or mesh.distributed=off for one process") from None
    if mesh.num_processes is not None and jax.process_count() != mesh.num_processes:
        raise ConfigError(f"mesh.num_processes={mesh.num_processes} but jax.distributed reports "
                          f"{jax.process_count()} processes; give every process the same count")


# ---- global arrays from host data ----------------------------------------------------------------------------------


def global_array(host: np.ndarray, sharding: jax.sharding.Sharding) -> jax.Array:
    """A global array with `sharding` from a host array that is identical on every process: each addressable device
    receives exactly its index range, so rows never collide for any mesh layout."""
    host = np.asarray(host)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def to_host(x: jax.Array) -> np.ndarray:
    """The whole value of a (possibly multi-host) array on every process (collective when not fully addressable:
    every process must call it)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def allgather(local: np.ndarray) -> np.ndarray:
    """[process_count, *local.shape]: every process's `local` (same shape and dtype on all), in process order."""
    if jax.process_count() == 1:
        return np.asarray(local)[None]
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(np.asarray(local)))


def share(n: int, index: int | None = None, count: int | None = None) -> slice:
    """Process `index`'s contiguous share of `n` items (near-equal, in process order)."""
    index = jax.process_index() if index is None else index
    count = jax.process_count() if count is None else count
    return slice(index * n // count, (index + 1) * n // count)


def check_same(what: str, *values: Any) -> None:
    """Raises on every process unless all processes passed the same `values` (compared by a CRC of their repr)."""
    if jax.process_count() == 1:
        return
    crc = zlib.crc32(repr(values).encode())
    seen = allgather(np.asarray([crc], np.uint32))[:, 0]
    if len(set(seen.tolist())) > 1:
        raise ValueError(f"{what} differ between processes (checksums {seen.tolist()}); with several processes "
                         "every process must pass the same global values")


def score_rows(reward_fn: Callable, completions: Sequence[str], rows: Sequence[Mapping[str, Any]], *,
               num_tokens: np.ndarray | None = None) -> tuple[np.ndarray, dict[str, float]]:
    """`reward_fn(completions, rows[, num_tokens=]) -> rewards or (rewards, metrics)` over all rows, each scored once.

    Every process passes the same global lists. With one process this is just `reward_fn`; with several each scores
    its `share` of the rows, the rewards are all-gathered in row order, and each metric is the row-weighted mean of
    the shares' metrics (the registry's reward metrics are means over rows).
    """
    n = len(completions)
    # Fewer rows than processes (a tiny eval): every process scores them all rather than leaving a share empty.
    mine = share(n) if n >= jax.process_count() else slice(0, n)
    extra = {} if num_tokens is None else {"num_tokens": np.asarray(num_tokens)[mine]}
    result = reward_fn(list(completions[mine]), list(rows[mine]), **extra)
    rewards, metrics = result if isinstance(result, tuple) else (result, {})
    rewards = np.asarray(rewards, np.float32).reshape(-1)
    if rewards.shape != (mine.stop - mine.start,):
        raise ValueError(f"reward function returned {rewards.shape[0]} rewards for {mine.stop - mine.start} "
                         "completions")
    if jax.process_count() == 1 or n < jax.process_count():
        return rewards, {k: float(v) for k, v in (metrics or {}).items()}
    names = sorted(metrics or {})
    check_same("reward metric names", names)
    width = -(-n // jax.process_count()) + 1  # the largest share, plus one slot for the row count
    local = np.zeros((1 + len(names), width), np.float32)
    local[0, : len(rewards)] = rewards
    local[0, -1] = len(rewards)
    local[1:, 0] = [float(metrics[k]) for k in names]
    gathered = allgather(local)
    counts = gathered[:, 0, -1].astype(int)
    all_rewards = np.concatenate([g[0, :c] for g, c in zip(gathered, counts)]).astype(np.float32)
    weights = counts / max(counts.sum(), 1)
    merged = {k: float(np.sum(gathered[:, 1 + i, 0] * weights)) for i, k in enumerate(names)}
    return all_rewards, merged
