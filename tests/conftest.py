"""Test-suite wide settings.

Eight simulated CPU devices are created for the whole session so that sharding tests can build a
(data=2, fsdp=2, tensor=2) mesh; everything else simply runs on device 0. The flag must be set
before JAX initialises its backends, hence here.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8").strip()

# One persistent XLA compilation cache for the whole suite. Many tests (and the subprocesses the
# end-to-end tests start, which inherit these variables) compile the very same tiny-preset
# programs; on 2 CPU cores compilation dominates the suite's wall time, so a program compiled by
# one xdist worker or subprocess is read back by the others instead of being compiled again. The
# cache key covers the program, the XLA flags and the jax / jaxlib versions, so a hit returns the
# executable a fresh compile would build. A fresh CI clone starts with an empty directory only if
# its temp dir is fresh; RLHF_JAX_TEST_XLA_CACHE=0 turns the cache off.
if os.environ.get("RLHF_JAX_TEST_XLA_CACHE", "1") != "0":
  import tempfile  # pylint: disable=g-import-not-at-top

  os.environ.setdefault(
      "JAX_COMPILATION_CACHE_DIR",
      os.path.join(tempfile.gettempdir(), f"rlhf_jax_test_xla_cache_{os.getuid()}"))
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.05")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")
