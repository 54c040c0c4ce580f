"""Fake of show-o2/models/omni_attention.py: causal mask, full attention inside each image block."""
import torch


def omni_attn_mask_naive(B, LEN, modalities, device, inverted=True):
    """(B, 1, LEN, LEN): 1 where attention is allowed, or (inverted) 0 there and a huge negative elsewhere."""
    mask = torch.tril(torch.ones((B, 1, LEN, LEN), dtype=torch.long)).to(device)
    for b in range(B):
        for offset, length in modalities[b]:
            mask[b, :, offset:offset + length, offset:offset + length] = 1
    if not inverted:
        return mask
    inv = 1 - mask
    return inv.masked_fill(inv.to(torch.bool), torch.iinfo(torch.long).min)
