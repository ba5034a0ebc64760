"""MaxSim (ColBERT / Jina V4 late interaction), defined once in the remote code's scoring module (so that
`model.rerank()` scores as training, evaluation and the playground do); this module is its `nova.*` name."""

from __future__ import annotations

from nova.repo import model_class

maxsim_scores = model_class("maxsim_scores")
padded = model_class("padded")
maxsim = model_class("maxsim")
