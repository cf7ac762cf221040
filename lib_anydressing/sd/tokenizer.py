"""SD1.x's CLIP tokenizer from what is on disk (never downloaded), and the tiny real one of tests."""

from __future__ import annotations

import gzip
import importlib.util
import json
import tempfile
from pathlib import Path
from typing import Any

from .architectures import SDCheckpointError

CLIP_L_REPO = "openai/clip-vit-large-patch14"  # the tokenizer A1111 loads for SD1.x (from its cache here)


def find_clip_tokenizer() -> Any:
    """SD1.x's CLIP tokenizer from what is already on disk, never downloaded.

    Tried in order: the Hugging Face cache (where the WebUI stores openai/clip-vit-large-patch14),
    then the BPE vocabulary shipped inside the `clip` or `open_clip` package.
    """
    from transformers import CLIPTokenizer

    try:
        return CLIPTokenizer.from_pretrained(CLIP_L_REPO, local_files_only=True)
    except (OSError, ValueError):
        pass
    for package in ("clip", "open_clip"):
        spec = importlib.util.find_spec(package)
        for folder in (spec.submodule_search_locations or []) if spec else []:
            bpe = Path(folder) / "bpe_simple_vocab_16e6.txt.gz"
            if bpe.is_file():
                return tokenizer_from_bpe(bpe)
    raise SDCheckpointError(
        "no CLIP tokenizer files were found (nothing is downloaded): pass a folder holding vocab.json and "
        f"merges.txt, e.g. a copy of {CLIP_L_REPO}'s tokenizer files, or run inside the WebUI's environment"
    )


def tokenizer_from_bpe(bpe_gz: Path) -> Any:
    """A CLIPTokenizer from CLIP's own bpe_simple_vocab_16e6.txt.gz (its first line is a header)."""
    lines = gzip.open(bpe_gz, "rt", encoding="utf-8").read().split("\n")
    return _tokenizer_from_merges([line for line in lines[1 : 49152 - 256 - 2 + 1] if line])  # CLIP's slice


def tiny_clip_tokenizer() -> Any:
    """A real CLIPTokenizer over the 256 byte symbols and a few merges: small enough for tiny text encoders."""
    return _tokenizer_from_merges(["s h", "sh i", "shi r", "shir t</w>", "d r", "dr e", "dre s", "dres s</w>"])


def _tokenizer_from_merges(merges: list[str]) -> Any:
    """CLIP's vocabulary is defined by its merges: the 256 byte symbols, the same with the end-of-word
    mark, one token per merge in rank order, then <|startoftext|> and <|endoftext|>."""
    from transformers.models.clip.tokenization_clip import bytes_to_unicode

    symbols = list(bytes_to_unicode().values())
    tokens = [*symbols, *(s + "</w>" for s in symbols), *(m.replace(" ", "") for m in merges)]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
        (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
        return tokenizer_from_folder(folder)


def tokenizer_from_folder(folder: Path) -> Any:
    from transformers import CLIPTokenizer

    if not (folder / "vocab.json").is_file() or not (folder / "merges.txt").is_file():
        raise SDCheckpointError(f"'{folder}' does not hold a CLIP tokenizer (vocab.json and merges.txt)")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)
