"""Contract with the pinned TRL: the GRPOTrainer internals SRPOTrainer relies on.

SRPOTrainer overrides a private method of ``trl.GRPOTrainer`` and rewrites one entry of its return value.
If a TRL upgrade renames the hook, changes what it returns, changes how it slices the gathered batch
between processes, or stops accepting (B, T) advantages in the loss, these tests fail with a message
saying what moved -- instead of SRPO silently training on vanilla (or wrong) advantages.
"""

from __future__ import annotations

import inspect
import os

import pytest
import torch

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
trl = pytest.importorskip("trl")
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

G = 4  # num_generations


def test_trl_version_is_pinned():
    assert trl.__version__ == "1.16.0", (
        f"TRL is {trl.__version__}, SRPOTrainer was written against 1.16.0: re-read "
        "GRPOTrainer._generate_and_score_completions and _compute_loss, then update this pin"
    )


def test_hook_exists_with_expected_signature():
    hook = getattr(GRPOTrainer, "_generate_and_score_completions", None)
    assert callable(hook), "GRPOTrainer._generate_and_score_completions is gone"
    assert list(inspect.signature(hook).parameters) == ["self", "inputs"]
    # _prepare_inputs is what calls the hook during training (and buffers its output)
    assert "self._generate_and_score_completions(generation_batch)" in inspect.getsource(GRPOTrainer._prepare_inputs)


def test_prompt_tokenizer_we_reuse_for_the_gold_probability_outcome():
    # she.training.gold_prob scores P(gold) on exactly the prompt ids TRL generated from
    fn = getattr(GRPOTrainer, "_tokenize_prompts", None)
    assert callable(fn) and list(inspect.signature(fn).parameters) == ["self", "prompts"]
    assert "prompt_ids, images, multimodal_fields = self._tokenize_prompts(prompts)" in inspect.getsource(
        GRPOTrainer._generate)


def test_trl_slices_the_gathered_batch_by_process_index():
    """SRPO gathers, computes on the global batch and slices exactly like TRL; TRL's slice must not move."""
    src = inspect.getsource(GRPOTrainer._generate_and_score_completions)
    assert "self.accelerator.process_index * len(prompts)" in src
    assert "(self.accelerator.process_index + 1) * len(prompts)" in src
    assert "advantages = advantages[process_slice]" in src
    # rewards are gathered over processes before the group normalisation (so groups may straddle processes)
    assert "rewards_per_func = gather(rewards_per_func)" in inspect.getsource(GRPOTrainer._calculate_rewards)


def test_sft_loss_is_the_sum_of_the_fused_heads_log_probs():
    """she.training.sft weights the verdict token by scaling ``outputs.log_probs`` in a forward hook: TRL must
    reduce exactly those (default loss path) and call the model with ``fused_lm_head=True``."""
    from trl import SFTTrainer

    src = inspect.getsource(SFTTrainer.compute_loss)
    assert "outputs = model(**inputs, fused_lm_head=True)" in src
    assert "per_token_loss = -outputs.log_probs" in src
    assert "loss = per_token_loss.sum() / torch.as_tensor(num_tokens).clamp(min=1)" in src


def test_fused_head_chooses_its_positions_by_the_name_we_patch():
    """she.training.lm_head replaces ``trl.trainer.utils._use_triton`` so that the fused head projects only the
    labelled positions on a CPU; that must stay the one name TRL's choice reads, and the log-probability method
    SRPOTrainer wraps must keep its name."""
    import trl.trainer.utils as trl_utils

    src = inspect.getsource(trl_utils.add_fused_lm_head)
    assert "compact = _use_triton(hidden_states.device)" in src
    assert "hidden_states[mask] if compact else" in src and "labels[mask] if compact else" in src
    assert callable(trl_utils._use_triton) and callable(trl_utils._ChunkedLogProbFunction.apply)
    assert "self._get_per_token_logps_and_entropies(" in inspect.getsource(GRPOTrainer._compute_loss)


def test_loss_accepts_token_level_advantages_by_source():
    src = inspect.getsource(GRPOTrainer._compute_loss)
    assert 'advantages = inputs["advantages"]' in src
    assert "if advantages.dim() == 1:" in src  # (B,) is unsqueezed, (B, T) is used as is


