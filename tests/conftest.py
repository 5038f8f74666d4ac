import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED = Path(os.environ.get("SHE_SHARED_DATA", Path(__file__).resolve().parents[1] / ".." / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"shared data not found at {SHARED}")
    return SHARED


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A freshly built tiny model in a private cache (never touches the user's ~/.cache/she)."""
    from she.models.registry import prepare

    return prepare("tiny", out_dir=tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    """The tiny model and its tokenizer, loaded once a module."""
    from she.models.registry import load_model_and_tokenizer

    return load_model_and_tokenizer(str(tiny_model_dir))


@pytest.fixture
def tiny_grpo(tiny_model_dir, tmp_path):
    """One-step GRPO on the tiny model, 2 synthetic prompts x 2 rollouts: ``(model, args, dataset, kwargs)`` for
    ``SRPOTrainer(model, args, dataset, **kwargs)`` (outcome reward only)."""
    from she.data.synthetic import generate
    from she.models.registry import load_model_and_tokenizer
    from she.training.srpo import build_grpo_config, make_prompt_dataset

    recs = generate(n_queries=2, products_per_query=2, seed=0)[:2]
    model, tok = load_model_and_tokenizer(str(tiny_model_dir))
    args = build_grpo_config(tmp_path, num_generations=2, per_device_train_batch_size=4, max_completion_length=8,
                             max_steps=1, learning_rate=1e-4, seed=0, bf16=True)
    kw = dict(processing_class=tok, records_by_id={r.id: r for r in recs}, step_rewards=False)
    return model, args, make_prompt_dataset(recs), kw


@pytest.fixture
def fused_head_calls(monkeypatch):
    """Records each call of TRL's chunked LM head (she.training.lm_head): the positions it projects, and whether
    the name TRL's line reads (``_use_triton``) said "labelled positions only" at that call (the line itself is
    pinned by tests/test_trl_contract.py). Returns the two lists ``(positions, compact)``."""
    trl_utils = pytest.importorskip("trl.trainer.utils")
    monkeypatch.delenv("SHE_LM_HEAD_POSITIONS", raising=False)  # the default: labelled positions only
    positions: list[int] = []
    compact: list[bool] = []
    real = trl_utils._ChunkedLogProbFunction

    class Recording:
        @staticmethod
        def apply(hidden, *args):
            positions.append(hidden.shape[0])
            compact.append(bool(trl_utils._use_triton(hidden.device)))
            return real.apply(hidden, *args)

    monkeypatch.setattr(trl_utils, "_ChunkedLogProbFunction", Recording)
    return positions, compact


@pytest.fixture
def hd_pairs():
    """Five labelled Home-Depot-like pairs (all three labels; units, brands, a far product) for forced-read tests."""
    from she.data.schema import Product, Record

    return [Record(id=f"r{i}", query=q, product=Product(title=t), label=lab) for i, (q, t, lab) in enumerate([
        ("cordless 20v dewalt drills", "DEWALT 18-Volt Drill/Driver Kit", "Partial"),
        ("white kitchen faucet", "Moen Chrome Kitchen Faucet", "Partial"),
        ("2x4 lumber 8 ft", "2 in. x 4 in. x 8 ft. Stud", "Exact"),
        ("hammer", "16 oz. Claw Hammer", "Exact"),
        ("garden hose", "Ceiling Fan with Light", "Irrelevant"),
    ])]


def _build_tiny_bert(path: Path, records, *, hidden_size: int = 32, intermediate_size: int = 64,
                     max_position_embeddings: int = 128) -> Path:
    """A tiny random BERT encoder folder whose WordPiece vocabulary is exactly the words (and punctuation)
    of the records' query and cross-encoder product text, so no token is [UNK]. Saved as a bare encoder,
    like the packaged MiniLM the cross-encoder starts from; seeded, so every test gets the same weights."""
    import re

    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    from she.training.cross_encoder import product_text

    words = sorted({w for r in records for w in re.findall(r"\w+|[^\w\s]", (r.query + " " + product_text(r)).lower())})
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    tok = BertTokenizerFast(vocab_file=str(path / "vocab.txt"))
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=hidden_size, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=intermediate_size, max_position_embeddings=max_position_embeddings)
    BertForSequenceClassification(cfg).bert.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_bert_factory():
    """``make(path, records, *, hidden_size=32, intermediate_size=64, max_position_embeddings=128)``: builds
    a tiny BERT base for cross-encoder tests (see ``_build_tiny_bert``)."""
    return _build_tiny_bert


@pytest.fixture(scope="session")
def load_script():
    """``load(name)``: import ``scripts/<name>.py`` as module ``name`` (registered in ``sys.modules`` while the
    session lasts: dataclasses look their module up while a class is built) -- for tests of a script's pure parts."""
    import importlib.util
    import sys

    loaded: list[str] = []

    def load(name: str):
        if name in sys.modules:
            return sys.modules[name]
        spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        loaded.append(name)
        try:
            spec.loader.exec_module(mod)
        except BaseException:
            sys.modules.pop(name, None)
            raise
        return mod

    yield load
    for name in loaded:
        sys.modules.pop(name, None)
