"""Dictionary learning: one `Dictionary` interface, a registry of methods keyed by name, and the trainer.

Importing this package registers every built-in method, so `load_dictionary` can find any saved folder.
"""

# registers "relu", "batchtopk", "matryoshka", "jumprelu", "gated", "threshold"
from featureatlas.tasks.dictionary import batchtopk as _batchtopk  # noqa: F401
from featureatlas.tasks.dictionary import gated as _gated  # noqa: F401
from featureatlas.tasks.dictionary import gba as _gba  # noqa: F401  (registers "gba" and "ba")
from featureatlas.tasks.dictionary import jumprelu as _jumprelu  # noqa: F401
from featureatlas.tasks.dictionary import matryoshka as _matryoshka  # noqa: F401
from featureatlas.tasks.dictionary import mp as _mp  # noqa: F401  (registers "mp")
from featureatlas.tasks.dictionary import relu as _relu  # noqa: F401
from featureatlas.tasks.dictionary import snmf as _snmf  # noqa: F401  (registers "snmf")
from featureatlas.tasks.dictionary import threshold as _threshold  # noqa: F401
from featureatlas.tasks.dictionary import topk as _topk  # noqa: F401  (registers "topk")
from featureatlas.tasks.dictionary.base import Dictionary, ForwardOutput
from featureatlas.tasks.dictionary.registry import METHODS, build_dictionary, load_dictionary
from featureatlas.tasks.dictionary.train import TrainResult, train_dictionaries, train_dictionary

__all__ = [
    "METHODS",
    "Dictionary",
    "ForwardOutput",
    "TrainResult",
    "build_dictionary",
    "load_dictionary",
    "train_dictionaries",
    "train_dictionary",
]
