"""Parameter-efficient fine-tuning: adapters of any registered PEFT method (LoRA, DoRA;
`peft/methods/`) as params -> params transforms, and HF PEFT's adapter format in and out.

    from alpaca_jax.peft import add_lora, merge, load_peft, save_peft, is_adapter
    from alpaca_jax.peft import PEFT_METHODS, get_peft_method   # the registry, for validation
"""
from alpaca_jax.peft.hf_peft import load_peft, save_peft
from alpaca_jax.peft.lora import (adapter_summary, add_lora, check_adapters, check_settings,
                                  has_adapters,
                                  is_adapter, lora_scale, merge)
from alpaca_jax.peft.methods import PEFT_METHODS, get_peft_method, method_of
from alpaca_jax.peft.targets import resolve_targets

__all__ = ["add_lora", "merge", "load_peft", "save_peft", "is_adapter", "has_adapters",
           "adapter_summary", "check_adapters", "check_settings", "lora_scale", "resolve_targets",
           "PEFT_METHODS", "get_peft_method", "method_of"]
