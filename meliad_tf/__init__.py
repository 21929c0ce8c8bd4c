"""meliad-tf: Transformer-XL, Memorizing and Block-Recurrent Transformers in TensorFlow 2.

Importing the package registers every gin configurable under Meliad's names.
"""

from meliad_tf import task_config
