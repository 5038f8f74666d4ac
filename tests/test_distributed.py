"""Multi-process training: the shipped accelerate configs, layout-invariant sampling, the vLLM settings,
and a 1-process vs 2-process (gloo, CPU) equivalence test of SRPO through the CLI.

What the equivalence tests prove (docs/distributed.md): with the same seed and the same *global* batch
(12 completions per step: 1 x 12 or 2 x 6, so one prompt group of G = 4 straddles the two processes),
``accelerate launch -m she.cli train srpo`` on two CPU processes computes the same per-token SRPO
advantages for every global row, and logs the same rewards, step-reward means, loss and gradient norm,
as one process. Two rollout sources: a scripted ``rollout_func`` (the tiny random model cannot write a
trace, so only scripted completions give non-zero advantages) and real sampling from the policy with
``layout_invariant_sampling`` (TRL's own sampling draws different tokens on different process counts).
The launched runs are skipped, not failed, when ``accelerate launch`` cannot start two CPU processes on
this machine; every subprocess has a timeout and is killed with its process group.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from she.cli import main
from she.training.distributed import (
    RowKeyedSampler,
    check_vllm_settings,
    import_object,
    install_layout_invariant_sampling,
    row_seed,
)

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
ACC = ROOT / "configs" / "accelerate"
CPU_CFG = ACC / "cpu-ddp-2proc.yaml"
# per-process measurements, not results: timings, and the resident memory after the heap trim (rss_gb)
TIMING_KEYS = {"step_time", "train_runtime", "train_samples_per_second", "train_steps_per_second", "rss_gb"}
G = 4


def _run(argv):
    try:
        main(argv)
    except SystemExit as e:
        return e.code
    return 0


# ------------------------------------------------------------------------------ accelerate configs


def _validated(path: Path):
    """What `accelerate launch --config_file path` makes of the file (without starting anything)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    parser = launch_command_parser()
    args, defaults, _ = _validate_launch_command(parser.parse_args(["--config_file", str(path), "train.py"]))
    return parser, args, defaults


@pytest.mark.parametrize("name, dist_type, n_proc", [
    ("cpu-ddp-2proc", "MULTI_GPU", 2), ("gpu-ddp", "MULTI_GPU", 8), ("fsdp", "FSDP", 8),
    ("zero2", "DEEPSPEED", 8), ("zero3", "DEEPSPEED", 8),
])
def test_accelerate_configs_load_with_known_keys(name, dist_type, n_proc):
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file

    path = ACC / f"{name}.yaml"
    cfg = load_config_from_file(str(path))  # raises on unknown top-level keys
    assert isinstance(cfg, ClusterConfig)
    assert cfg.distributed_type.value == dist_type and cfg.num_processes == n_proc
    parser, args, _ = _validated(path)
    # nested keys are copied onto launch arguments without a check: a typo would be silently ignored
    dests = {a.dest for a in parser._actions}
    nested = [k if k.startswith("fsdp") else f"fsdp_{k}" for k in cfg.fsdp_config] + list(cfg.deepspeed_config)
    assert [k for k in nested if k not in dests] == []
    assert (args.multi_gpu, args.use_fsdp, args.use_deepspeed) == (
        dist_type == "MULTI_GPU", dist_type == "FSDP", dist_type == "DEEPSPEED")
    assert cfg.use_cpu is (name == "cpu-ddp-2proc")


def test_fsdp_config_builds_a_full_shard_llama_layer_plugin():
    from accelerate.utils import FullyShardedDataParallelPlugin, patch_environment
    from accelerate.utils.launch import prepare_multi_gpu_env

    _, args, _ = _validated(ACC / "fsdp.yaml")
    env = {k: v for k, v in prepare_multi_gpu_env(args).items() if k.startswith(("FSDP_", "ACCELERATE_"))}
    with patch_environment(**env):
        plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
    assert plugin.transformer_cls_names_to_wrap == ["LlamaDecoderLayer"]
    assert plugin.state_dict_type.name == "FULL_STATE_DICT"


