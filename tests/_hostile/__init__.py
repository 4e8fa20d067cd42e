"""The hostile-input table's machinery: rows, verdicts, and what the rows start from.

Every row of ``tests/test_hostile_*.py`` runs one bad input (or one fault) and asserts its
verdict:

- ``clear``: a :class:`KDError` (library) or exit code 2 with exactly one line on stderr and
  no traceback (CLI, run in-process through ``kdkit.cli.main``), whose message matches the
  row's pattern (it names the argument or file and the fix);
- ``correct``: the input is legitimate or recoverable and the result is right.

Anything else is a failure, classified as ``confusing`` (a raw exception or a message that
does not say what is wrong), ``silent`` (no error and a wrong result), ``crash`` (a CLI
traceback), ``late`` (the demo started its work before checking), ``loss`` (a good file
destroyed), ``ran code`` (a file made kdkit run code it named) or ``hang``.

A room of kdkit per file: the CLI's commands (``_cli``, ``_export``, ``_bench``, ``_cache``),
model files (``_checkpoints``), the run directory (``_resume``, ``_outputs``), data and disks
(``_files``), config values (``_values``) and the library's losses and steps (``_library``);
issue 40 added the ``task: lm`` rooms (``_lm_data``, ``_lm_models``, ``_lm_cache``, ``_lm_runs``:
``fx.lm`` holds their tokenizer, models and corpus, :mod:`.lm`), a run's and a cache's own
files (``_runfiles``), the launcher's environment (``_launch``) and the image side's
leftovers (``_images``); issue 36 the served teacher (``_lm_served``). ``Case.guard`` wraps a row in :class:`memory_cap` (a fix that fails
gets a MemoryError, not a thrashing machine) or :class:`file_size_cap` (a full disk).
The ``hostile`` fixture (``tests/conftest.py``) gives each file an :class:`Fx`. Here:
``rows`` (cases, verdicts, the tally), ``make`` (tiny models, data, configs) and ``files``
(the files the rows start from); tests import the names below from ``_hostile``. With
``KDKIT_HOSTILE_TALLY=path.json`` every verdict is merged into that file (start from a fresh
path), so one command counts the whole table::

    KDKIT_HOSTILE_TALLY=/tmp/tally.json pytest tests/test_hostile_*.py
    python tests/_hostile /tmp/tally.json
"""

from .files import (
    PWN,
    Files,
    Fx,
    build_files,
    fake_load_data,
    flipped,
    resaved,
    room,
    work_copy,
    work_started,
)
from .lm import LMFiles, corpus_text, tiny_llama
from .make import (
    CLASSES,
    MEAN,
    SIZE,
    STD,
    STUDENT,
    blobs,
    dataset,
    image_tree,
    net,
    run_config,
    student,
    teacher_weights,
    trainer,
    write_yaml,
)
from .rows import (
    VERDICTS,
    Case,
    WorkStarted,
    cli_rows,
    file_size_cap,
    hang_post,
    in_thread,
    judge,
    judge_row,
    memory_cap,
    no_cuda,
    params,
    pwned,
    table,
    write_tally,
)

__all__ = [
    "CLASSES", "MEAN", "PWN", "SIZE", "STD", "STUDENT", "VERDICTS",
    "Case", "Files", "Fx", "LMFiles", "WorkStarted",
    "blobs", "build_files", "cli_rows", "corpus_text", "file_size_cap", "dataset", "fake_load_data", "flipped",
    "hang_post", "image_tree", "in_thread", "judge", "judge_row", "memory_cap", "net", "no_cuda", "params",
    "pwned", "resaved", "room", "run_config", "student", "table", "teacher_weights", "tiny_llama", "trainer",
    "work_copy", "work_started", "write_tally", "write_yaml",
]  # fmt: skip
