"""All-to-all algorithms: from deduplicated token counts to point-to-point flows.

An algorithm is a pure function::

    (copies [ranks, ranks] int, rank_gpu [ranks] int, token_bytes float) -> Flows

``copies[s, d]`` is the number of tokens rank ``s`` sends to rank ``d`` (for dispatch; the
combine phase passes the transpose). ``direct`` is NCCL's pairwise exchange: one flow per
ordered pair of distinct GPUs that exchange tokens; tokens that stay on their GPU move nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from moesim.registry import Registry


@dataclass(frozen=True)
class Flows:
    """Point-to-point transfers of one collective phase.

    Attributes:
        src: ``[n]`` int64 source GPU.
        dst: ``[n]`` int64 destination GPU.
        nbytes: ``[n]`` float64 bytes.
    """

    src: np.ndarray
    dst: np.ndarray
    nbytes: np.ndarray


AllToAllFn = Callable[[np.ndarray, np.ndarray, float], Flows]
ALL_TO_ALL: Registry[AllToAllFn] = Registry("all-to-all")


@ALL_TO_ALL.register("direct")
def direct(copies: np.ndarray, rank_gpu: np.ndarray, token_bytes: float) -> Flows:
    """Pairwise exchange: rank ``s`` sends ``copies[s, d] * token_bytes`` straight to rank ``d``.

    Args:
        copies: ``[ranks, ranks]`` int token copies.
        rank_gpu: ``[ranks]`` GPU of each rank.
        token_bytes: Bytes per token on the wire.
    """
    s, d = np.nonzero(copies)
    off = s != d
    s, d = s[off], d[off]
    return Flows(src=rank_gpu[s], dst=rank_gpu[d], nbytes=copies[s, d] * float(token_bytes))
