"""selectmoe."""

__version__ = "0.1.0"

import selectmoe.model  # noqa: F401  (registers select_moe with AutoConfig / AutoModelForCausalLM)
