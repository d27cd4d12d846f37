"""Sequence packing: several rows in one sequence, with no attention and no prediction across rows.

Rows are packed once per job by best-fit decreasing (deterministic: the number of packs does not
depend on the shuffle, so ``total_steps`` is exact), then the packs are shuffled. Inside a pack,
position ids restart at 0 on every row, and attention is block-diagonal causal:

- with flash-attention, transformers reads the row starts from the position ids (varlen kernels);
- with torch's varlen attention (CUDA, attention.py), the rows' boundaries (``cu_seq_lens``) go to the kernel;
- otherwise (sdpa, eager) we pass an explicit 4D block-diagonal causal mask, so isolation does not
  depend on any heuristic inside the model code.

Each row's first label is -100, so the last token of row k never predicts the first of row k+1.
Padding after the last row is a segment of its own: nothing real attends to it.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import Any

import torch

from lorafleet_trainer.attention import VARLEN_ATTENTION
from lorafleet_trainer.batch_transfer import label_selection, to_device
from lorafleet_trainer.tokenize import IGNORE_INDEX, TokenizedExample


def pack_rows(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Row indices grouped into packs of at most ``capacity`` tokens (best-fit decreasing, deterministic)."""
    if any(n > capacity for n in lengths):
        raise ValueError(f"a row is longer than the pack capacity ({max(lengths)} > {capacity} tokens)")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    packs: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, pack index), sorted: the tightest fit is found by bisection
    for i in order:
        n = lengths[i]
        slot = bisect.bisect_left(free, (n, -1))
        if slot == len(free):
            packs.append([i])
            room, index = capacity - n, len(packs) - 1
        else:
            room, index = free.pop(slot)
            packs[index].append(i)
            room -= n
        if room > 0:
            bisect.insort(free, (room, index))
    return packs


def collate_packed(
    packs: list[list[TokenizedExample]], pad_id: int, device: torch.device, width: int | None = None
) -> dict[str, Any]:
    """Packed ids, labels, restarting position ids and each token's row number in its pack (``sequence_ids``).

    ``width``: every pack padded to this many tokens (a fixed shape for compiled layers), and ``max_seq_len``
    set to it (an upper bound on every row, which flash varlen kernels accept); default: the longest pack's
    length, and the longest row's.
    """
    longest_pack = max(sum(len(r.input_ids) for r in pack) for pack in packs)
    if width is not None and width < longest_pack:
        raise ValueError(f"a pack of {longest_pack} tokens does not fit the fixed width {width}")
    fixed_width = width is not None
    width = width or longest_pack
    ids = torch.full((len(packs), width), pad_id, dtype=torch.long)
    labels = torch.full((len(packs), width), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros((len(packs), width), dtype=torch.long)
    sequence_ids = torch.zeros((len(packs), width), dtype=torch.long)
    segments: list[int] = []  # every row's length, and each pack's padding, in token order (varlen attention)
    for b, pack in enumerate(packs):
        start = 0
        for k, row in enumerate(pack):
            n = len(row.input_ids)
            ids[b, start : start + n] = torch.tensor(row.input_ids)
            labels[b, start + 1 : start + n] = torch.tensor(row.labels[1:])  # the row's first label stays -100
            positions[b, start : start + n] = torch.arange(n)
            sequence_ids[b, start : start + n] = k
            segments.append(n)
            start += n
        positions[b, start:] = torch.arange(width - start)
        sequence_ids[b, start:] = len(pack)
        if start < width:
            segments.append(width - start)
    boundaries = torch.zeros(len(segments) + 1, dtype=torch.int32)
    boundaries[1:] = torch.tensor(segments).cumsum(0)
    batch = {
        "input_ids": ids,
        "labels": labels,
        "position_ids": positions,
        "sequence_ids": sequence_ids,
        "cu_seq_lens": boundaries,
        "max_seq_len": width if fixed_width else max(segments),  # a Python int: read without a device sync
    } | label_selection(labels)
    return to_device(batch, device)


def block_causal_mask(sequence_ids: torch.Tensor) -> torch.Tensor:
    """(batch, 1, q, kv) boolean mask: True where a token may attend (same row, not later)."""
    width = sequence_ids.shape[1]
    same_row = sequence_ids[:, :, None] == sequence_ids[:, None, :]
    causal = torch.ones((width, width), dtype=torch.bool, device=sequence_ids.device).tril()
    return (same_row & causal)[:, None]


def attention_implementation(model: Any) -> str:
    return str(getattr(model.config, "_attn_implementation", "") or "")


def packed_model_inputs(model: Any, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Forward keyword arguments that keep the packed rows apart for ``model``'s attention implementation."""
    inputs: dict[str, Any] = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}
    implementation = attention_implementation(model)
    if "flash" in implementation:
        inputs["attention_mask"] = None  # the varlen kernels split rows where the position ids restart
        return inputs
    if implementation == VARLEN_ATTENTION and "cu_seq_lens" in batch:
        # attention.py: the rows' boundaries select the varlen kernel; the mask below stays for any fallback.
        longest = int(batch["max_seq_len"])
        inputs.update(cu_seq_lens_q=batch["cu_seq_lens"], cu_seq_lens_k=batch["cu_seq_lens"])
        inputs.update(max_length_q=longest, max_length_k=longest)
    allowed = block_causal_mask(batch["sequence_ids"])
    if implementation == "eager":  # eager adds the mask to the scores: it must be additive
        dtype = model.get_input_embeddings().weight.dtype
        allowed = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
            ~allowed, torch.finfo(dtype).min
        )
    inputs["attention_mask"] = allowed  # sdpa takes a boolean mask as is
    return inputs
