"""The tokens of one simulated step, laid out per EP rank.

Tokens on a rank are in batch order, position-major (all sequences' position 0, then position 1,
...), which is Megatron's ``[seq, batch]`` layout: "keep the earliest tokens" then drops the
latest positions of every sequence, as OpenMoE observed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class TokenBatch:
    """Sequence ids and positions of every token of a step.

    Attributes:
        seq_id: ``[ranks, tokens]`` int64, global sequence id of each token.
        position: ``[ranks, tokens]`` int64, position of each token in its sequence.
    """

    seq_id: np.ndarray
    position: np.ndarray

    @property
    def ranks(self) -> int:
        """EP ranks."""
        return int(self.seq_id.shape[0])

    @property
    def tokens_per_rank(self) -> int:
        """Tokens on each rank."""
        return int(self.seq_id.shape[1])


def make_batch(
    ranks: int, seqs_per_rank: int, tokens_per_seq: int, first_position: int, first_seq: int = 0
) -> TokenBatch:
    """Build the batch of one step.

    Args:
        ranks: EP ranks.
        seqs_per_rank: Sequences each rank holds.
        tokens_per_seq: Tokens of each sequence in this step (1 in decode).
        first_position: Position of the first token (the context length in decode).
        first_seq: Global id of the batch's first sequence (decode keeps its sequences from
            step to step; prefill and training take new ones every step).
    """
    pos = np.repeat(np.arange(tokens_per_seq), seqs_per_rank) + first_position
    local_seq = np.tile(np.arange(seqs_per_rank), tokens_per_seq)
    seq = first_seq + np.arange(ranks)[:, None] * seqs_per_rank + local_seq[None, :]
    return TokenBatch(seq_id=seq, position=np.broadcast_to(pos, seq.shape).copy())
