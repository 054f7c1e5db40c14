"""Hugging Face tokenizer directories: specials from tokenizer_config.json / special_tokens_map.json /
generation_config.json, and Jinja chat templates rendered exactly as transformers renders them.

Fixtures are written by the tests: a small byte-level BPE trained with the ``tokenizers`` library,
plus a ``tokenizer_config.json`` whose ``chat_template`` has the shape of Llama 3.1's, Qwen2's or
Gemma's. ``transformers.AutoTokenizer.from_pretrained`` on the same directory is the reference:
rendered text and ids must be equal.
"""

import json
import os

import pytest

from rlhf_jax.data import tokenizers as tk

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

# Templates of the shapes the checkpoints ship (whitespace control, bos_token, trim, raise_exception,
# loop.first / loop.index0, namespace, strftime_now, tojson, add_generation_prompt).
LLAMA3_TEMPLATE = ("{{- bos_token }}\n"
                   "{%- if not date_string is defined %}\n"
                   "    {%- set date_string = strftime_now(\"%Y\") %}\n"
                   "{%- endif %}\n"
                   "{%- if messages[0]['role'] == 'system' %}\n"
                   "    {%- set system_message = messages[0]['content']|trim %}\n"
                   "    {%- set messages = messages[1:] %}\n"
                   "{%- else %}\n"
                   "    {%- set system_message = \"\" %}\n"
                   "{%- endif %}\n"
                   "{{- \"<|start_header_id|>system<|end_header_id|>\\n\\n\" }}\n"
                   "{{- \"Year: \" + (date_string | length | string) + \"\\n\\n\" }}\n"
                   "{{- system_message }}\n"
                   "{{- \"<|eot_id|>\" }}\n"
                   "{%- for message in messages %}\n"
                   "    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
                   "+ message['content'] | trim + '<|eot_id|>' }}\n"
                   "{%- endfor %}\n"
                   "{%- if add_generation_prompt %}\n"
                   "    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n"
                   "{%- endif %}\n")

QWEN2_TEMPLATE = (
    "{%- set ns = namespace(meta=[]) %}\n"
    "{%- for message in messages %}\n"
    "    {%- if message.meta is defined %}{%- set ns.meta = ns.meta + [message.meta] %}{%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if ns.meta %}{{- '<|im_start|>system\\n' + (ns.meta | tojson) + '<|im_end|>\\n' }}\n"
    "{%- elif messages[0]['role'] != 'system' %}\n"
    "    {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    "    {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n")

GEMMA_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if (message['role'] == 'assistant') %}{% set role = 'model' %}"
    "{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}")

SPECIALS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
    "<|eot_id|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>", "<bos>", "<eos>",
    "<start_of_turn>", "<end_of_turn>"]

FAMILIES = {
    "llama3": dict(template=LLAMA3_TEMPLATE, bos="<|begin_of_text|>", eos="<|eot_id|>", pad=None,
                   generation={"bos_token_id": None, "eos_token_id": None}),
    "qwen2": dict(
        template=QWEN2_TEMPLATE, bos=None, eos="<|im_end|>", pad="<|endoftext|>", generation={
            "bos_token_id": "<|endoftext|>", "eos_token_id": ["<|im_end|>", "<|endoftext|>"]}),
    "gemma": dict(template=GEMMA_TEMPLATE, bos="<bos>", eos="<eos>", pad="<pad>", generation={}),}

CHATS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "user", "content": " hello  "}, {"role": "assistant", "content": "hi there\n"},
     {"role": "user", "content": "and the cat? 😀"}],
    [{"role": "user", "content": "a <tag> & b", "meta": {"k": "<v>&"}},
     {"role": "assistant", "content": "ok"}],]


def _train_bpe():
  from tokenizers import decoders, models, pre_tokenizers, trainers
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  corpus = ["the cat sat on the mat", "What is 2+2? hello hi there", "system user assistant"] * 30
  tok.train_from_iterator(corpus, trainer=trainer)
  return tok


def write_hf_tokenizer(directory, family, *, template=None, extra_config=None):
  """A tokenizer directory of ``family``'s shape (see FAMILIES); returns its path."""
  spec = FAMILIES[family]
  os.makedirs(directory, exist_ok=True)
  tok = _train_bpe()
  tok.save(os.path.join(directory, "tokenizer.json"))
  config = {
      "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": spec["bos"],
      "eos_token": spec["eos"], "pad_token": spec["pad"],
      "chat_template": spec["template"] if template is None else template, "model_max_length": 512,
      **(extra_config or {})}
  with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
    json.dump(config, f)
  generation = {
      k: ([tok.token_to_id(t) for t in v] if isinstance(v, list) else
          (tok.token_to_id(v) if isinstance(v, str) else v)) for k, v in spec["generation"].items()}
  if generation:
    with open(os.path.join(directory, "generation_config.json"), "w") as f:
      json.dump(generation, f)
  return str(directory)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_dir(request, tmp_path_factory):
  return request.param, write_hf_tokenizer(tmp_path_factory.mktemp(request.param), request.param)


