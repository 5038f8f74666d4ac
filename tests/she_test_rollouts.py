"""A scripted TRL ``rollout_func`` for the multi-process tests (``rollout_func: she_test_rollouts:scripted_rollout``).

The tiny random model cannot write a reasoning trace, so its real samples all score 0 and every SRPO
advantage is 0 -- useless for checking that advantages agree across process layouts. This function
returns, for each prompt row, one of G = 4 fixed completions chosen by the row's *global* index in the
batch (``process_index * local_rows + i``; TRL's RepeatSampler puts a group's G copies on consecutive
global rows), so the completions are the same however the batch is split over processes:

    global row % 4 == 0: the gold rationale                     outcome 1, every step right
    global row % 4 == 1: wrong type relation and wrong label    outcome 0, Type step wrong
    global row % 4 == 2: right steps, wrong label              outcome 0, steps right
    global row % 4 == 3: not a trace                           outcome 0, no steps

Everything after generation (rewards, gathers, advantages, log-probs, loss) is the trainer's normal path.
Lives in tests/ and is imported by name, so the launched processes get ``tests/`` on PYTHONPATH.
"""

from __future__ import annotations

import re

G = 4


def _replace_line(text: str, key: str, value: str) -> str:
    new, n = re.subn(rf"(?m)^{key}: .*$", f"{key}: {value}", text)
    if n != 1:
        raise ValueError(f"no single {key!r} line in {text!r}")
    return new


def variants(record) -> list[str]:
    from she.reasoning.rationale import write_rationale

    gold = write_rationale(record)
    wrong_type = "same" if record.facts.type_relation != "same" else "different"
    wrong_label = "Exact" if record.label != "Exact" else "Irrelevant"
    v1 = _replace_line(_replace_line(gold, "Type", wrong_type), "Verdict", wrong_label)
    v2 = _replace_line(gold, "Verdict", wrong_label)
    return [gold, v1, v2, "I am not sure, maybe."]


def scripted_rollout(prompts: list, trainer) -> dict:
    from she.reasoning.prompts import user_message

    if not hasattr(trainer, "_scripted_by_msg"):
        trainer._scripted_by_msg = {user_message(r): r for r in trainer.records_by_id.values()}
    tok = trainer.processing_class
    offset = trainer.accelerator.process_index * len(prompts)
    prompt_ids, completion_ids = [], []
    for i, p in enumerate(prompts):
        rec = trainer._scripted_by_msg[p[-1]["content"]]
        text = variants(rec)[(offset + i) % G]
        ptext = tok.apply_chat_template(p, add_generation_prompt=True, tokenize=False)
        prompt_ids.append(tok(ptext, add_special_tokens=False)["input_ids"])
        completion_ids.append(tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id])
    return {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "logprobs": None}
