"""`SamplingConfig`: static (hashable) decoding settings; one jit compile per config and shape."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """Decoding settings.

  Attributes:
    max_new_tokens: response length budget R (the response arrays are [B, R]).
    temperature: logits are divided by it before top-k / top-p (ignored when greedy).
    top_k: keep the k most likely tokens (0 disables).
    top_p: nucleus sampling, keep the smallest prefix of the tokens in descending order (ties by
      index) whose probability mass reaches top_p (1.0 disables); see `apply_top_p`.
    greedy: argmax decoding (temperature / top-k / top-p are then irrelevant).
    num_samples: samples per prompt; output rows are prompt-major (row i * num_samples + j).
    eos_id: end-of-sequence id; a row stops after emitting it (None: only `stop_ids` stop).
    stop_ids: extra ids that also end a row (the stop token itself is kept in the response).
    pad_id: written after a row has stopped (where response_mask is 0).
  """

  max_new_tokens: int
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  greedy: bool = False
  num_samples: int = 1
  eos_id: int | None = None
  stop_ids: tuple[int, ...] = ()
  pad_id: int = 0

  def __post_init__(self):
    # Lists are accepted for convenience but stored as a tuple so the config stays hashable.
    object.__setattr__(self, "stop_ids", tuple(int(i) for i in self.stop_ids))
    for name in ("max_new_tokens", "num_samples"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"SamplingConfig.{name}={value!r} must be a positive int")
    if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
      raise ValueError(f"SamplingConfig.top_k={self.top_k!r} must be an int >= 0 (0 disables)")
    if not self.temperature > 0:
      raise ValueError(f"SamplingConfig.temperature={self.temperature!r} must be > 0; "
                       "use greedy=True for argmax decoding")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"SamplingConfig.top_p={self.top_p!r} must be in (0, 1] (1.0 disables)")
    if self.eos_id is not None and self.eos_id < 0:
      raise ValueError(f"SamplingConfig.eos_id={self.eos_id!r} must be >= 0 or None")
    if any(i < 0 for i in self.stop_ids):
      raise ValueError(f"SamplingConfig.stop_ids={self.stop_ids!r} must be ids >= 0")
    if self.pad_id < 0:
      raise ValueError(f"SamplingConfig.pad_id={self.pad_id!r} must be >= 0")

  @property
  def all_stop_ids(self) -> tuple[int, ...]:
    return ((self.eos_id,) if self.eos_id is not None else ()) + self.stop_ids
