"""lmforge: the whole life of a GPT/Llama-style language model on your own machine."""

__version__ = "0.1.0"
