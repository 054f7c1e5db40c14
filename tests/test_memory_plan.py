"""Memory plans (``parallel.memory_plan``, ``algorithms.plan``): compiled, never allocated.

The resident bytes are checked against the hand formula (params 4·N bytes, AdamW two moments the
same size, split over fsdp), XLA's argument size against the sharded state + batch, and the
launcher path (``registry.run``) refuses a tiny ``mesh.device_memory_gb`` before it writes or
allocates anything. Tiny preset, one shape per planner.
"""

import os

import flax.linen as nn
import jax
import ml_collections
import pytest

from rlhf_jax import cli, models, parallel
from rlhf_jax.algorithms import plan, registry
from rlhf_jax.algorithms.offline import plan as offline_plan
from rlhf_jax.algorithms.online import plan as online_plan
from rlhf_jax.algorithms.online.config import PPOConfig
from rlhf_jax.algorithms.reward import plan as reward_plan
from rlhf_jax.models import lora as lora_lib
from rlhf_jax.parallel import memory_plan as mp

from offline_fixtures import SFT_OVERRIDES, load_config, override

CFG = models.get_model_config("tiny", vocab_size=260)


def _mesh(fsdp=2, tensor=1):
  return parallel.make_mesh(parallel.MeshConfig(data=1, fsdp=fsdp, tensor=tensor),
                            devices=jax.devices()[:fsdp * tensor])


@pytest.fixture(scope="module")
def sft_fsdp2():
  return plan.sft_plan(CFG, _mesh(), batch_size=4, seq_len=32)


def test_sft_resident_bytes_are_the_hand_formula(sft_fsdp2):
  # Every tiny param has an `embed` axis, so fsdp=2 halves each one exactly.
  params = CFG.num_params() * 4 // 2
  assert sft_fsdp2.resident["policy params"] == params
  # AdamW: mu and nu like the params, plus step counters (a few int32 scalars, replicated).
  assert 0 <= sft_fsdp2.resident["optimizer state"] - 2 * params <= 64
  assert sft_fsdp2.gradients == params


