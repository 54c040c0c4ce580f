"""A FAKE of Show-o2's ``models`` package (github.com/showlab/Show-o, show-o2/models) for grpo_lib's tests.

Same module, class and function names and call signatures as the real package's parts that
``grpo_lib.policies.showo2`` uses; tiny random networks instead of Qwen2.5 + SigLIP + the 0.8B flow
head, and a channel-mixing upsampler instead of the Wan2.1 VAE. Nothing here is Show-o2's code.
"""
from .modeling_showo2_qwen2_5 import Showo2Qwen2_5
from .omni_attention import omni_attn_mask_naive
from .wan21_vae import WanVAE

IMPORTED_FROM = __file__   # the tests check which checkout was imported
