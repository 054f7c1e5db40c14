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