def _hf_ids(hf, messages, add_generation_prompt):
  out = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt,
                               return_dict=False)
  return list(out)


def test_chat_template_text_and_ids_equal_transformers(family_dir):
  family, path = family_dir
  ours = tk.load_tokenizer("hf:" + path)
  hf = transformers.AutoTokenizer.from_pretrained(path)
  assert isinstance(ours.chat_template, tk.JinjaChatTemplate)
  checked = 0
  for messages in CHATS:
    for gen in (False, True):
      text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
      assert ours.apply_chat_template(messages, add_generation_prompt=gen) == text
      hf_ids = _hf_ids(hf, messages, gen)
      assert ours.encode(text) == hf_ids
      # The data path: the dataset writes BOS as an id, the rendered text has no leading BOS.
      bos = [ours.bos_id] if FAMILIES[family]["bos"] else []
      assert bos + ours.encode(ours.chat_template.render(messages, gen)) == hf_ids
      checked += 1
  assert checked == 2 * len(CHATS)
  # Specials as transformers reads them.
  assert ours.eos_id == hf.eos_token_id
  if hf.bos_token_id is not None:
    assert ours.bos_id == hf.bos_token_id
  if hf.pad_token_id is not None:
    assert ours.pad_id == hf.pad_token_id
  assert ours.vocab_size == len(hf)


def test_qwen2_specials_from_generation_config(tmp_path):
  path = write_hf_tokenizer(tmp_path / "q", "qwen2")
  tok = tk.load_tokenizer("hf:" + path)
  raw = tokenizers.Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
  # No bos_token in the config: generation_config.json's bos_token_id (<|endoftext|>).
  assert tok.bos_id == raw.token_to_id("<|endoftext|>")
  assert tok.eos_id == raw.token_to_id("<|im_end|>")
  assert tok.stop_ids == (raw.token_to_id("<|im_end|>"), raw.token_to_id("<|endoftext|>"))
  assert tok.chat_template.token("bos_token") == ""


def test_special_tokens_map_and_added_token_objects(tmp_path):
  path = write_hf_tokenizer(
      tmp_path / "l", "llama3", extra_config={
          "bos_token": {"__type": "AddedToken", "content": "<|begin_of_text|>", "special": True},
          "eos_token": "<|end_of_text|>"})
  with open(os.path.join(path, "special_tokens_map.json"), "w") as f:
    json.dump({"eos_token": {"content": "<|eot_id|>", "special": True}}, f)
  ours = tk.load_tokenizer("hf:" + path)
  hf = transformers.AutoTokenizer.from_pretrained(path)
  # No added_tokens_decoder in the config: the map overrides it, as in transformers.
  assert ours.eos_id == hf.eos_token_id == ours._tok.token_to_id("<|eot_id|>")
  assert ours.bos_id == hf.bos_token_id
  assert ours.chat_template.token("eos_token") == "<|eot_id|>"


def test_chat_template_jinja_file_wins_and_named_templates(tmp_path):
  path = write_hf_tokenizer(tmp_path / "g", "gemma")
  with open(os.path.join(path, "chat_template.jinja"), "w") as f:
    f.write("{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}")
  ours = tk.load_tokenizer("hf:" + path)
  hf = transformers.AutoTokenizer.from_pretrained(path)
  msgs = CHATS[1]
  assert ours.apply_chat_template(msgs) == hf.apply_chat_template(msgs, tokenize=False)
  assert ours.apply_chat_template(msgs).startswith("[user]  hello")
  # A list of named templates: the 'default' one; none named 'default' is an error.
  named = write_hf_tokenizer(
      tmp_path / "n", "qwen2", template=[{"name": "default", "template": QWEN2_TEMPLATE},
                                         {"name": "tool_use", "template": "x"}])
  assert tk.load_tokenizer("hf:" + named).apply_chat_template(CHATS[0]).startswith("<|im_start|>")
  bad = write_hf_tokenizer(tmp_path / "b", "qwen2", template=[{"name": "rag", "template": "x"}])
  with pytest.raises(ValueError, match=r"tokenizer_config.json: chat_template lists.*'rag'"):
    tk.load_tokenizer("hf:" + bad)


def test_template_errors_are_clear(tmp_path):
  # A syntax error fails at load and names the file and the template line.
  bad = write_hf_tokenizer(tmp_path / "s", "llama3",
                           template="{% for m in messages %}\n{{ m.content }\n{% endfor %}")
  with pytest.raises(tk.ChatTemplateError,
                     match=r"tokenizer_config.json chat_template: .*does not compile.*line 2"):
    tk.load_tokenizer("hf:" + bad)
  # raise_exception in the template: a ChatTemplateError carrying the template's message.
  tok = tk.load_tokenizer("hf:" + write_hf_tokenizer(tmp_path / "g", "gemma"))
  with pytest.raises(tk.ChatTemplateError, match="System role not supported"):
    tok.apply_chat_template([{"role": "system", "content": "x"}, {"role": "user", "content": "y"}])
  with pytest.raises(tk.ChatTemplateError, match="roles must alternate"):
    tok.apply_chat_template([{"role": "assistant", "content": "x"}])
  # The sandbox: no attribute access to Python internals.
  evil = write_hf_tokenizer(tmp_path / "e", "qwen2", template="{{ messages.__class__.__mro__ }}")
  with pytest.raises(Exception, match="unsafe|access"):
    tk.load_tokenizer("hf:" + evil).apply_chat_template(CHATS[0])


