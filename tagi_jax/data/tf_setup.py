"""The one way tagi_jax imports TensorFlow: with every accelerator hidden from it.

TensorFlow is here only for the input pipeline (seqio, tf.data, TFRecords, tf.io.gfile), which
runs on the host CPU. Left alone, its first op on a GPU host initialises every visible GPU and
reserves most of their memory, which JAX (preallocating its own share) then cannot have; on a
TPU host a TF build with TPU support would try to open the chips JAX holds. T5X and big_vision
hide the accelerators from TF for the same reason.

``import_tensorflow()`` imports TF and hides its GPUs and TPUs before TF creates its devices
(``tf.config.set_visible_devices`` must run before that, and raises afterwards). It is cheap to
call again: every module that needs TF calls it instead of ``import tensorflow``. Importing this
module does not import TensorFlow.
"""

from __future__ import annotations

import logging
import os
import threading
from types import ModuleType

_HIDDEN_KINDS = ("GPU", "TPU")
_lock = threading.Lock()
_tf: ModuleType | None = None

log = logging.getLogger(__name__)


def import_tensorflow() -> ModuleType:
    """The ``tensorflow`` module, its GPUs and TPUs hidden (idempotent, thread-safe)."""
    global _tf
    if _tf is not None:
        return _tf
    with _lock:
        if _tf is not None:
            return _tf
        # Belt and braces: should TF's devices already exist (TF used before this call), it
        # then grows its GPU memory on demand instead of reserving it all. TF reads it when it
        # creates its GPU devices, so it is set before the import.
        os.environ.setdefault("TF_FORCE_GPU_ALLOW_GROWTH", "true")
        import tensorflow as tf

        for kind in _HIDDEN_KINDS:
            try:
                tf.config.set_visible_devices([], kind)
            except RuntimeError as error:
                # TF's devices were created before this call; hiding is no longer possible.
                visible = tf.config.get_visible_devices(kind)
                if visible:
                    log.warning(
                        "TensorFlow already initialised %s devices %s before "
                        "tagi_jax.data.tf_setup could hide them (%s): import TensorFlow "
                        "through tf_setup.import_tensorflow() first",
                        kind,
                        [d.name for d in visible],
                        error,
                    )
        _tf = tf
        return tf
