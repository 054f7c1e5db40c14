"""Every method starts from a Hugging Face checkpoint (``sources.pretrained``), and runs export back.

A tiny random Llama is built with transformers' config class and saved with its ``save_pretrained``
into the test's folder, with a tokenizer made by the ``tokenizers`` library (Llama 3's chat template
shape, test_hf_tokenizer.write_hf_tokenizer). SFT and DPO start from it through experiments/run.py
on TRL-format conversational JSONL; the runs export with ``python -m rlhf_jax.models.hf export`` and
transformers' logits on the exported folder equal ours. A reward model on the checkpoint's backbone
exports as ``LlamaForSequenceClassification`` and imports back as the same ``RewardModel``.
"""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from offline_fixtures import REPO, TINY_RUN, load_config, override
from test_hf_tokenizer import write_hf_tokenizer

from rlhf_jax import models, train
from rlhf_jax.algorithms import common, sections
from rlhf_jax.data import tokenizers as tk

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

WORDS = ["cat", "dog", "mat", "park", "sky", "blue", "the", "sat", "ran"]


def _ask(i):
  return [{"role": "user", "content": f"say {WORDS[i % 9]} {WORDS[(i * 7) % 9]}"}]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
  """(checkpoint folder, data folder): a random tiny Llama + tokenizer, TRL-format data."""
  root = tmp_path_factory.mktemp("pretrained")
  path = write_hf_tokenizer(str(root / "llama"), "llama3")
  tok = tk.load_tokenizer("hf:" + path)
  torch.manual_seed(0)
  config = transformers.LlamaConfig(vocab_size=320, hidden_size=32, intermediate_size=64,
                                    num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, max_position_embeddings=128,
                                    bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
                                    tie_word_embeddings=False)
  model = transformers.LlamaForCausalLM(config)
  with torch.no_grad():  # norms away from 1 (a missing weight would hide otherwise)
    for name, p in model.named_parameters():
      if "norm" in name:
        p.add_(0.1 * torch.randn_like(p))
  model.save_pretrained(path)
  data = root / "data"
  data.mkdir()
  with open(data / "sft.jsonl", "w") as f:
    for i in range(16):
      answer = [{"role": "assistant", "content": f"{WORDS[i % 9]} {WORDS[(i * 7) % 9]}"}]
      f.write(json.dumps({"prompt": _ask(i), "completion": answer}) + "\n")
  with open(data / "pw.jsonl", "w") as f:
    for i in range(16):  # implicit prompt: full conversations
      f.write(
          json.dumps({
              "chosen": _ask(i) + [{"role": "assistant", "content": WORDS[i % 9]}],
              "rejected": _ask(i) + [{"role": "assistant", "content": WORDS[(i + 1) % 9]}]}) + "\n")
  return path, str(data)


LIMITS = [
    "--config.limits.max_prompt_len=48", "--config.limits.max_response_len=16",
    "--config.limits.buckets=(64,)"]


def _run_py(config, workdir, *flags):
  cmd = [
      sys.executable,
      os.path.join(REPO, "experiments", "run.py"), f"--workdir={workdir}",
      f"--config={os.path.join(REPO, 'experiments', 'configs', config)}", *flags]
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
  out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  return out


