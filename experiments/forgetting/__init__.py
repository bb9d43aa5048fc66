"""The forgetting experiment (README.md): does dynamic block topology forget less at equal learning?

Modules in the order a run meets them: ``data`` (task A and task B as bytes), ``model`` (the Llama-style
byte model), ``arms`` (what each arm changes), ``train`` (one task-A run, one task-B run), ``evaluate``
(the metrics), ``baselines`` (replay, LoRA), ``grid`` (which runs, in what order, on how many workers),
``analysis`` (records to numbers), ``paired`` (differences within a seed), ``plots`` and ``report``; ``run.py`` is the command line. The experiment uses only sparsify's
public API.
"""

from pathlib import Path

HOME = Path(__file__).resolve().parent  # the prepared corpus (data/) and the runs (results/) live here, git-ignored