@pytest.mark.parametrize("name, stage", [("zero2", "2"), ("zero3", "3")])
def test_deepspeed_configs_reach_the_launcher_env(name, stage):
    from accelerate.utils.launch import prepare_deepspeed_cmd_env

    _, args, defaults = _validated(ACC / f"{name}.yaml")
    args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)  # as launch_command does
    _, env = prepare_deepspeed_cmd_env(args)
    assert env["ACCELERATE_USE_DEEPSPEED"] == "true" and env["ACCELERATE_DEEPSPEED_ZERO_STAGE"] == stage
    assert env["ACCELERATE_DEEPSPEED_ZERO3_INIT"] == ("true" if stage == "3" else "false")


# --------------------------------------------------------------------------- layout-invariant sampling


def _choices(scores: torch.Tensor) -> list[int]:
    finite = torch.isfinite(scores)
    assert finite.sum(dim=1).tolist() == [1] * scores.shape[0]  # exactly one allowed token per row
    assert (scores[finite] == 0).all()
    return finite.int().argmax(dim=1).tolist()


def test_row_keyed_sampler_does_not_depend_on_the_split():
    torch.manual_seed(0)
    scores = torch.randn(8, 50)
    ids = torch.zeros(8, 3, dtype=torch.long)
    whole = _choices(RowKeyedSampler(seed=3, generation_round=0, row_offset=0)(ids, scores))
    halves = (_choices(RowKeyedSampler(3, 0, row_offset=0)(ids[:4], scores[:4]))
              + _choices(RowKeyedSampler(3, 0, row_offset=4)(ids[4:], scores[4:])))
    assert whole == halves
    assert whole != _choices(RowKeyedSampler(seed=4, generation_round=0, row_offset=0)(ids, scores))
    assert whole != _choices(RowKeyedSampler(seed=3, generation_round=1, row_offset=0)(ids, scores))
    s = RowKeyedSampler(3, 0, row_offset=0)
    first, second = _choices(s(ids, scores)), _choices(s(ids, scores))  # next token position: new noise
    assert first == whole and second != first
    assert row_seed(1, 2, 3, 4) == row_seed(1, 2, 3, 4) != row_seed(1, 2, 4, 3)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_row_keyed_sampler_samples_the_softmax(temperature):
    """Gumbel-max: the choice frequencies over many rows match softmax(logits / T) (4.6 sigma at n = 3000)."""
    n = 3000
    logits = torch.tensor([0.0, 1.0, 2.0])
    out = RowKeyedSampler(seed=0, generation_round=0, temperature=temperature, row_offset=0)(
        torch.zeros(n, 1, dtype=torch.long), logits.expand(n, 3).clone())
    freq = torch.bincount(torch.tensor(_choices(out)), minlength=3).float() / n
    expected = torch.softmax(logits / temperature, dim=0)  # T=1: .090 .245 .665; T=2: .186 .307 .506
    assert torch.allclose(freq, expected, atol=0.04), (freq, expected)


def test_generation_is_identical_for_one_batch_and_two_half_batches(tiny_model_dir):
    """Real generation with the tiny model: 4 rows in one left-padded batch == rows 0-1 and 2-3 generated
    separately (different padding), as on two processes."""
    from transformers import GenerationConfig, LogitsProcessorList

    from she.models.registry import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(tiny_model_dir)
    tok.padding_side = "left"
    prompts = ["cordless drill", "cordless drill", "white paint primer 5 gal", "white paint primer 5 gal"]
    gc = GenerationConfig(do_sample=True, max_new_tokens=12, top_k=0, top_p=1.0, temperature=1.0,
                          pad_token_id=tok.pad_token_id, eos_token_id=None)

    def gen(texts, offset):
        enc = tok(texts, return_tensors="pt", padding=True)
        out = model.generate(**enc, generation_config=gc,
                             logits_processor=LogitsProcessorList([RowKeyedSampler(7, 0, row_offset=offset)]))
        return [row[enc["input_ids"].shape[1]:].tolist() for row in out]

    whole = gen(prompts, 0)
    assert whole == gen(prompts[:2], 0) + gen(prompts[2:], 2)
    assert whole[0] != whole[1]  # same prompt, different rows: different samples


class _FakeModel:
    def __init__(self, gc):
        self.generation_config = gc
        self.calls = []

    def generate(self, *args, **kwargs):
        self.calls.append(kwargs)
        return "out"


