"""llmforge: fine-tune a language model and ship it to a local runtime.

Data flow: load -> (train) -> merge -> quantize -> write GGUF -> template -> Modelfile -> push.
"""

__version__ = "0.1.0"
