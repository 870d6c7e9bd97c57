"""PEFT injection core and the methods built on it (importing this package registers every method)."""

from medpeft_monai.peft.adapters import AdapterConfig, AdaptFormerConfig, Bottleneck, ConvpassConfig, TokenGridConv
from medpeft_monai.peft.core import (
    PEFT_FORMAT,
    BitFitConfig,
    FullFinetuneConfig,
    LinearProbeConfig,
    PeftConfig,
    PeftError,
    PeftModule,
    apply_peft,
    count_parameters,
    find_backbone,
    find_targets,
    load_peft_state_dict,
    merge_peft,
    param_groups,
    peft_config,
    peft_state_dict,
    register_method,
    save_atomic,
    select_blocks,
    unmerge_peft,
)
from medpeft_monai.peft.dcrm import DCRMConfig
from medpeft_monai.peft.dka import DKAConfig, DualKernelConv
from medpeft_monai.peft.lora import LoRAConfig, LoRALinear
from medpeft_monai.peft.prompts import PromptedBlock, VPTConfig

__all__ = [
    "PEFT_FORMAT",
    "AdaptFormerConfig",
    "AdapterConfig",
    "BitFitConfig",
    "Bottleneck",
    "ConvpassConfig",
    "DCRMConfig",
    "DKAConfig",
    "DualKernelConv",
    "FullFinetuneConfig",
    "LinearProbeConfig",
    "LoRAConfig",
    "LoRALinear",
    "PeftConfig",
    "PeftError",
    "PeftModule",
    "PromptedBlock",
    "TokenGridConv",
    "VPTConfig",
    "apply_peft",
    "count_parameters",
    "find_backbone",
    "find_targets",
    "load_peft_state_dict",
    "merge_peft",
    "param_groups",
    "peft_config",
    "peft_state_dict",
    "register_method",
    "save_atomic",
    "select_blocks",
    "unmerge_peft",
]
