"""The plumbing no experiment touches: the run layer (session), processes and collectives
(distributed), checkpoint files, hardware and MFU, metrics and W&B (tracking), run directories and
their claims (rundirs), and the corpus engine. Standard library, numpy and torch; nothing here imports
a program, a task or the model."""