def _export(workdir, out):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
  res = subprocess.run([
      sys.executable, "-m", "rlhf_jax.models.hf", "export", f"--workdir={workdir}", f"--out={out}"],
                       capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
  assert res.returncode == 0, res.stdout + res.stderr
  return res.stdout


def _logits_equal_transformers(ckpt_, folder, tol=1e-4):
  hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
  hf_tok = transformers.AutoTokenizer.from_pretrained(folder)
  text = "say cat dog"
  ids = ckpt_.tokenizer.encode(text)
  assert hf_tok(text, add_special_tokens=False)["input_ids"] == ids
  x = np.array([[ckpt_.tokenizer.bos_id] + ids])
  ours = np.asarray(
      models.Transformer(ckpt_.model_config).apply({"params": ckpt_.params},
                                                   jnp.asarray(x)).logits_BxTxV)
  with torch.no_grad():
    ref = hf(torch.tensor(x)).logits.numpy()
  assert np.abs(ours - ref).max() <= tol * np.abs(ref).max()


@pytest.mark.slow
def test_sft_and_dpo_from_pretrained_through_run_py_then_export(ckpt, tmp_path):
  path, data = ckpt
  tiny = [f"--config.{k}={v}" for k, v in TINY_RUN.items() if not k.startswith("eval.")]
  sft_dir = str(tmp_path / "sft")
  _run_py("sft_jsonl.py", sft_dir, f"--config.sources.pretrained=hf:{path}",
          f"--config.data.train_jsonl={data}/sft.jsonl",
          f"--config.data.eval_jsonl={data}/sft.jsonl", "--config.data.batch_size=4",
          "--config.data.eval_batch_size=8", "--config.data.max_eval_examples=8",
          "--config.eval.num_sample_prompts=2", *LIMITS, *tiny)
  fingerprint = train.read_json(os.path.join(sft_dir, train.checkpoint.FINGERPRINT_FILE))
  assert fingerprint["pretrained"]["path"] == os.path.abspath(path)
  sft_ckpt = train.load_sft_params(sft_dir)
  assert isinstance(sft_ckpt.tokenizer.chat_template, tk.JinjaChatTemplate)  # came with it
  assert sft_ckpt.model_config.tie_embeddings is False and sft_ckpt.model_config.vocab_size == 320
  # Its data went through the checkpoint's chat template (the samples' prompts are decoded without
  # the special header tokens; the template's system turn "Year: 4" is text).
  samples = [json.loads(line) for line in open(os.path.join(sft_dir, "samples.jsonl"))]
  assert samples and all(s["prompt"].startswith("system\n\nYear: 4") for s in samples)

  dpo_dir = str(tmp_path / "dpo")
  _run_py("dpo_synthetic.py", dpo_dir, f"--config.sources.pretrained=hf:{path}",
          "--config.data.source=jsonl", f"--config.data.train_jsonl={data}/pw.jsonl",
          f"--config.data.eval_jsonl={data}/pw.jsonl", "--config.data.batch_size=4",
          "--config.eval.num_prompts=2", "--config.eval.max_new_tokens=4", *LIMITS, *tiny)
  final = train.read_json(os.path.join(dpo_dir, train.FINAL_METRICS_FILE))
  assert final["num_train_pairs"] == 16 and "gold_reward" not in final
  assert train.read_json(os.path.join(dpo_dir, train.checkpoint.FINGERPRINT_FILE))["pretrained"]

  for run in (sft_dir, dpo_dir):
    out = str(tmp_path / f"export_{os.path.basename(run)}")
    assert "LlamaForCausalLM" in _export(run, out)
    _logits_equal_transformers(train.load_sft_params(run), out)
    # The exported folder is itself a pretrained source: same config, bit-exact params.
    again = train.load_sft_params("hf:" + out)
    ref = train.load_sft_params(run)
    assert again.model_config == ref.model_config
    flat_a, flat_b = _leaves(again.params), _leaves(ref.params)
    assert len(flat_a) == len(flat_b)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(flat_a, flat_b))


def _leaves(tree):
  import jax
  return [
      leaf for _, leaf in sorted(
          jax.tree_util.tree_flatten_with_path(tree)[0], key=lambda kv: str(kv[0]))]


def test_load_models_from_pretrained_matches_transformers(ckpt):
  path, _ = ckpt
  from rlhf_jax import parallel
  mesh = parallel.mesh_from_config(None)
  loaded = common.load_models(sections.Sources(pretrained="hf:" + path), mesh)
  assert loaded.ref_workdir == "hf:" + os.path.abspath(path) and loaded.sft_step == 0
  assert isinstance(loaded.tokenizer.chat_template, tk.JinjaChatTemplate)
  _logits_equal_transformers(
      train.SFTCheckpoint(loaded.policy_params, loaded.model_config, loaded.tokenizer, 0), path)
  # Only runtime fields of config.model apply; an architecture field is refused, naming it.
  with pytest.raises(ValueError, match=r"config.model.d_model=64 cannot change the architecture"):
    common.load_models(sections.Sources(pretrained=path), mesh,
                       model_section={"preset": "tiny", "d_model": 64, "dtype": None})
  bf16 = common.load_models(sections.Sources(pretrained=path), mesh,
                            model_section={"preset": "tiny", "dtype": "bfloat16"})
  assert bf16.model_config.dtype == "bfloat16" and bf16.model_config.param_dtype == "float32"


