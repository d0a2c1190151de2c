"""beit: BERT pre-training of image Transformers (Bao et al., ICLR 2022) as a production pipeline.

The public API is small and stable; see the README's "Python API" section.
"""

from beit.errors import BeitError
from beit.model import create_model
from beit.model.checkpoint import load_checkpoint, save_checkpoint
from beit.train.masking import MaskGenerator, RandomMaskGenerator

__all__ = [
    "BeitError",
    "MaskGenerator",
    "RandomMaskGenerator",
    "create_model",
    "load_checkpoint",
    "load_tokenizer",
    "save_checkpoint",
]
__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy: `import beit` (and so pretraining) never imports the tokenizers and the dall_e package.
    if name == "load_tokenizer":
        from beit.tokenize.loading import load_tokenizer

        return load_tokenizer
    raise AttributeError(f"module 'beit' has no attribute {name!r}")
