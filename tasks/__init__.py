"""The tasks, one file each: what a task's data is, and what it knows (its run name, its splits and
positions, its token names). data.build_data finds a task here by --task.

    modular.py   modular arithmetic (grokking)
    dyck.py      Dyck languages
    text.py      language modelling on a corpus

A new task is one file with a TaskData subclass (data.py says what the loop needs) and its line
below (DEVELOPERS.md, "Add a task")."""

from __future__ import annotations

from tasks.dyck import DyckData
from tasks.modular import ModularData
from tasks.text import TextData

TASKS = {"modular": ModularData, "dyck": DyckData, "text": TextData}
