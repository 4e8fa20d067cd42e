"""Cross-tokenizer distillation: a teacher and a student that tokenize text differently.

One room, small modules, each with one job (docs/lm-xtok.md):

- :mod:`.tokenbytes`: the bytes of every token id (a table, so no ``decode`` runs per token).
- :mod:`.align`: which student position and which teacher position predict from the same text
  prefix (byte offsets, vectorized), once per row in the data pipeline.
- :mod:`.retokenize`: the teacher's tokens for a student row (the same text bytes).
- :mod:`.vocabmap`: the sparse teacher-to-student vocabulary map (exact strings, decomposition
  into the student's first token), cached by the pair's fingerprints.
- :mod:`.target`: the projected teacher as a :class:`~kdkit.lm.targets.TeacherTarget` of the
  fused loss (P-KL on the mapped mass, ULD on the rest).
- :mod:`.data`: rows, dataset and collate that carry the teacher's tokens and the alignment.
- :mod:`.coverage`: ``kdkit lm vocab-map``'s report.

Same-tokenizer runs never come here: they keep the exact path of :mod:`kdkit.lm.fused`.
"""

from kdkit.lm.xtok.align import RowAlignment, align_many, align_rows
from kdkit.lm.xtok.tokenbytes import TokenBytes, token_bytes

__all__ = ["RowAlignment", "TokenBytes", "align_many", "align_rows", "token_bytes"]
