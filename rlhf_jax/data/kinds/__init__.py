"""Record kinds: one module per kind, registered by name (see :mod:`.base` for what a kind is).

Adding a kind (as KTO's ``unpaired`` ``{"prompt", "completion", "label"}`` was): write a module that
builds a ``base.RecordKind`` and calls ``base.register_kind``, then add one import line below.
Every reader / writer (``records``, ``dataset``, ``batching``, ``synthetic_files``) then knows it.
"""

from rlhf_jax.data.kinds.base import (ParseOptions, RecordError, RecordKind, get_kind, kind_names,
                                      register_kind, take_examples)

# The built-in kinds (importing a module registers it), in this order.
from rlhf_jax.data.kinds import prompt  # noqa: E402,F401
from rlhf_jax.data.kinds import sft  # noqa: E402,F401
from rlhf_jax.data.kinds import pairwise  # noqa: E402,F401
from rlhf_jax.data.kinds import ranked  # noqa: E402,F401
from rlhf_jax.data.kinds import rated  # noqa: E402,F401
from rlhf_jax.data.kinds import attributes  # noqa: E402,F401
from rlhf_jax.data.kinds import unpaired  # noqa: E402,F401

__all__ = [
    "ParseOptions", "RecordError", "RecordKind", "get_kind", "kind_names", "register_kind",
    "take_examples"]