def test_install_layout_invariant_sampling_wraps_generate():
    from transformers import GenerationConfig

    m = install_layout_invariant_sampling(_FakeModel(GenerationConfig(do_sample=True, top_k=0, top_p=1.0)), seed=1)
    assert m.generate() == "out" and m.generate() == "out"
    samplers = [c["logits_processor"][-1] for c in m.calls]
    assert [s.generation_round for s in samplers] == [0, 1] and all(isinstance(s, RowKeyedSampler) for s in samplers)
    greedy = GenerationConfig(do_sample=False)
    m.generate(generation_config=greedy)
    assert "logits_processor" not in m.calls[-1]  # greedy passes through untouched
    with pytest.raises(ValueError, match="top_k=5"):
        m.generate(generation_config=GenerationConfig(do_sample=True, top_k=5, top_p=1.0))


# ----------------------------------------------------------------------------------- vLLM settings


def test_vllm_settings_are_checked_and_passed_to_grpo_config(tmp_path, monkeypatch):
    import she.training.distributed as dist
    from she.training.srpo import build_grpo_config

    monkeypatch.setattr(dist, "vllm_available", lambda: False)
    with pytest.raises(ValueError, match=r"pip install 'she\[vllm\]'; needs a GPU"):
        build_grpo_config(tmp_path, use_vllm=True)
    with pytest.raises(ValueError, match="vllm_mode"):
        check_vllm_settings(False, "remote", 0.3, None)
    with pytest.raises(ValueError, match="vllm_gpu_memory_utilization"):
        check_vllm_settings(False, "colocate", 1.5, None)
    with pytest.raises(ValueError, match="http"):
        check_vllm_settings(False, "server", 0.3, "10.0.0.5:8000")
    off = build_grpo_config(tmp_path)
    assert off.use_vllm is False and off.vllm_mode == "colocate"

    monkeypatch.setattr(dist, "vllm_available", lambda: True)
    args = build_grpo_config(tmp_path, use_vllm=True, vllm_mode="server", vllm_gpu_memory_utilization=0.5,
                             vllm_server_base_url="http://10.0.0.5:8000")
    assert (args.use_vllm, args.vllm_mode, args.vllm_gpu_memory_utilization, args.vllm_server_base_url) == (
        True, "server", 0.5, "http://10.0.0.5:8000")


def test_rl_job_yaml_vllm_fields_reach_the_trainer_settings(tmp_path):
    from she.config import RLJobConfig, load_config
    from she.training.rl import rollout_settings, trainer_rollout_kwargs

    y = tmp_path / "rl.yaml"
    y.write_text("use_vllm: true\nvllm_mode: server\nvllm_server_base_url: http://h:8000\n"
                 "vllm_gpu_memory_utilization: 0.6\nrollout_func: she_test_rollouts:scripted_rollout\n")
    cfg = load_config(RLJobConfig, y)
    assert rollout_settings(cfg) == {"use_vllm": True, "vllm_mode": "server", "vllm_gpu_memory_utilization": 0.6,
                                     "vllm_server_base_url": "http://h:8000"}
    from she_test_rollouts import scripted_rollout

    assert trainer_rollout_kwargs(cfg) == {"rollout_func": scripted_rollout}
    cfg.layout_invariant_sampling = True
    with pytest.raises(ValueError, match="use_vllm"):
        rollout_settings(cfg)


