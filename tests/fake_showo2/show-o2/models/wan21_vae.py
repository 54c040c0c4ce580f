"""Fake of show-o2/models/wan21_vae.py: WanVAE with batch_decode of (B, C, T, h, w) -> (B, 3, T, 8h, 8w) in [-1, 1]."""
import torch


class WanVAE:
    def __init__(self, z_dim=16, vae_pth="", dtype=torch.float, device="cuda"):
        state = torch.load(vae_pth, map_location="cpu", weights_only=True)   # {"proj": (3, C)}
        self.proj = state["proj"].to(device=device, dtype=torch.float32)
        self.dtype, self.device = dtype, device

    def batch_decode(self, zs):
        x = torch.einsum("oc,bcthw->bothw", self.proj, zs.float())
        x = x.repeat_interleave(8, dim=-1).repeat_interleave(8, dim=-2)
        return torch.tanh(x).clamp_(-1, 1)
