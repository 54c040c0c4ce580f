"""Policies: the contract (``base``), the embedded world's ``tiny`` UNet, ``sd3`` (diffusers) and ``showo2``.

Import the concrete policies from their modules (``from grpo_lib.policies.sd3 import SD3Policy``);
they are not imported here so that ``import grpo_lib.policies`` stays cheap.
"""
from grpo_lib.policies.base import Cond, Policy, adapters_disabled, apply_cfg, images_to_uint8

__all__ = ["Cond", "Policy", "adapters_disabled", "apply_cfg", "images_to_uint8"]
