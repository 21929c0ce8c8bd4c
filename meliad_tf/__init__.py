"""meliad-tf: Transformer-XL, Memorizing and Block-Recurrent Transformers in TensorFlow 2.

Importing the package registers every gin configurable under Meliad's names.
"""

from meliad_tf import decoder
from meliad_tf import layer
from meliad_tf import memory
from meliad_tf import mlp
from meliad_tf import model
from meliad_tf import norms
from meliad_tf import optimizer
from meliad_tf import schedules
from meliad_tf import task_config
from meliad_tf import trainer
