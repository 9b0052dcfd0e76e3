"""Length buckets: which rows share a forward pass, and the padding columns no row of them needs.

A step's tensors are padded to its longest prompt and response. A micro-batch (or a chunk of a gradient-free pass)
of shorter rows needs only its own longest: the columns after it change nothing (the decoder and causal attention
never look ahead; padded prompt keys are masked out), so they are cut. Sorting rows by length before cutting them
into micro-batches puts rows of similar lengths together, so little padding is left.

    by_length       row order: longest response first (then longest prompt), stable
    sorted_chunks   rows in chunks of `size` sorted by length, groups of `group` consecutive rows kept together
    used_columns    the prompt and response column ranges any of the given rows uses
    padded_tokens   prompt + response slots that a set of micro-batches computes (the cost the buckets cut)
"""

from __future__ import annotations

import torch
from torch import Tensor


def by_length(response_mask: Tensor, prompt_mask: Tensor) -> Tensor:
    """Row indices ordered by response length, then prompt length, longest first; ties keep their order (stable:
    the order depends only on the lengths and the input order, so a seeded shuffle stays reproducible)."""
    resp = response_mask.sum(1).long()
    prompt = prompt_mask.sum(1).long()
    key = resp * (prompt_mask.shape[1] + 1) + prompt
    return torch.sort(key, descending=True, stable=True).indices


def sorted_chunks(response_mask: Tensor, prompt_mask: Tensor, size: int, group: int = 1) -> list[Tensor]:
    """Row indices of chunks of `size` rows (a multiple of `group`) sorted by length. Rows `g*group .. g*group +
    group - 1` (the k responses to one prompt) stay together and in order, ranked by their longest row: seq2seq
    encodes each prompt once per group."""
    B = response_mask.shape[0]
    if group < 1 or B % group or size % group:
        raise ValueError(f"{B} rows and chunks of {size} cannot be cut into groups of {group}")
    g_resp = response_mask.reshape(B // group, group, -1).amax(1)
    g_prompt = prompt_mask[::group]
    order = by_length(g_resp, g_prompt)
    rows = (order[:, None] * group + torch.arange(group, device=order.device)[None, :]).reshape(-1)
    return [rows[s:s + size] for s in range(0, B, size)]


def used_columns(prompt_mask: Tensor, response_mask: Tensor) -> tuple[slice, slice]:
    """(prompt columns, response columns) that at least one row uses: the prompt from its first to its last column
    holding a real token of some row (so left padding, causal, and right padding, seq2seq, are both cut without
    moving any row's tokens relative to each other: position ids come from the mask), the response up to the last
    real token of the longest row (at least one column)."""
    p_any = prompt_mask.bool().any(0).nonzero()
    p_cols = slice(int(p_any[0]), int(p_any[-1]) + 1) if len(p_any) else slice(0, prompt_mask.shape[1])
    r_any = response_mask.bool().any(0).nonzero()
    return p_cols, slice(0, max(1, int(r_any[-1]) + 1 if len(r_any) else 1))


def padded_tokens(prompt_mask: Tensor, response_mask: Tensor, micro_batches: list[Tensor], trim: bool) -> int:
    """Prompt + response slots (rows x columns) the micro-batches compute, trimmed or padded to the whole batch."""
    total = 0
    for ids in micro_batches:
        if trim:
            p, r = used_columns(prompt_mask[ids], response_mask[ids])
            total += len(ids) * ((p.stop - p.start) + r.stop)
        else:
            total += len(ids) * (prompt_mask.shape[1] + response_mask.shape[1])
    return total