def test_continuation_and_prompt_like_trl(tmp_path):
  """prompt / completion split as TRL's apply_chat_template does; the final EOS is dropped (the
  dataset writes it as an id); a turn end that is not EOS stays."""
  prompt = [{"role": "user", "content": "What is 2+2?"}]
  completion = [{"role": "assistant", "content": "4"}]
  qwen = tk.load_tokenizer("hf:" + write_hf_tokenizer(tmp_path / "q", "qwen2"))
  hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "q"))
  p = hf.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
  full = hf.apply_chat_template(prompt + completion, tokenize=False)
  assert full[len(p):] == "4<|im_end|>\n"  # TRL's completion
  assert qwen.chat_template.continuation(prompt, completion) == "4"
  assert qwen.chat_template.render_prompt(prompt) == p
  gemma = tk.load_tokenizer("hf:" + write_hf_tokenizer(tmp_path / "g", "gemma"))
  assert gemma.chat_template.continuation(prompt, completion) == "4<end_of_turn>\n"
  assert gemma.chat_template.render_prompt(prompt) == "<start_of_turn>user\nWhat is 2+2?" \
      "<end_of_turn>\n<start_of_turn>model\n"  # no leading <bos>: the dataset writes it
  # A prompt ending with an assistant turn is continued (transformers' continue_final_message).
  hf_g = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "g"))
  partial = prompt + [{"role": "assistant", "content": "The answer is "}]
  want = hf_g.apply_chat_template(partial, tokenize=False, continue_final_message=True)
  assert "<bos>" + gemma.chat_template.render_prompt(partial) == want
  assert want.endswith("The answer is")  # Gemma trims content: the trailing space goes too


def test_legacy_chat_template_and_fingerprints_unchanged(tmp_path):
  # The default template: a one-message completion is its content (what the sft kind trained on).
  byte = tk.ByteTokenizer()
  msgs = [{"role": "user", "content": "q"}]
  assert byte.chat_template.continuation(msgs, [{"role": "assistant", "content": "a"}]) == "a"
  assert byte.chat_template.continuation(msgs, [{"role": "assistant", "content": "a"},
                                                {"role": "user", "content": "b"}]) == \
      "a\n<|user|>\nb\n"
  # A bare tokenizer.json keeps its fingerprint rule (file hash only): a directory tokenizer with
  # the same tokenizer.json and a config has another one (the specials / template may differ).
  path = write_hf_tokenizer(tmp_path / "l", "llama3")
  bare = tk.load_tokenizer(os.path.join(path, "tokenizer.json"))
  assert bare._file_hash == tk._file_sha256(os.path.join(path, "tokenizer.json"))
  assert isinstance(bare.chat_template, tk.ChatTemplate)
  assert tk.load_tokenizer("hf:" + path).fingerprint() != bare.fingerprint()
  assert tk.load_tokenizer("hf:" + path).fingerprint() == tk.load_tokenizer(path +
                                                                            "/").fingerprint()


def test_vocab_larger_than_embedding_is_refused(tmp_path):
  tok = tk.load_tokenizer("hf:" + write_hf_tokenizer(tmp_path / "l", "llama3"))
  tk.check_vocab(tok, tok.vocab_size)
  tk.check_vocab(tok, tok.vocab_size + 64)  # padded embeddings are fine
  with pytest.raises(
      tk.TokenIdError,
      match=rf"ids up to {tok.vocab_size - 1} but the model has {tok.vocab_size - 1}"):
    tk.check_vocab(tok, tok.vocab_size - 1)


def test_missing_tokenizer_json_in_directory(tmp_path):
  with pytest.raises(FileNotFoundError, match="no tokenizer.json.*only fast tokenizers"):
    tk.load_tokenizer(f"hf:{tmp_path}")


def test_ids_past_the_tokenizer_decode_to_nothing(tmp_path):
  """A checkpoint's padded embedding rows (ids >= the tokenizer's) can be sampled: decoding drops
  them (transformers' decode does too) instead of failing the evaluation."""
  tok = tk.load_tokenizer("hf:" + write_hf_tokenizer(tmp_path / "l", "llama3"))
  ids = tok.encode("the cat")
  assert tok.decode(ids[:1] + [tok.vocab_size + 5] + ids[1:]) == "the cat"
  with pytest.raises(tk.TokenIdError, match="token id -1"):
    tok.decode([-1])
