"""The embedded zoo: SmolLM2-135M from a PyPI wheel, task data from PyPI wheels, LoRA experts."""
