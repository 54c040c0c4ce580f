"""A FAKE of Show-o2's ``models`` package (github.com/showlab/Show-o, show-o2/models) for grpo_lib's tests.

Same module, class and function names and call signatures as the real package's parts that
``grpo_lib.policies.showo2`` uses; tiny random networks instead of Qwen2.5 + SigLIP + the 0.8B flow
head, and a channel-mixing upsampler instead of the Wan2.1 VAE. Nothing here is Show-o2's code.
It keeps the main venv's tests of the adapter (the real code needs Show-o2's own env); the real code
itself is tested in tests/test_showo2_real.py. Like the real model, it passes the attention mask to SDPA
as given, so a mask in the wrong dtype fails here too.
"""
from .modeling_showo2_qwen2_5 import Showo2Qwen2_5
from .omni_attention import omni_attn_mask_naive
from .wan21_vae import WanVAE

IMPORTED_FROM = __file__   # the tests check which checkout was imported