def test_cli_use_vllm_without_vllm_fails_before_loading_a_model(tmp_path, capsys, monkeypatch):
    import she.training.distributed as dist

    monkeypatch.setattr(dist, "vllm_available", lambda: False)
    y = tmp_path / "rl.yaml"
    y.write_text("use_vllm: true\nreport_to: none\ndata:\n  synthetic_queries: 10\n")
    assert _run(["train", "srpo", "--config", str(y), "--model", str(tmp_path / "no-such-model"),
                 "--output-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "pip install 'she[vllm]'" in err and "no-such-model" not in err  # vLLM check came first


def test_import_object_errors():
    assert import_object("json:dumps") is json.dumps
    for bad, msg in [("json.dumps", "module:function"), ("no_such_mod_x:f", "cannot import"),
                     ("json:nope", "no attribute"), ("json:__doc__", "not callable")]:
        with pytest.raises(ValueError, match=msg):
            import_object(bad)


# -------------------------------------------------------------------------- two-process equivalence


def _child_env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("ACCELERATE_", "MASTER_", "SHE_DUMP")) and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRL_EXPERIMENTAL_SILENCE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    return env


def _launch(argv: list[str], timeout: float, cwd: Path) -> subprocess.CompletedProcess:
    """``accelerate launch`` in its own session; on timeout the whole process group is killed."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CPU_CFG), *argv]
    p = subprocess.Popen(cmd, cwd=cwd, env=_child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, start_new_session=True)
    try:
        out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, _ = p.communicate()
        return subprocess.CompletedProcess(cmd, -9, out + f"\n[killed after {timeout:.0f} s]", None)
    return subprocess.CompletedProcess(cmd, p.returncode, out, None)


PROBE = """
import pathlib
import torch
from accelerate import PartialState
s = PartialState(cpu=True)
t = torch.tensor([s.process_index + 1.0])
torch.distributed.all_reduce(t)
line = (f"PROBE rank={s.process_index} world={s.num_processes} type={s.distributed_type.value} "
        f"backend={s.backend} sum={t.item():g}")
# one file per rank: two processes printing to one pipe can join their lines (the probe then looked failed)
pathlib.Path(__file__).with_name(f"probe-{s.process_index}.txt").write_text(line)
torch.distributed.destroy_process_group()  # as she.cli does: an open gloo group can abort at exit
"""


def probe_lines(folder: Path) -> list[str]:
    """The probe's answers, one per rank that answered, in rank order."""
    return [p.read_text().strip() for p in sorted(folder.glob("probe-*.txt"))]


@pytest.fixture(scope="module")
def launcher(tmp_path_factory) -> str:
    """Start two gloo processes with the shipped CPU config, or skip: no launch, no equivalence test."""
    d = tmp_path_factory.mktemp("probe")
    (d / "probe.py").write_text(PROBE)
    for _ in range(2):  # one retry: a port taken between accelerate's free-port pick and torchrun's bind
        for old in d.glob("probe-*.txt"):
            old.unlink()
        res = _launch([str(d / "probe.py")], timeout=120, cwd=d)
        lines = probe_lines(d)
        if res.returncode == 0 and len(lines) == 2:
            return "\n".join(lines)
    pytest.skip(f"accelerate launch cannot start 2 CPU processes here (rc={res.returncode}, ranks answering: "
                f"{len(lines)}): {res.stdout[-800:]}")


@pytest.mark.slow
def test_cpu_config_gives_two_gloo_processes(launcher):
    assert launcher.splitlines() == [
        "PROBE rank=0 world=2 type=MULTI_CPU backend=gloo sum=3",
        "PROBE rank=1 world=2 type=MULTI_CPU backend=gloo sum=3",
    ]


@pytest.fixture(scope="module")
def rl_data(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("dist-data") / "d.jsonl"
    assert _run(["data", "generate", "--out", str(p), "--queries", "8"]) == 0
    return p


def _rl_pair(tmp_path: Path, model: Path, data: Path, extra: str, max_len: int) -> tuple[Path, Path]:
    """The same SRPO job (2 steps, G = 4, 12 completions per step) on 1 process in-process and on 2 launched
    processes with 6 completions each; returns the two output folders."""
    runs = {}
    for n in (2, 1):
        out = tmp_path / f"p{n}"
        cfg = tmp_path / f"p{n}.yaml"
        cfg.write_text(f"num_generations: {G}\nper_device_batch_size: {12 // n}\nmax_steps: 2\n"
                       f"max_completion_length: {max_len}\nbf16: false\nreport_to: none\nsave_steps: 2\nresume: false\n"
                       f"dump_advantages: {out / 'adv'}\n{extra}")
        argv = ["train", "srpo", "--config", str(cfg), "--model", str(model), "--data", str(data),
                "--output-dir", str(out)]
        if n == 2:
            res = _launch(["-m", "she.cli", *argv], timeout=420, cwd=tmp_path)
            assert res.returncode == 0, res.stdout[-4000:]
            assert res.stdout.count(f"saved {out / 'final'}") == 2  # both ranks return the folder
        else:
            assert _run(argv) == 0
        runs[n] = out
    return runs[1], runs[2]


def _dumps(folder: Path) -> dict[tuple[int, int], dict]:
    """(generation round, global row) -> that row's dumped advantages (over its completion tokens), text, ..."""
    rows = {}
    for f in sorted((folder / "adv").glob("adv-*.pt")):
        d = torch.load(f, weights_only=False)
        for j, g in enumerate(d["rows"].tolist()):
            n = int(d["completion_mask"][j].sum())
            rows[(d["round"], g)] = {"adv": d["advantages"][j, :n], "text": d["texts"][j], "rid": d["record_ids"][j],
                                     "proc": d["process_index"], "nproc": d["num_processes"],
                                     "outcomes": d["outcome_rewards"]}
    return rows


def _logged(folder: Path) -> list[dict]:
    return [{k: v for k, v in h.items() if k not in TIMING_KEYS}
            for h in json.loads((folder / "log_history.json").read_text())]


def _assert_same_logs(one: Path, two: Path) -> list[dict]:
    h1, h2 = _logged(one), _logged(two)
    assert len(h1) == len(h2) == 3  # two logged steps and the train summary
    for a, b in zip(h1, h2):
        assert set(a) == set(b)
        for k in a:
            assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), (a.get("step"), k, a[k], b[k])
    return h1


@pytest.mark.slow
def test_two_processes_match_one_with_scripted_rollouts(launcher, tiny_model_dir, rl_data, tmp_path):
    one, two = _rl_pair(tmp_path, tiny_model_dir, rl_data, "rollout_func: she_test_rollouts:scripted_rollout\n", 128)
    d1, d2 = _dumps(one), _dumps(two)
    assert sorted(d1) == sorted(d2) == [(r, g) for r in (0, 1) for g in range(12)]
    assert {v["nproc"] for v in d1.values()} == {1} and {v["nproc"] for v in d2.values()} == {2}
    # global rows 0-5 on process 0, 6-11 on process 1: the group of rows 4-7 straddles the processes
    assert [d2[(0, g)]["proc"] for g in range(12)] == [0] * 6 + [1] * 6
    for key in d1:
        a, b = d1[key], d2[key]
        assert (a["rid"], a["text"]) == (b["rid"], b["text"])
        assert a["adv"].shape == b["adv"].shape and torch.allclose(a["adv"], b["adv"], atol=1e-6), key
    # the scripted outcomes, by hand: rows 0, 4, 8 are the gold trace (1), the rest score 0
    assert d2[(0, 0)]["outcomes"].tolist() == [1.0, 0.0, 0.0, 0.0] * 3
    straddling = torch.cat([d1[(0, g)]["adv"] for g in range(4, 8)])
    assert straddling.abs().max() > 0.1  # non-trivial advantages where the group is split
    logs = _assert_same_logs(one, two)
    assert logs[0]["srpo/outcome_reward"] == pytest.approx(0.25) and "srpo/step_reward/Type" in logs[0]
    assert "loss" in logs[0] and "grad_norm" in logs[0]
    # rank 0 wrote the run files; final/ is an ordinary model folder
    assert json.loads((two / "she_config.json").read_text())["per_device_batch_size"] == 6
    assert (two / "final" / "config.json").exists() and (two / "final" / "she.json").exists()
    assert (two / "final" / "tokenizer_config.json").exists() and (two / "checkpoint-2").is_dir()


@pytest.mark.slow
def test_two_processes_match_one_with_layout_invariant_sampling(launcher, tiny_model_dir, rl_data, tmp_path):
    one, two = _rl_pair(tmp_path, tiny_model_dir, rl_data, "layout_invariant_sampling: true\n", 24)
    d1, d2 = _dumps(one), _dumps(two)
    assert sorted(d1) == sorted(d2) and len(d1) == 24
    assert all(d1[k]["text"] == d2[k]["text"] and d1[k]["rid"] == d2[k]["rid"] for k in d1)
    for r in (0, 1):  # real sampling: a group's completions differ from each other
        for g0 in range(0, 12, G):
            assert len({d1[(r, g)]["text"] for g in range(g0, g0 + G)}) > 1
    for key in d1:
        assert torch.allclose(d1[key]["adv"], d2[key]["adv"], atol=1e-6)
    _assert_same_logs(one, two)
