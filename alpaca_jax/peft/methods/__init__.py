"""The PEFT method registry: each method is one module here and one registration below.

    from alpaca_jax.peft.methods import PEFT_METHODS, get_peft_method, method_of

To add a method: write `peft/methods/<name>.py` with a `PeftMethod` subclass (`base.py` lists
what it must define), register an instance below, and extend `tests/test_peft.py` (the registry
tests iterate over `PEFT_METHODS`; the parity tests against HF `peft` name methods explicitly).
"""
from alpaca_jax.peft.methods.base import (PEFT_METHODS, PeftMethod, effective_weight,
                                          get_peft_method, method_of, register_peft_method,
                                          trainable_leaves)
from alpaca_jax.peft.methods.dora import DoRA
from alpaca_jax.peft.methods.lora import LoRA

register_peft_method(LoRA())
register_peft_method(DoRA())

__all__ = ["PEFT_METHODS", "PeftMethod", "get_peft_method", "method_of", "register_peft_method",
           "effective_weight", "trainable_leaves", "LoRA", "DoRA"]
