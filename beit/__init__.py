"""beit: BERT pre-training of image Transformers (Bao et al., ICLR 2022) as a production pipeline.

The public API is small and stable; see the README's "Python API" section.
"""

from beit.errors import BeitError
from beit.train.masking import MaskGenerator, RandomMaskGenerator

__all__ = ["BeitError", "MaskGenerator", "RandomMaskGenerator"]
__version__ = "0.1.0"