def test_dapo_pieces_of_one_generation_batch_add_up_to_its_loss():
    """rl.loss_micro_batches (she.training.rl.loss_batch_settings) sets gradient_accumulation_steps =
    steps_per_generation = n and claims the gradient of one pass: dapo divides every piece by the whole generation
    batch's trained tokens (the GA / steps_per_generation factor is 1), and transformers must not divide by GA again."""
    src = inspect.getsource(GRPOTrainer._compute_loss)
    assert 'normalizer = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes' in src
    assert "normalizer = normalizer * self.current_gradient_accumulation_steps / self.args.steps_per_generation" in src
    assert GRPOTrainer.loss_is_scaled_for_ga is True
    assert GRPOConfig.__dataclass_fields__["loss_type"].default == "dapo"  # what run_rl_job trains with (RLJobConfig has no loss_type)


def test_a_rollout_funcs_env_mask_keeps_tokens_out_of_the_loss():
    """rl.rollout_evidence: computed (she.training.computed_rollouts) forces the computed steps into the completion
    and relies on TRL turning the rollout_func's ``env_mask`` into the ``tool_mask`` its loss multiplies in, and on
    the split of a generation batch into micro-batches (rl.loss_micro_batches) carrying it along."""
    assert 'tool_mask = extra_fields.pop("env_mask", None)' in inspect.getsource(GRPOTrainer._generate)
    assert 'mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]' in (
        inspect.getsource(GRPOTrainer._compute_loss))
    assert "loss_mask = completion_mask if tool_mask is None else completion_mask * tool_mask" in (
        inspect.getsource(GRPOTrainer._generate_and_score_completions))  # num_items_in_batch counts trained tokens


@pytest.fixture(scope="module")
def grpo_trainer(tiny_model_dir, tmp_path_factory):
    from she.data.synthetic import generate
    from she.models.registry import load_model_and_tokenizer
    from she.training.srpo import make_prompt_dataset

    torch.manual_seed(0)
    records = generate(n_queries=1, products_per_query=2, seed=0)[:2]
    model, tok = load_model_and_tokenizer(tiny_model_dir)
    args = GRPOConfig(
        output_dir=str(tmp_path_factory.mktemp("grpo")), num_generations=G, per_device_train_batch_size=2 * G,
        max_completion_length=16, use_cpu=True, report_to=[], max_steps=1, logging_steps=1, save_strategy="no",
        seed=0, dataloader_num_workers=0,
    )

    def length_reward(completions, **kwargs):  # varied rewards so advantages are not all 0
        return [float(len(c[-1]["content"]) % 5) for c in completions]

    return GRPOTrainer(model=model, reward_funcs=[length_reward], args=args,
                       train_dataset=make_prompt_dataset(records), processing_class=tok)


def test_one_generation_batch_has_the_keys_and_shapes_we_rely_on(grpo_trainer):
    t = grpo_trainer
    rows = [dict(r) for r in t.train_dataset for _ in range(G)]  # what RepeatSampler feeds: G copies per prompt
    t.model.train()
    out = t._generate_and_score_completions(rows)
    for key in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "advantages", "num_items_in_batch"):
        assert key in out, f"_generate_and_score_completions no longer returns {key!r} (keys: {sorted(out)})"
    b = len(rows)
    ids, mask, adv = out["completion_ids"], out["completion_mask"], out["advantages"]
    assert ids.dim() == 2 and ids.shape[0] == b and 0 < ids.shape[1] <= 16
    assert mask.shape == ids.shape and set(mask.unique().tolist()) <= {0, 1}
    assert adv.shape == (b,) and adv.dtype == torch.float32
    # group-normalised per prompt: each group of G sums to ~0
    assert torch.allclose(adv.view(-1, G).sum(1), torch.zeros(b // G), atol=1e-4)
    # TRL's metric store, where SRPO appends its own metrics
    assert set(t._metrics) == {"train", "eval"} and isinstance(t._metrics["train"]["reward"], list)
    assert t.accelerator.process_index == 0 and t.num_generations == G

    # the loss treats a (B, T) advantage that is constant per row exactly like the (B,) one
    t.model.eval()  # no dropout: two forward passes must agree
    loss_1d = t._compute_loss(t.model, dict(out)).detach()
    loss_2d = t._compute_loss(t.model, {**out, "advantages": adv[:, None].expand_as(mask).clone()}).detach()
    assert torch.isfinite(loss_1d) and torch.allclose(loss_1d, loss_2d, atol=1e-6)
    # ... and really uses the per-token values: an advantage of 1 on a single token gives, on-policy (ratio 1)
    # with the default "dapo" loss in eval mode, loss = -1 / num_items_in_batch
    assert t.loss_type == "dapo"
    one_token = torch.zeros_like(mask, dtype=torch.float32)
    one_token[0, 0] = 1.0
    loss_tok = t._compute_loss(t.model, {**out, "advantages": one_token}).detach()
    assert torch.allclose(loss_tok, -1.0 / out["num_items_in_batch"].float(), atol=1e-6)