def test_sources_pretrained_validation(ckpt, tmp_path):
  path, _ = ckpt
  with pytest.raises(ValueError, match=r"Sources.pretrained=.*has no config.json"):
    sections.Sources(pretrained=str(tmp_path))
  with pytest.raises(ValueError, match=r"Sources.pretrained=.* and sft_workdir=.* are both set"):
    sections.Sources(pretrained=path, sft_workdir=str(tmp_path))
  assert sections.Sources(pretrained=path).policy == "hf:" + os.path.abspath(path)
  assert sections.Sources(pretrained=path).reference == "hf:" + os.path.abspath(path)


def test_tokenizer_larger_than_embedding_is_refused(ckpt, tmp_path):
  path, _ = ckpt
  small = str(tmp_path / "small")
  os.makedirs(small)
  for name in os.listdir(path):
    if name != "config.json":
      os.symlink(os.path.join(path, name), os.path.join(small, name))
  d = json.load(open(os.path.join(path, "config.json")))
  json.dump(d, open(os.path.join(small, "config.json"), "w"))
  # A tokenizer with more ids than the model's 320 rows (the synthetic byte one has 259: fits).
  big = str(tmp_path / "big")
  write_hf_tokenizer(big, "qwen2")
  import tokenizers
  raw = tokenizers.Tokenizer.from_file(os.path.join(big, "tokenizer.json"))
  raw.add_tokens([f"<extra_{i}>" for i in range(40)])
  raw.save(os.path.join(big, "tokenizer.json"))
  with pytest.raises(tk.TokenIdError, match=r"has ids up to 350 but the checkpoint .* has 320 "
                     r"embedding rows"):
    train.load_sft_params("hf:" + small, tokenizer="hf:" + big)


def test_reward_model_exports_as_sequence_classification_and_back(ckpt, tmp_path):
  """An RM on the pretrained backbone (new head): exported, transformers' score = ours − b;
  imported back (scoring.load_reward_model on the folder) it scores exactly as the original."""
  path, _ = ckpt
  import jax
  from rlhf_jax import scoring
  policy = train.load_sft_params("hf:" + path)
  tok = policy.tokenizer
  rm = models.RewardModel(policy.model_config, num_outputs=1)
  x = jnp.asarray([[tok.bos_id] + tok.encode("say cat dog") + [tok.eos_id]])
  fresh = rm.init(jax.random.PRNGKey(1), x, jnp.ones_like(x))["params"]
  from flax.core import meta
  params = models.with_backbone(meta.unbox(fresh), policy.params)
  params["head"]["bias"] = jnp.asarray([0.25], jnp.float32)
  info = scoring.RewardModelInfo(model=__import__("dataclasses").asdict(policy.model_config),
                                 output_names=("reward",),
                                 tokenizer_spec="hf:" + os.path.abspath(path),
                                 tokenizer_fingerprint=tok.fingerprint(), max_prompt_len=48,
                                 max_response_len=16, mean=(0.5,), std=(2.0,), objective="pairwise",
                                 step=3)
  rm_dir = str(tmp_path / "rm")
  scoring.save_reward_model(rm_dir, params, info)
  out = str(tmp_path / "rm_hf")
  assert "LlamaForSequenceClassification" in _export(rm_dir, out)
  hf = transformers.AutoModelForSequenceClassification.from_pretrained(out, dtype=torch.float32)
  ours_raw = float(rm.apply({"params": params}, x, jnp.ones_like(x))[0, 0])
  with torch.no_grad():
    theirs = float(hf.eval()(torch.tensor(np.asarray(x))).logits[0, 0])
  assert abs((theirs + 0.25) - ours_raw) <= 1e-4 * max(1.0, abs(ours_raw))
  # Back: the same RewardModelInfo and params, the same normalised scores.
  original = scoring.load_reward_model(rm_dir)
  back = scoring.load_reward_model(out)
  assert back.info.mean == (0.5,) and back.info.std == (2.0,) and back.info.step == 3
  assert back.info.model_config() == original.info.model_config()
  texts = (["say cat dog", "say sky"], [" cat", " blue sky"])
  np.testing.assert_allclose(scoring.score_texts(back, tok, *texts),
                             scoring.score_texts(original, tok, *texts), rtol=1e-5, atol=1e-6)


