"""Adapters applied to a package's weights without torch: LoRA (`lora_file`), textual inversion
(`textual_inversion`), as initializer overrides of the engines (`state`, `package_weights`)."""
