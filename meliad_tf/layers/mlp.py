"""Meliad's MLP with its gated residual: residual, bias, full and lstm gates."""

import gin
import tensorflow as tf

from meliad_tf.layers import initializers


_ACTIVATIONS = {None: None, "relu": tf.nn.relu, "tanh": tf.tanh, "gelu": tf.nn.gelu,
                "sigmoid": tf.sigmoid}
GATE_TYPES = ("residual", "bias", "full", "lstm")


def _activation(name, argument):
  if name not in _ACTIVATIONS:
    raise ValueError(f"unknown activation {name!r} for MLP.{argument}; "
                     f"known: {sorted(k for k in _ACTIVATIONS if k)}")
  return _ACTIVATIONS[name]


class Dense(tf.Module):
  """`x @ kernel (+ bias)` with float32 parameters cast to the compute dtype at use."""

  def __init__(self, num_inputs, num_outputs, use_bias=False, kernel_scale=1.0,
               bias_stddev=None, dtype="float32", name=None):
    super().__init__(name=name)
    self.dtype = initializers.as_dtype(dtype)
    with self.name_scope:
      self.kernel = tf.Variable(
          initializers.variance_scaling([num_inputs, num_outputs], kernel_scale), name="kernel")
      if not use_bias:
        self.bias = None
      elif bias_stddev is None:
        self.bias = tf.Variable(tf.zeros([num_outputs]), name="bias")
      else:
        self.bias = tf.Variable(initializers.normal([num_outputs], bias_stddev), name="bias")

  def __call__(self, x):
    y = tf.matmul(x, tf.cast(self.kernel, self.dtype))
    if self.bias is not None:
      y += tf.cast(self.bias, self.dtype)
    return y


@gin.configurable(module="nn_components")
class MLP(tf.Module):
  """Dense layers followed by a gate that merges the output into a residual `state`.

  With `num_layers = 1` it is a single projection `y = x W_out`; with 2, `h = act(x W_0)`
  and `y = h W_out`. The gate then combines `state` and `y`, using `h` (the input to the
  output layer) for the learned gates:
    residual: state + y
    bias:     g = sigmoid(b), state * g + y * (1 - g)   (b per feature, N(0, 0.1))
    full:     g = sigmoid(Dense(h) + 1), state * g + y * (1 - g)
    lstm:     f = sigmoid(Dense_f(h) + 1), i = sigmoid(Dense_i(h) - 1), state * f + y * i

  Args:
    num_input_features: width of x.
    num_output_features: width of y and of the state.
    num_layers: 1 or 2.
    num_hidden_units: hidden width for 2 layers.
    hidden_activation: "relu", "tanh", ... or None.
    final_activation: applied to y before the gate, or None.
    use_bias: biases in the dense layers.
    gate_type: one of GATE_TYPES.
    initializer_scale: scale of the dense layers' initial kernels (variance scaling, fan
      in); the gates' kernels keep their own scale of 0.1, as in Meliad.
    dtype: compute dtype.
  """

  def __init__(self, num_input_features, num_output_features, num_layers=2,
               num_hidden_units=0, hidden_activation="relu", final_activation=None,
               use_bias=False, gate_type="residual", initializer_scale=1.0, dtype="float32",
               name=None):
    super().__init__(name=name)
    if num_layers not in (1, 2):
      raise ValueError(f"MLP.num_layers must be 1 or 2, got {num_layers}")
    if num_layers == 2 and num_hidden_units <= 0:
      raise ValueError(f"MLP.num_hidden_units must be positive with 2 layers, got {num_hidden_units}")
    if gate_type not in GATE_TYPES:
      raise ValueError(f"unknown gate_type {gate_type!r}; known: {GATE_TYPES}")
    if isinstance(initializer_scale, bool) or not initializer_scale > 0:
      raise ValueError(f"MLP.initializer_scale must be positive, got {initializer_scale!r}")
    self.hidden_activation = _activation(hidden_activation, "hidden_activation")
    self.final_activation = _activation(final_activation, "final_activation")
    self.gate_type = gate_type
    self.dtype = initializers.as_dtype(dtype)
    gate_input = num_input_features
    with self.name_scope:
      if num_layers == 2:
        self.hidden = Dense(num_input_features, num_hidden_units, use_bias,
                            kernel_scale=initializer_scale, dtype=dtype, name="hidden0")
        gate_input = num_hidden_units
      else:
        self.hidden = None
      self.output_layer = Dense(gate_input, num_output_features, use_bias,
                                kernel_scale=initializer_scale, dtype=dtype,
                                name="output_layer")
      if gate_type == "bias":
        self.gate_bias = tf.Variable(initializers.normal([num_output_features], 0.1),
                                     name="gate_bias")
      elif gate_type == "full":
        self.gate = Dense(gate_input, num_output_features, use_bias=True, kernel_scale=0.1,
                          bias_stddev=0.1, dtype=dtype, name="gate")
      elif gate_type == "lstm":
        self.forget_gate = Dense(gate_input, num_output_features, use_bias=True,
                                 kernel_scale=0.1, bias_stddev=0.1, dtype=dtype,
                                 name="forget_gate")
        self.input_gate = Dense(gate_input, num_output_features, use_bias=True,
                                kernel_scale=0.1, bias_stddev=0.1, dtype=dtype,
                                name="input_gate")

  def __call__(self, x, state, dropout=None, gates=None):
    """Args: x [..., in]; state [..., out]; dropout: optional function applied to y;
    gates: optional list to which a learned gate appends its mean values, as float32
    scalars: {"keep": mean share of the state kept} and, for "lstm", {"input": mean
    input gate} (the residual connection has no gate and appends nothing).

    Returns the gated output [..., out].
    """
    # Without hidden layers Meliad applies the hidden activation to the input itself.
    h = self.hidden(x) if self.hidden is not None else x
    if self.hidden_activation is not None:
      h = self.hidden_activation(h)
    y = self.output_layer(h)
    if self.final_activation is not None:
      y = self.final_activation(y)
    if dropout is not None:
      y = dropout(y)
    if self.gate_type == "residual":
      return state + y
    keep, write = self.gate_values(h, state.dtype)
    if gates is not None:
      means = {"keep": tf.reduce_mean(tf.cast(keep, tf.float32))}
      if self.gate_type == "lstm":
        means["input"] = tf.reduce_mean(tf.cast(write, tf.float32))
      gates.append(means)
    return state * keep + y * write

  def gate_values(self, h, dtype):
    """(keep, write): the gate's multipliers of the state and of the new value y.

    bias: (g, 1 - g) with g = sigmoid(b) of shape [out]; full: the same with g computed
    from h; lstm: (forget, input) computed from h, each [..., out].
    """
    if self.gate_type == "bias":
      g = tf.cast(tf.sigmoid(self.gate_bias), dtype)
      return g, 1.0 - g
    if self.gate_type == "full":
      g = tf.sigmoid(self.gate(h) + 1.0)
      return g, 1.0 - g
    if self.gate_type == "lstm":
      return tf.sigmoid(self.forget_gate(h) + 1.0), tf.sigmoid(self.input_gate(h) - 1.0)
    raise ValueError(f"the {self.gate_type!r} connection has no gate values")
