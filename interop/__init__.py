"""Formats of other tools, in and out: Hugging Face checkpoints (huggingface), TransformerLens 3/4
(transformerlens) and SAELens folders (saelens). Analysis code never converts formats itself."""
