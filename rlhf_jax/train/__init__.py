"""Training stack shared by every method: state, optimiser, generic loop, checkpoints, metrics.

* :mod:`.optim` — ``OptimConfig`` (AdamW, weight-decay mask, warmup + cosine/linear, clipping,
  gradient accumulation), ``make_optimizer``, ``make_schedule``, ``weight_decay_mask``.
* :mod:`.state` — ``TrainState(step, params, opt_state, rng)``, ``create_train_state``.
* :mod:`.loop` — ``LoopConfig``, ``make_train_step``, ``jit_train_step``, ``train`` (the one loop:
  a jitted ``step_fn`` or a host ``iteration``, with ``should_stop`` and ``initial_eval``).
* :mod:`.guard` — the NaN guard every run has: ``guard_step``, ``NonFiniteLossError``,
  ``check_finite`` (a host iteration's rollout checks); the optional divergence guard
  (``LoopConfig.divergence_factor``, ``DivergenceError``).
* :mod:`.checkpoint` — orbax ``Checkpointer`` guarded by a run fingerprint, verified by a SHA-256
  manifest per step with fallback to the previous good step (``CheckpointCorruptError``),
  ``restore_params``, ``atomic_write_json``, ``WorkdirMismatchError``, ``clean_temp_files``.
* :mod:`.metrics` — ``MetricsWriter`` (JSONL + tensorboardX events), ``read_metrics``,
  ``read_tensorboard``, ``plot_metrics``, ``Progress``.
* :mod:`.runs` — ``load_sft_params`` (a finished policy run's params, model config, tokenizer),
  ``write_final_metrics`` / ``is_finished`` (``final_metrics.json``), ``tokenizer_spec``.
* :mod:`.signals` — ``SigtermWatch``, the one SIGTERM / SIGINT helper (the loop's, and an
  evaluation's chained inside it); ``install_process_handler`` / ``Interrupted`` /
  ``stop_requested`` for the launchers (a clean stop from the first line of ``main``).
* :mod:`.config_dicts` — ``ml_collections`` sections for experiment configs and their conversion
  to the frozen dataclasses above.
"""

from rlhf_jax.train import config_dicts, loop
from rlhf_jax.train.checkpoint import (CheckpointCorruptError, Checkpointer, WorkdirMismatchError,
                                       atomic_write_json, check_fingerprint, latest_step, read_json,
                                       restore_params)
from rlhf_jax.train.guard import DivergenceError, NonFiniteLossError, check_finite, guard_step
from rlhf_jax.train.loop import (STOP_FILE, CheckpointableIterator, LoopConfig, TrainResult,
                                 default_token_count, jit_train_step, make_train_step, train)
from rlhf_jax.train.runs import (FINAL_METRICS_FILE, SFTCheckpoint, format_duration, is_finished,
                                 load_sft_params, run_or_reuse, tokenizer_spec, write_final_metrics)
from rlhf_jax.train.metrics import (MetricsWriter, Progress, plot_metrics, read_metrics,
                                    read_tensorboard)
from rlhf_jax.train.signals import SigtermWatch
from rlhf_jax.train.optim import OptimConfig, make_optimizer, make_schedule, weight_decay_mask
from rlhf_jax.train.state import TrainState, abstract_state, create_train_state, state_shardings

__all__ = [
    "Checkpointer",
    "CheckpointCorruptError",
    "DivergenceError",
    "WorkdirMismatchError",
    "atomic_write_json",
    "check_fingerprint",
    "read_json",
    "restore_params",
    "latest_step",
    "CheckpointableIterator",
    "LoopConfig",
    "TrainResult",
    "default_token_count",
    "jit_train_step",
    "make_train_step",
    "train",
    "STOP_FILE",
    "NonFiniteLossError",
    "check_finite",
    "guard_step",
    "guard",
    "MetricsWriter",
    "Progress",
    "plot_metrics",
    "read_metrics",
    "OptimConfig",
    "make_optimizer",
    "make_schedule",
    "weight_decay_mask",
    "TrainState",
    "abstract_state",
    "create_train_state",
    "state_shardings",
    "FINAL_METRICS_FILE",
    "SFTCheckpoint",
    "is_finished",
    "format_duration",
    "run_or_reuse",
    "load_sft_params",
    "tokenizer_spec",
    "write_final_metrics",
    "SigtermWatch",
    "loop",
    "config_dicts",
    "read_tensorboard",]
