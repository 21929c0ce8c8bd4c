"""SIGTERM and SIGINT as requests to stop the training loop at a step boundary."""

import signal
import threading

from absl import logging


class StopRequests:
  """While active (in the main thread), SIGTERM and SIGINT ask the loop to stop.

  The first signal is recorded and the previous handlers come back, so that a second one
  acts at once (SIGTERM ends the process, SIGINT raises KeyboardInterrupt).
  """

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.signal_number = None
    self._previous = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
    return self

  def _handle(self, signal_number, frame):
    del frame
    self.signal_number = signal_number
    self._restore_handlers()
    logging.warning("received %s: stopping at the next step boundary, after a checkpoint "
                    "(send it again to stop at once)", signal.Signals(signal_number).name)

  def _restore_handlers(self):
    for signal_number, handler in self._previous.items():
      # None: a handler not installed from Python; the default is the closest stand-in.
      signal.signal(signal_number, signal.SIG_DFL if handler is None else handler)
    self._previous = {}

  def __exit__(self, *exc_info):
    self._restore_handlers()