def test_sft_xla_sizes_agree_with_the_shardings(sft_fsdp2):
  step = sft_fsdp2.phases["train_step"]
  batch = 3 * (4 // 2) * 32 * 4  # tokens / mask / loss_mask int32, 2 rows per device
  assert step.argument == step.resident_args + batch
  assert step.alias == step.resident_args  # the donated state is updated in place
  assert step.temp > sft_fsdp2.gradients  # gradients + activations live in XLA's temp
  assert sft_fsdp2.peak_bytes == sft_fsdp2.resident_bytes + step.transient
  flops = 4 * 32 * (6 * CFG.num_params() + 6 * CFG.n_layers * 32 * CFG.d_model)
  assert sft_fsdp2.flops_per_step == flops
  cats = sft_fsdp2.categories()
  assert cats["activations"] == step.temp - sft_fsdp2.gradients and cats["kv cache"] == 0


def test_check_refuses_over_budget_with_the_plan():
  fake = mp.MemoryPlan("sft", {"data": 1, "fsdp": 2, "tensor": 1}, {"policy params": 3 * mp.GIB},
                       {"train_step": mp.PhaseMemory(0, 0, 0, mp.GIB, 0, 0.0)})
  fake.check(4.5)  # 4 GiB fits
  fake.check(0)  # 0 = no limit
  with pytest.raises(mp.PlanExceedsMemoryError, match=r"peak is 4.00 GiB per device") as err:
    fake.check(3.5)
  assert "resident: policy params 3.00 GiB" in str(err.value)


def test_dpo_counts_the_reference_and_its_forward():
  result = offline_plan.dpo_plan(CFG, _mesh(), batch_size=2, seq_len=32)
  assert result.resident["reference params"] == result.resident["policy params"]
  assert set(result.phases) == {"train_step", "reference"}
  # the reference forward keeps no gradients: less temp than the train step
  assert result.phases["reference"].temp < result.phases["train_step"].temp


@pytest.mark.slow
def test_ppo_plan_has_every_model_and_phase():
  ppo = PPOConfig(rollout_batch_size=4, max_new_tokens=8, num_minibatches=2, num_ppo_epochs=1)
  result = online_plan.ppo_plan(CFG, _mesh(), config=ppo, prompt_len=8)
  params = CFG.num_params() * 4 // 2
  assert result.resident["policy params"] == result.resident["reference params"] == params
  assert set(result.phases) == {"generate", "score", "logprobs", "update"}
  # k and v: [L, 4 rows / 2 shards, K, 8 + 8 slots, H] float32 each
  assert result.kv_cache == 2 * CFG.n_layers * 2 * CFG.num_kv_heads * 16 * CFG.head_size * 4
  assert result.peak_bytes >= result.resident_bytes + result.phases["update"].transient


def _sft_config(tmp_path, gb):
  config = override(
      load_config("sft_synthetic"), {
          **SFT_OVERRIDES, "loop.num_steps": 2, "loop.log_every": 1, "eval.num_sample_prompts": 0,
          "mesh.device_memory_gb": gb})
  return config, str(tmp_path / "run")


def test_launcher_refuses_before_allocating(tmp_path):
  config, workdir = _sft_config(tmp_path, 1e-4)
  live = len(jax.live_arrays())
  with pytest.raises(mp.PlanExceedsMemoryError) as err:
    registry.run("sft", config, workdir)
  assert len(jax.live_arrays()) == live  # compiled, not run: no device buffer was created
  assert not os.path.exists(workdir)  # nothing written either
  line, status = cli.describe_failure(err.value, workdir)
  assert status == 2 and "\n" not in line
  assert line.startswith("error: PlanExceedsMemoryError: config.mesh.device_memory_gb=0.0001: "
                         "the planned peak is")
  assert "memory plan (sft, per device, mesh data 1 x fsdp 1 x tensor 1)" in line


def test_unplanned_method_is_refused_by_name(tmp_path):
  # every registered trainer is planned (iterated RLHF through its round stages' own configs), so
  # a method added by a user is what reaches this message
  config = ml_collections.ConfigDict({"method": "my_method", "mesh": {"device_memory_gb": 80.0}})
  with pytest.raises(
      ValueError, match=r"no memory plan for method 'my_method'; planned: sft \| dpo \| "
      r"kto \| listwise \| raft \| best_of_n \| reward_model \| ppo \| online_dpo"):
    plan.check_config(config)


@pytest.mark.parametrize("judge", ["reward_model", "annotator"])
def test_online_dpo_plan_has_its_four_phases_and_the_rm_only_when_it_judges(judge):
  odpo = online_plan.online_dpo.OnlineDPOConfig(judge=judge)
  result = online_plan.online_dpo_plan(CFG, _mesh(), batch_size=2, prompt_len=8, response_len=8,
                                       config=odpo)
  phases = {"generate", "reference", "train_step"
           } | ({"score"} if judge == "reward_model" else set())
  assert set(result.phases) == phases
  assert ("reward model params" in result.resident) == (judge == "reward_model")
  assert result.resident["reference params"] == result.resident["policy params"]
  # k and v: [L, 4 rows / 2 shards, K, 8 + 8 slots, H] float32 each
  assert result.kv_cache == 2 * CFG.n_layers * 2 * CFG.num_kv_heads * 16 * CFG.head_size * 4


def test_raft_and_best_of_n_plan_the_sampler_the_scores_and_raft_its_step():
  raft = offline_plan.raft_plan(CFG, _mesh(), batch_size=2, chunk_prompts=2, num_samples=3,
                                prompt_len=8, response_len=8)
  assert set(raft.phases) == {"sample", "score", "train_step"}
  assert set(raft.resident) == {
      "policy params", "optimizer state", "reference params", "reward model params"}
  # k and v: [L, 6 rows / 2 shards, K, 8 + 8 slots, H] float32 each
  assert raft.kv_cache == 2 * CFG.n_layers * 3 * CFG.num_kv_heads * 16 * CFG.head_size * 4
  assert raft.phases["sample"].temp >= raft.kv_cache  # the sampler's temp holds its cache
  score = raft.phases["score"]  # 6 rows of 16 tokens, 3 per device, tokens + mask int32
  assert score.argument - score.resident_args == 2 * 3 * 16 * 4
  bon = offline_plan.best_of_n_plan(CFG, _mesh(), chunk_prompts=2, num_samples=3, prompt_len=8,
                                    response_len=8)
  assert set(bon.phases) == {"sample", "score"} and bon.kv_cache == raft.kv_cache
  assert set(bon.resident) == {"policy params", "reward model params"}
  assert bon.peak_bytes == bon.resident_bytes + max(p.transient for p in bon.phases.values())


def test_kto_counts_the_reference_and_its_kl_rows():
  result = offline_plan.kto_plan(CFG, _mesh(), batch_size=2, seq_len=32)
  assert result.resident["reference params"] == result.resident["policy params"]
  assert set(result.phases) == {"train_step", "reference"}
  step = result.phases["train_step"]
  # 2 examples + 2 KL rows: 2 rows per device of tokens / mask / loss_mask int32, ref_logps f32;
  # valid / label f32, 1 per device
  assert step.argument - step.resident_args == 3 * 2 * 32 * 4 + 2 * 4 + 2 * 4
  assert result.flops_per_step == mp.train_flops(CFG, 4 * 32, 32) * 4 / 3


def test_listwise_plan_is_the_policy_alone_over_every_candidate_row():
  result = offline_plan.listwise_plan(CFG, _mesh(), batch_size=2, seq_len=32, num_candidates=3)
  assert set(result.resident) == {"policy params", "optimizer state"}
  step = result.phases["train_step"]
  # 2 lists x 3 candidates = 6 rows, 3 per device, of tokens / mask / loss_mask int32; the
  # candidate mask and scores [2, 3] f32, one list per device
  assert step.argument - step.resident_args == 3 * 3 * 32 * 4 + 2 * 3 * 4
  assert result.flops_per_step == mp.train_flops(CFG, 6 * 32, 32)


@pytest.mark.parametrize("objective,rows,outputs", [("bradley_terry", 4, 1), ("likert", 2, 1),
                                                    ("multi_attribute", 2, 3)])
def test_reward_model_plan_counts_its_head_and_the_objectives_rows(objective, rows, outputs):
  rm = reward_plan.trainer.RMConfig(
      objective=objective, attribute_weights=(1.0,) * outputs if objective == "multi_attribute" else
      ())
  result = reward_plan.reward_model_plan(CFG, _mesh(), batch_size=2, seq_len=32, rm=rm)
  rm_params = models.abstract_params(models.RewardModel(CFG, num_outputs=outputs))
  nbytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(rm_params))
  # every kernel (the head's [D, K] too: its embed axis) halved over fsdp=2; the head's K biases
  # replicated
  bias = outputs * 4
  assert result.resident["reward model params"] == (nbytes - bias) // 2 + bias
  assert "reference params" not in result.resident and set(result.phases) == {"train_step"}
  step = result.phases["train_step"]
  # tokens and mask int32, rows split over fsdp=2 (the RM never reads loss_mask: jit drops it),
  # plus a rating (likert) or 3 attribute ratings (multi-attribute) f32 per row
  extra = {"bradley_terry": 0, "likert": 4, "multi_attribute": 12}[objective]
  assert step.argument - step.resident_args == 2 * (rows // 2) * 32 * 4 + extra
  assert result.flops_per_step == mp.train_flops(CFG, rows * 32, 32)


def test_reward_model_config_over_budget_is_refused_with_its_plan():
  config = load_config("rm_synthetic")
  config.rm.init, config.model.preset, config.sources.sft_workdir = "scratch", "tiny", ""
  config.mesh.device_memory_gb = 1e-4
  with pytest.raises(mp.PlanExceedsMemoryError, match=r"memory plan \(reward_model, per device"):
    plan.check_config(config)
  config.rm.objective = "plackett_luce"
  with pytest.raises(ValueError, match=r"no memory plan for rm.objective='plackett_luce'"):
    plan.check_config(config)


@pytest.mark.slow
def test_launcher_runs_within_budget(tmp_path):
  config, workdir = _sft_config(tmp_path, 80.0)
  final = registry.run("sft", config, workdir)
  assert final["step"] == 2


@pytest.mark.parametrize("name", ["raft_synthetic", "best_of_n_synthetic"])
def test_raft_and_best_of_n_configs_reach_their_planner(name):
  config = load_config(name)
  for key in config.sources:  # no runs to read: the policy is CFG, the reward model its shape
    if isinstance(config.sources[key], str):
      config.sources[key] = ""
  config.data.batch_size = 2
  if name == "raft_synthetic":
    config.raft.prompts_per_round, config.raft.samples_per_prompt = 2, 2
  else:
    config.bon.chunk_prompts, config.bon.ns = 2, (1, 2)
  result = offline_plan.plan(config, CFG, _mesh())
  assert result.method == config.method and "sample" in result.phases
  assert f"{2} prompts x {2}" in " ".join(result.notes)


def test_lora_plans_hold_one_base_and_train_the_adapters_only():
  lora = lora_lib.LoraConfig(rank=4)
  adapters = lora_lib.count_params(
      nn.meta.unbox(lora_lib.abstract_adapters(models.Transformer(CFG), lora))) * 4
  full = plan.sft_plan(CFG, _mesh(), batch_size=4, seq_len=32)
  sft = plan.sft_plan(CFG, _mesh(), batch_size=4, seq_len=32, lora=lora)
  # the base (halved over fsdp=2) + the adapters; AdamW moments and gradients for adapters only
  assert sft.gradients < adapters < full.gradients
  assert sft.resident["policy params"] == full.resident["policy params"] + sft.gradients
  assert 0 <= sft.resident["optimizer state"] - 2 * sft.gradients <= 64
  dpo = offline_plan.dpo_plan(CFG, _mesh(), batch_size=2, seq_len=32, lora=lora)
  assert "reference params" not in dpo.resident  # the reference is the frozen base itself
  assert set(dpo.phases) == {"train_step", "reference"} and dpo.gradients == sft.gradients
  assert dpo.resident_bytes < offline_plan.dpo_plan(CFG, _mesh(), batch_size=2,
                                                    seq_len=32).resident_bytes / 2


def test_lora_config_plans_for_dpo_and_is_refused_by_name_for_raft():
  config = load_config("dpo_synthetic")
  for key in config.sources:
    if isinstance(config.sources[key], str):
      config.sources[key] = ""
  config.model = ml_collections.ConfigDict({"preset": "tiny", "vocab_size": 260})
  config.lora.enabled, config.mesh.device_memory_gb = True, 1e-4
  with pytest.raises(mp.PlanExceedsMemoryError, match=r"memory plan \(dpo, per device"):
    plan.check_config(config)
  raft = load_config("raft_synthetic")
  raft.lora.enabled, raft.mesh.device_memory_gb = True, 80.0
  with pytest.raises(
      ValueError, match=r"LoRA runs of 'raft' are not planned; planned with LoRA: "
      r"sft \| dpo \| kto \| listwise"):
    plan.check_config(raft)
