"""A tiny clothes parser written as a real parser folder: transformers' SegformerForSemanticSegmentation with
the labels of mattmdjaga/segformer_b2_clothes (ATR-style), random weights, saved by transformers itself."""

from __future__ import annotations

from pathlib import Path

import torch

from lib_anydressing.segment.bench_parse import ATR as ATR_LABELS  # segformer_b2_clothes' labels

TINY = {"depths": [1, 1, 1, 1], "hidden_sizes": [8, 16, 32, 64], "decoder_hidden_size": 32,
        "num_attention_heads": [1, 1, 2, 4]}  # fmt: skip


def parser_model(labels=ATR_LABELS, seed: int = 0):
    """A SegformerForSemanticSegmentation with random weights; the classifier's are large, so the label varies
    with the pixels (with transformers' small init one class wins everywhere)."""
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    config = SegformerConfig(
        num_labels=len(labels), id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)},
        **TINY,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = SegformerForSemanticSegmentation(config).eval()
    with torch.no_grad():
        model.decode_head.classifier.weight.normal_(0, 3.0)
        model.decode_head.classifier.bias.normal_(0, 0.1)
    return model


def write_parser(folder: Path, labels=ATR_LABELS, *, safetensors: bool = True) -> Path:
    """The model's folder as the HF hub has it: config.json, weights, preprocessor_config.json (at 64 px, fast)."""
    from transformers import SegformerImageProcessor

    model = parser_model(labels)
    model.save_pretrained(str(folder), safe_serialization=safetensors)
    SegformerImageProcessor(size={"height": 64, "width": 64}).save_pretrained(str(folder))
    return folder
