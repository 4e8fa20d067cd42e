"""The launcher's environment, read once and checked, and a rendezvous that gives up.

``torchrun`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT`` together; a scheduler or a hand-written launch script may set some of them,
or set them wrong. :func:`launch_env` says what this process is: alone (no variables, or
``WORLD_SIZE=1``: it simply runs), or rank r of w, with a one-line error for anything
inconsistent (``RANK`` without ``WORLD_SIZE``, a word where a number goes, a rank outside
the world, no ``MASTER_ADDR``).

:func:`join` joins the process group. Under torchrun its agent has already gathered every
rank (``TORCHELASTIC_USE_AGENT_STORE``), so torch's own ``env://`` rendezvous is used. Launched
any other way, rank 0 hosts the store and every rank waits at most ``KDKIT_RENDEZVOUS_TIMEOUT``
seconds (10 by default: the ranks of one job start together) for the others; a rank whose
rank 0 never comes stops with one line instead of waiting for ever (torch waits 30 minutes).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

from kdkit.errors import KDError

__all__ = ["Launch", "launch_env", "join", "rendezvous_timeout"]

_FIX = "launch with torchrun (it sets them all), or unset them to run one process"


@dataclass(frozen=True)
class Launch:
    rank: int
    world: int
    local_rank: int


def _int(name: str, default: str | None = None) -> int:
    text = os.environ.get(name, default)
    try:
        return int(str(text).strip())
    except ValueError:
        raise KDError(f"{name}={text!r} is not an integer; {_FIX}") from None


def launch_env() -> Launch | None:
    """This process's place in a multi-process launch, or None when it runs alone."""
    has_rank, has_world = "RANK" in os.environ, "WORLD_SIZE" in os.environ
    if not has_rank and not has_world:
        return None
    if has_rank != has_world:
        have, missing = ("RANK", "WORLD_SIZE") if has_rank else ("WORLD_SIZE", "RANK")
        raise KDError(f"{have} is set but {missing} is not; {_FIX}")
    rank, world = _int("RANK"), _int("WORLD_SIZE")
    if world < 1:
        raise KDError(f"WORLD_SIZE={world} is not a number of processes (>= 1); {_FIX}")
    if not 0 <= rank < world:
        raise KDError(f"RANK={rank} is not in [0, WORLD_SIZE={world}); {_FIX}")
    local = _int("LOCAL_RANK", "0")
    if local < 0:
        raise KDError(f"LOCAL_RANK={local} is negative; {_FIX}")
    if world == 1:
        return None  # a scheduler's one-process job: run alone
    if not os.environ.get("MASTER_ADDR"):
        raise KDError(f"RANK and WORLD_SIZE are set but MASTER_ADDR is not (rank 0's host); {_FIX}")
    port = _int("MASTER_PORT", "29500")
    if not 0 < port < 65536:
        raise KDError(f"MASTER_PORT={port} is not a port (1..65535); {_FIX}")
    return Launch(rank, world, local)


def rendezvous_timeout() -> float:
    """Seconds a rank waits for the others to join (``KDKIT_RENDEZVOUS_TIMEOUT``, 10)."""
    text = os.environ.get("KDKIT_RENDEZVOUS_TIMEOUT", "10")
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < 1e6:
        raise KDError(f"KDKIT_RENDEZVOUS_TIMEOUT={text!r} is not a number of seconds > 0")
    return value


def join(launch: Launch, backend: str) -> None:
    """Join the process group of ``launch`` with ``backend``, waiting a bounded time."""
    import torch.distributed as dist

    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":  # torchrun: all gathered
        dist.init_process_group(backend)
        return
    addr, port = os.environ["MASTER_ADDR"], int(os.environ.get("MASTER_PORT", "29500"))
    seconds = rendezvous_timeout()
    try:
        store = dist.TCPStore(
            addr, port, launch.world, is_master=launch.rank == 0,
            timeout=datetime.timedelta(seconds=seconds), wait_for_workers=True,
        )  # fmt: skip
    except (RuntimeError, OSError, ValueError) as err:
        who = "the other ranks" if launch.rank == 0 else f"rank 0 at {addr}:{port}"
        raise KDError(
            f"rank {launch.rank} of {launch.world}: {who} did not join within {seconds:g} s "
            f"({type(err).__name__}); start every rank (RANK 0..{launch.world - 1}) with the same "
            "MASTER_ADDR and MASTER_PORT, or wait longer with KDKIT_RENDEZVOUS_TIMEOUT=SECONDS"
        ) from None
    store.set_timeout(datetime.timedelta(minutes=30))  # every rank is here: torch's default
    dist.init_process_group(backend, store=store, rank=launch.rank, world_size=launch.world)