def test_export_errors(tmp_path):
  from rlhf_jax.models.hf import export
  with pytest.raises(export.ExportError, match="no such run directory"):
    export.export_run(str(tmp_path / "nope"), str(tmp_path / "out"))


def test_byte_tokenizer_export_equals_byte_tokenizer(tmp_path):
  from rlhf_jax.models.hf import export
  export.write_byte_tokenizer(str(tmp_path))
  hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
  byte = tk.ByteTokenizer()
  for text in ["hello world", "emoji 😀 ok", "日本語", "tab\tnl\n", " lead space"]:
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == byte.encode(text)
    assert hf_tok.decode(byte.encode(text)) == text
  assert (hf_tok.pad_token_id, hf_tok.bos_token_id, hf_tok.eos_token_id) == (0, 1, 2)


@pytest.mark.slow
def test_reward_model_and_ppo_from_pretrained_through_run_py(ckpt, tmp_path):
  """The RM trains on the checkpoint's backbone (new head) and PPO starts from the checkpoint with
  that RM, both through experiments/run.py on conversational data; both fingerprints record it."""
  path, data = ckpt
  with open(os.path.join(data, "prompts.jsonl"), "w") as f:
    for i in range(8):
      f.write(json.dumps({"prompt": _ask(i)}) + "\n")
  rm_dir = str(tmp_path / "rm")
  _run_py("rm_jsonl.py", rm_dir, f"--config.sources.pretrained=hf:{path}",
          "--config.sources.sft_workdir=", f"--config.data.train_jsonl={data}/pw.jsonl",
          f"--config.data.eval_jsonl={data}/pw.jsonl", "--config.data.batch_size=4",
          "--config.loop.num_steps=4", "--config.loop.log_every=2", "--config.loop.eval_every=0",
          "--config.rm.early_stopping_patience=0", "--config.loop.checkpoint_every=2",
          "--config.loop.progress_every_secs=0.0", "--config.optim.warmup_steps=1",
          "--config.eval.num_normalization_prompts=4", "--config.eval.samples_per_prompt=1",
          "--config.eval.sample_batch=4", *LIMITS)
  assert train.read_json(os.path.join(rm_dir, train.checkpoint.FINGERPRINT_FILE))["pretrained"]
  ppo_dir = str(tmp_path / "ppo")
  _run_py("ppo_jsonl.py", ppo_dir, f"--config.sources.pretrained=hf:{path}",
          "--config.sources.sft_workdir=", f"--config.sources.reward_model_workdir={rm_dir}",
          f"--config.data.train_jsonl={data}/prompts.jsonl",
          f"--config.data.eval_prompts_jsonl={data}/prompts.jsonl", "--config.data.batch_size=4",
          "--config.ppo.num_minibatches=2", "--config.ppo.num_ppo_epochs=1",
          "--config.loop.num_steps=2", "--config.loop.eval_every=0",
          "--config.loop.checkpoint_every=2", "--config.eval.num_prompts=4",
          "--config.eval.max_new_tokens=4", *LIMITS)
  assert train.read_json(os.path.join(ppo_dir, train.checkpoint.FINGERPRINT_FILE))["pretrained"]
  final = train.read_json(os.path.join(ppo_dir, train.FINAL_METRICS_FILE))
  assert np.isfinite(final["rm_reward"]) and "gold_reward" not in final
  # The PPO run's policy exports like any policy run (in-process: the CLI is tested above).
  from rlhf_jax.models import hf  # pylint: disable=import-outside-toplevel
  from rlhf_jax.models.hf import export  # pylint: disable=import-outside-toplevel
  out = str(tmp_path / "export_ppo")
  summary = export.export_run(ppo_dir, out)
  assert summary["kind"] == "policy" and summary["architecture"] == "LlamaForCausalLM"
  policy = train.load_sft_params(ppo_dir)
  _logits_equal_transformers(policy, out)
  _, params = hf.load_pretrained(out)
  flat_a, flat_b = _leaves(params), _leaves(policy.params)
  assert len(flat_a) == len(flat_b)
  assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(flat_a, flat_b))
  # ... and it is not the checkpoint it started from (PPO moved it).
  _, start = hf.load_pretrained(path)
  assert any(
      not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(flat_a, _leaves(start)))
