"""Token rows into one padded batch: the package's one padding helper.

Generation pads on the left, so every prompt ends where generation starts; teacher-forced reads pad on the right,
so every real token keeps its position and sees nothing after it, and a row reads exactly what it would read alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def pad_rows(rows: Sequence[Sequence[int]], pad_id: int, side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` ``[N, max len]`` of token ``rows``, padded with ``pad_id`` on ``side``."""
    if side not in ("left", "right"):
        raise ValueError(f"side={side!r}: pad on the 'left' (generation) or the 'right' (teacher forcing).")
    width = max((len(r) for r in rows), default=0)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if not row:
            continue
        span = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        ids[i, span] = torch.as_tensor(list(row), dtype=torch.long)
        mask[i, span] = 1
    return ids, mask


__all__ = ["pad_rows"]
