"""transformers models from a local `save_pretrained` folder, without transformers' own weight loading.

`from_pretrained` (transformers 4.30) reads `pytorch_model.bin` with a plain `torch.load`, which runs
any code pickled into the file. Here the model is built from `config.json` and its weights are read
with `weights_file.load_tensors` (safetensors, or a pickle with weights_only=True) instead.
transformers is imported only when a model is loaded, so importing this module stays cheap.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from .weights import WeightsFileError, load_tensors

if TYPE_CHECKING:
    from transformers import PreTrainedModel

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")

M = TypeVar("M", bound="PreTrainedModel")


def load_pretrained(folder: str | Path, model_class: type[M], *, error: type[WeightsFileError] = WeightsFileError) -> M:
    """`model_class` built from `folder`'s config.json and filled from its weights: CPU, float32, eval mode.

    The weights are `model.safetensors`, else `pytorch_model.bin` (single files; sharded checkpoints
    are not read). Every parameter must come from the file, except the keys transformers itself lets
    a file leave out (`_keys_to_ignore_on_load_missing`, e.g. CLIP's `position_ids` buffer); extra
    keys are ignored, as `from_pretrained` does, so e.g. a full CLIP folder serves as an image encoder.
    Problems raise `error`, naming the folder.
    """
    from transformers.modeling_utils import no_init_weights

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise error(f"'{folder}' has no config.json: give the folder of a saved transformers model")
    weights = next((folder / n for n in WEIGHT_FILES if (folder / n).is_file()), None)
    if weights is None:
        raise error(f"'{folder}' has none of {', '.join(WEIGHT_FILES)}")
    try:
        config = model_class.config_class.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as e:
        raise error(f"'{folder / 'config.json'}' is not a usable {model_class.__name__} config: {e}") from e
    state_dict = load_tensors(weights, error=error)
    with no_init_weights():  # every weight comes from the file; skip the random init of a large model
        model = model_class(config)
    try:
        missing, _ = model.load_state_dict(state_dict, strict=False)
    except RuntimeError as e:  # shapes that differ from the config's
        raise error(f"'{weights}' does not fit the {model_class.__name__} of '{folder}': {e}") from e
    optional = model_class._keys_to_ignore_on_load_missing or []
    missing = [k for k in missing if not any(re.search(p, k) for p in optional)]
    if missing:
        raise error(
            f"'{weights}' is not a {model_class.__name__} checkpoint for the config in '{folder}': "
            f"missing {', '.join(missing[:3])}{'...' if len(missing) > 3 else ''}"
        )
    return model.float().eval().requires_grad_(False)
