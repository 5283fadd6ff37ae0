"""lolcats: turn a pretrained Transformer LLM into a subquadratic one (LoLCATs)."""

__version__ = "0.1.0"
