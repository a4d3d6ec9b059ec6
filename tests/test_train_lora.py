"""Local LoRA training on TRL's SFTTrainer (issue #12): config, plan, early errors, training,
resume, held-out loss, two data-parallel processes, and a random-initialised real architecture.

Offline on the CPU with a very small tiny-model recipe and a cut-down copy of the embedded
sample's splits (as tests/test_lora.py).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kokoro_helpers import cards
from kokoro_helpers.data.pipeline import prepare_data
from kokoro_helpers.local.chat_encoding import ChatTemplateError
from kokoro_helpers.local.sft_config import LoraTrainConfig
from kokoro_helpers.local.train_lora import SKIPPED_EXIT, LoraRun, main, train_lora
from kokoro_helpers.local.train_plan import make_plan
from kokoro_helpers.models.open import models_from_run

ROOT = Path(__file__).resolve().parents[1]
SYSTEM = "あなたは相談者の話に丁寧に耳を傾ける心理カウンセラーです。"


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("sample-run")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KOKORO_TIKTOKEN_OFFLINE", "1")
        return prepare_data(run_dir=str(run_dir), system_prompt=SYSTEM, progress=False)


def _write_run(sample, folder: Path, n_train: int = 6, n_valid: int = 2) -> Path:
    data = folder / "data"
    data.mkdir(parents=True)
    for split, n in (("train", n_train), ("valid", n_valid)):
        rows = sample.examples[split][:n]
        (data / f"{split}.jsonl").write_text(
            "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return folder


@pytest.fixture
def small_run(sample, tmp_path) -> Path:
    return _write_run(sample, tmp_path / "run")


def config(run_dir: Path, base_dir: Path, **kw) -> LoraTrainConfig:
    values = dict(run_dir=str(run_dir), local_base_model=str(base_dir), local_mode="train", lora_r=4,
                  lora_alpha=8, local_epochs=2, local_batch_size=2, learning_rate=5e-3, max_length=256,
                  local_run_name="t-lora", progress=False, seed=7)
    values.update(kw)
    return LoraTrainConfig(**values)


# ------------------------------------------------------------------------------------ config, plan

def test_config_from_params_coerces_and_validates():
    cfg = LoraTrainConfig.from_params({"learning_rate": "2e-3", "local_epochs": "2", "other": 1,
                                       "target_modules": "q_proj, v_proj", "quantization": "none"}, max_steps=None)
    assert cfg.learning_rate == 0.002 and cfg.local_epochs == 2 and cfg.target_modules == ["q_proj", "v_proj"]
    assert cfg.quantization is None and cfg.report_to == "none" and cfg.attn_implementation == "sdpa"
    with pytest.raises(ValueError, match="local_mode"):
        LoraTrainConfig.from_params({"local_mode": "maybe"})
    with pytest.raises(TypeError, match="unknown"):
        LoraTrainConfig.from_params({}, lora_rank=4)
    with pytest.raises(ValueError, match="quantization"):
        LoraTrainConfig.from_params({"quantization": "3bit"})
    with pytest.raises(ValueError, match="report_to"):
        LoraTrainConfig.from_params({"report_to": "mlflowz"})


def test_held_out_batch_has_its_own_name_and_never_exceeds_the_training_batch():
    # 03's eval_batch_size (a generation batch) is not the trainer's held-out batch
    cfg = LoraTrainConfig.from_params({"eval_batch_size": 8, "local_batch_size": 2})
    assert cfg.eval_batch == 2
    assert LoraTrainConfig.from_params({"local_batch_size": 4, "local_eval_batch_size": 1}).eval_batch == 1
    with pytest.raises(ValueError, match="local_eval_batch_size"):
        LoraTrainConfig.from_params({"local_batch_size": 2, "local_eval_batch_size": 8})


def test_trainer_args_pass_through_and_a_misspelt_field_names_the_closest():
    from kokoro_helpers.local.sft_config import build_sft_config

    cfg = LoraTrainConfig.from_params({"trainer_args": {"lr_scheduler_kwargs": {}, "logging_nan_inf_filter": False,
                                                        "optim": "adamw_torch"}})
    args = build_sft_config(cfg, output_dir="/tmp/x", device="cpu", precision="fp32", has_eval=False)
    assert args.logging_nan_inf_filter is False and args.bf16 is False and args.use_cpu
    assert args.activation_checkpointing is False and args.max_length == cfg.max_length
    with pytest.raises(ValueError, match="did you mean 'warmup_steps'"):
        LoraTrainConfig.from_params({"trainer_args": {"warmup_stepz": 3}})
    with pytest.raises(ValueError, match="local_batch_size"):        # a project name exists for it
        LoraTrainConfig.from_params({"trainer_args": {"per_device_train_batch_size": 3}})


def test_plan_skips_hub_models_on_cpu_and_refuses_quantization_without_cuda(monkeypatch):
    import kokoro_helpers.local.train_plan as tl

    monkeypatch.setattr(tl, "_cuda_available", lambda: False)
    plan = make_plan(LoraTrainConfig(local_base_model="Qwen/Qwen2.5-0.5B-Instruct"))
    assert plan.action == "skip" and "GPU" in plan.reason and plan.precision == "fp32"
    assert make_plan(LoraTrainConfig()).action == "train"                      # embedded:tiny on CPU
    assert make_plan(LoraTrainConfig(local_mode="off")).action == "skip"
    forced = make_plan(LoraTrainConfig(local_base_model="Qwen/Qwen2.5-0.5B-Instruct", local_mode="train"))
    assert forced.action == "train" and "slow" in forced.reason
    with pytest.raises(ValueError, match="CUDA"):
        make_plan(LoraTrainConfig(quantization="4bit"))
    result = LoraRun(LoraTrainConfig(local_mode="off")).train()
    assert not result.trained and "off" in result.skipped


def test_cli_exits_non_zero_when_nothing_is_trained_and_reports_bad_settings(tmp_path, capsys):
    params = tmp_path / "p.yaml"
    params.write_text(f"run_dir: {tmp_path / 'r'}\nlocal_mode: 'off'\n", encoding="utf-8")
    assert main(["--params", str(params)]) == SKIPPED_EXIT != 0
    assert "nothing trained" in capsys.readouterr().err
    assert main(["--params", str(params), "--set", "local_mode=sometimes"]) == 2
    assert "local_mode" in capsys.readouterr().err
    assert main(["--params", str(params), "--set", "local_mode=off"]) == SKIPPED_EXIT   # YAML's off = False
    assert main(["--params", str(params), "--set", "trainer_args={gradient_acumulation_steps: 2}"]) == 2
    assert "gradient_accumulation_steps" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ early errors

def test_missing_data_says_to_run_01(tmp_path, base_dir):
    with pytest.raises(FileNotFoundError, match="01_data"):
        LoraRun(config(tmp_path / "empty", base_dir)).prepare()


def test_bad_bases_and_modules_fail_before_any_weight_loads(small_run, base_dir, tmp_path, monkeypatch):
    import transformers

    def no_weights(*a, **k):
        raise AssertionError("weights were loaded before the check failed")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_weights)
    with pytest.raises(FileNotFoundError, match="no such folder") as err:
        LoraRun(config(small_run, tmp_path / "models" / "typo-folder")).prepare()
    assert "download" not in str(err.value)
    with pytest.raises(ValueError, match="not Linear layers.*q_proj") as err:
        LoraRun(config(small_run, base_dir, target_modules=["q_proj", "query_key_value"])).prepare()
    assert "query_key_value" in str(err.value)
    bare = tmp_path / "no-template"
    shutil.copytree(base_dir, bare)
    (bare / "chat_template.jinja").unlink(missing_ok=True)
    tc = json.loads((bare / "tokenizer_config.json").read_text(encoding="utf-8"))
    tc.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(tc), encoding="utf-8")
    with pytest.raises(ChatTemplateError, match="chat template"):
        LoraRun(config(small_run, bare)).prepare()


def test_memory_plan_says_what_fits(small_run, base_dir):
    from kokoro_helpers.local.memory_plan import estimate
    from transformers import AutoConfig

    run = LoraRun(config(small_run, base_dir)).check()
    assert run.memory.fits and "memory plan" in run.memory.describe()
    conf = AutoConfig.from_pretrained(base_dir)
    tight = estimate(conf, config(small_run, base_dir, local_batch_size=8, max_length=2048), "cuda", "bf16",
                     device_gib=0.05)
    assert not tight.fits and "WILL NOT FIT" in tight.describe()
    assert any("gradient_checkpointing" in a or "local_batch_size" in a for a in tight.advice)
    with pytest.raises(MemoryError, match="WILL NOT FIT"):
        run2 = LoraRun(config(small_run, base_dir))
        run2.plan.device = "cpu"
        import kokoro_helpers.local.memory_plan as mp
        original = mp.device_memory_gib
        try:
            mp.device_memory_gib = lambda *a, **k: 1e-4
            run2.check()
        finally:
            mp.device_memory_gib = original


# ------------------------------------------------------------------------------------ training

@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_train_writes_adapter_and_card_and_reloads_identically(small_run, base_dir):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = LoraRun(config(small_run, base_dir, lora_dropout=0.1))
    result = run.train()
    folder = small_run / "models" / "t-lora"
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "tokenizer_config.json",
                 "chat_template.jinja", "README.md", "history.json", "data_report.json"):
        assert (folder / name).is_file(), name
    card = cards.load_card(small_run / "models" / "t-lora.json")
    assert card["kind"] == "local_lora" and card["model_id"] == "t-lora"
    assert card["base_model"] == str(base_dir) and Path(card["adapter_path"]).name == "t-lora"
    assert card["base_fingerprint"].startswith("sha256:")
    assert card["training_params"]["trainer"].startswith("trl.SFTTrainer")
    assert card["training_params"]["world_size"] == 1
    m = card["training_metrics"]
    for key in ("base_valid_loss", "adapter_valid_loss", "train_tokens_per_s", "padding_fraction", "wall_s",
                "trainable_params", "total_params"):
        assert m[key] is not None, key
    assert 0 < m["trainable_params"] < m["total_params"]
    assert m["adapter_valid_loss"] < m["base_valid_loss"]
    steps = -(-result.data["train"]["sequences"] // 2) * 2                     # 2 epochs of batches of 2
    assert len(card["loss_history"]["train"]) == m["global_step"] == result.metrics["total_steps"] == steps
    assert [v["epoch"] for v in card["loss_history"]["valid"]] == [1, 2]
    assert m["train_tokens"] == 2 * result.data["train"]["tokens"]              # 2 epochs of real tokens
    assert card["training_params"]["lora_r"] == 4
    readme = (folder / "README.md").read_text(encoding="utf-8")
    assert "sha256" in readme and card["training_data"]["train_sha256"] in readme

    # the held-out loss is the mean per assistant token, the same with any batch size
    per_one = run.trainer.heldout_loss()
    run.trainer.args.per_device_eval_batch_size = 1
    assert per_one == pytest.approx(run.trainer.heldout_loss(), rel=1e-5)
    assert per_one == pytest.approx(m["adapter_valid_loss"], rel=1e-6)

    # the saved adapter + tokenizer reproduce the trained model's logits exactly
    tok = AutoTokenizer.from_pretrained(folder)
    assert tok.chat_template == AutoTokenizer.from_pretrained(base_dir).chat_template
    trained = run.trainer.accelerator.unwrap_model(run.model).eval()
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), folder).eval()
    ids = torch.tensor([run.items["valid"][0].input_ids])
    with torch.no_grad():
        a, b = trained(input_ids=ids).logits, loaded(input_ids=ids).logits
    assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_resume_continues_the_step_count_and_matches_an_uninterrupted_run(small_run, base_dir):
    from safetensors.torch import load_file

    cfg = config(small_run, base_dir, lora_dropout=0.1, local_epochs=2, evaluate_base=False)
    part = train_lora(cfg, max_steps=4)
    total = part.metrics["total_steps"]
    assert total > 4 and part.metrics["global_step"] == 4 and not part.metrics["finished"]
    assert (small_run / "checkpoints" / "t-lora" / "checkpoint-4").is_dir()

    partial = small_run / "checkpoints" / "t-lora" / "checkpoint-6"   # a save cut off by a kill
    partial.mkdir()
    (partial / "adapter_model.safetensors").write_bytes(b"")
    resumed = train_lora(cfg)                         # resume="auto": picks up checkpoint-4, the last complete one
    assert resumed.metrics["resumed_from"] == ["checkpoint-4"]
    assert [r["step"] for r in resumed.history["train"]] == list(range(1, total + 1))
    assert resumed.metrics["global_step"] == total and resumed.metrics["finished"]

    straight = train_lora(cfg, local_run_name="t-straight", resume="never")
    a = [r["loss"] for r in straight.history["train"]]
    b = [r["loss"] for r in resumed.history["train"]]
    assert a == pytest.approx(b, rel=1e-4)
    wa = load_file(str(small_run / "models" / "t-lora" / "adapter_model.safetensors"))
    wb = load_file(str(small_run / "models" / "t-straight" / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys()
    assert all(wa[k].allclose(wb[k], atol=1e-5) for k in wa)

    # other settings: the old checkpoints are not resumed (auto starts over)
    again = train_lora(cfg, lora_r=2, max_steps=2)
    assert again.metrics["resumed_from"] == [] and again.metrics["global_step"] == 2


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_grad_accum_and_fixed_padding_baseline_train(small_run, base_dir):
    result = train_lora(config(small_run, base_dir, grad_accum=2, local_epochs=1, batching="max_length",
                               save_checkpoints=False, local_run_name="t-ga"))
    m = result.metrics
    micro_batches = -(-result.data["train"]["sequences"] // 2)
    assert m["global_step"] == -(-micro_batches // 2)  # one optimizer step per 2 micro-batches
    assert m["padding_fraction"] > 0.2                 # everything padded to max_length=256
    assert m["adapter_valid_loss"] < m["base_valid_loss"]


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_held_out_evaluation_can_be_switched_off(small_run, base_dir):
    result = train_lora(config(small_run, base_dir, local_epochs=1, heldout_eval=False, save_checkpoints=False,
                               local_run_name="t-noeval"))
    assert result.metrics["base_valid_loss"] is None and result.metrics["adapter_valid_loss"] is None
    assert result.history["valid"] == [] and "no comparison" in result.compare()


# ------------------------------------------------------------------------------------ several processes

@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_two_cpu_processes_train_like_one(sample, base_dir, tmp_path):
    """torchrun --nproc_per_node 2 (gloo): the card says world_size 2; the base's held-out loss is
    the same number (the eval is sharded without duplicates and summed), and the adapter's is within
    0.05 nats per token of one process training the same global batch (4 = 2 x 2 processes)."""
    run_dir = _write_run(sample, tmp_path / "ddp", n_train=8, n_valid=3)
    common = dict(local_base_model=str(base_dir), local_mode="train", lora_r=4, lora_alpha=8, local_epochs=2,
                  learning_rate=5e-3, max_length=256, seed=7, save_checkpoints=False)
    params = tmp_path / "ddp.yaml"
    params.write_text(json.dumps(dict(common, run_dir=str(run_dir), local_batch_size=2, local_run_name="ddp2")),
                      encoding="utf-8")
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", KOKORO_TIKTOKEN_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "kokoro_helpers.train_lora", "--params", str(params),
                           "--no-progress"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = cards.load_card(run_dir / "models" / "ddp2.json")
    assert two["training_params"]["world_size"] == 2
    one = train_lora(LoraTrainConfig(**common, run_dir=str(run_dir), local_batch_size=4, local_run_name="ddp1",
                                     progress=False))
    m1, m2 = one.metrics, two["training_metrics"]
    print("1 process:", m1["base_valid_loss"], m1["adapter_valid_loss"], "2 processes:", m2["base_valid_loss"],
          m2["adapter_valid_loss"])
    assert m2["global_step"] == m1["global_step"]
    # the distributed sampler repeats a few sequences so that both processes take as many steps
    assert m1["train_tokens"] <= m2["train_tokens"] <= 1.1 * m1["train_tokens"]
    assert m2["base_valid_loss"] == pytest.approx(m1["base_valid_loss"], abs=1e-4)
    assert m2["adapter_valid_loss"] < m2["base_valid_loss"]
    assert abs(m2["adapter_valid_loss"] - m1["adapter_valid_loss"]) < 0.05


# ------------------------------------------------------------------------------------ a real architecture

QWEN25_JINJA = ROOT / "tests" / "fixtures" / "chat_templates" / "qwen2.5.jinja"   # the real one (SOURCES.md)


def _random_qwen2_folder(base_dir: Path, folder: Path) -> Path:
    """A random-initialised Qwen2 (the architecture of Qwen2.5) with 2 small layers, saved in bf16 with
    save_pretrained, and a tokenizer carrying Qwen2.5-Instruct's real chat template and its ChatML special
    tokens (<|im_end|> ends a turn and generation, as in Qwen's own tokenizer)."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tok = AutoTokenizer.from_pretrained(base_dir)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"], "eos_token": "<|im_end|>"})
    tok.chat_template = QWEN25_JINJA.read_text(encoding="utf-8")
    conf = Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                       tie_word_embeddings=True, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    Qwen2ForCausalLM(conf).to(torch.bfloat16).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def qwen2_run(sample, base_dir, tmp_path_factory):
    """The random Qwen2 folder trained once by the CLI, as with a Hub id (module-scoped: the tests below
    share it, none of them changes it)."""
    root = tmp_path_factory.mktemp("qwen2")
    run_dir = _write_run(sample, root / "run")
    base = _random_qwen2_folder(base_dir, root / "qwen2-random")
    params = root / "p.yaml"
    params.write_text(json.dumps(dict(run_dir=str(run_dir), local_base_model=str(base), local_mode="train",
                                      lora_r=4, lora_alpha=8, local_epochs=1, local_batch_size=2,
                                      learning_rate=5e-3, max_length=256, local_run_name="qwen2-rand",
                                      target_modules="q_proj,k_proj,v_proj,o_proj", precision="fp32")),
                      encoding="utf-8")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KOKORO_TIKTOKEN_OFFLINE", "1")
        assert main(["--params", str(params), "--no-progress"]) == 0
    return run_dir, base


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_a_random_real_architecture_folder_trains_loads_generates_and_merges_in_its_dtype(qwen2_run, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from kokoro_helpers.local.export import merge_and_export
    from kokoro_helpers.local.loading import load

    small_run, base = qwen2_run
    card = cards.load_card(small_run / "models" / "qwen2-rand.json")
    assert card["training_metrics"]["global_step"] == -(-card["training_data"]["train"]["sequences"] // 2)
    lm = load("qwen2-rand", run_dir=small_run)
    reply = lm.generate([{"role": "user", "content": "こんにちは"}], max_new_tokens=4)
    assert isinstance(reply, str)
    out = merge_and_export("qwen2-rand", tmp_path / "merged", run_dir=small_run)
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert merged.dtype == torch.bfloat16                              # the base's dtype, not the CPU's fp32
    assert json.loads((out / "merge_info.json").read_text())["dtype"] == "bfloat16"

    # replacing the folder's weights changes the base's identity: the old checkpoints are not resumed
    # (on a copy: the folder stays the trained run's base for the tests below)
    from kokoro_helpers.local.base_fingerprint import base_fingerprint
    copy = shutil.copytree(base, tmp_path / "qwen2-copy")
    before = base_fingerprint(str(copy))
    assert before == base_fingerprint(str(base))                       # by content, not by path
    with torch.no_grad():
        m = AutoModelForCausalLM.from_pretrained(copy)
        for p in m.parameters():
            p.add_(0.01)
        m.save_pretrained(copy)
    assert base_fingerprint(str(copy)) != before


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_the_random_real_architecture_folder_is_evaluated_by_03_from_its_card(qwen2_run):
    """03's evaluation path as for a Hub id: the card found in run_dir, adapter and base as responders,
    replies generated, cached, and keyed by the base's content."""
    from kokoro_helpers.evaluation import evaluate as ev
    from kokoro_helpers.local.base_fingerprint import base_fingerprint

    run_dir, base = qwen2_run
    logs: list[str] = []
    items = ev.build_eval_items(run_dir, splits=("valid",), max_eval_items=2, log=logs.append)
    assert len(items) == 2
    responders = models_from_run(run_dir, max_tokens=4, local_batch_size=2, progress=False, log=logs.append)
    assert [r.name for r in responders] == ["qwen2-rand", f"{base} (base)"]
    assert responders[1].settings["weights"] == f"base:{base_fingerprint(str(base))}"
    first = ev.generate_all(items, responders, run_dir, log=logs.append)
    assert len(first) == 4 and set(first["model"]) == {r.name for r in responders}
    assert first["response"].map(lambda t: isinstance(t, str)).all() and not first["cached"].any()
    again = ev.generate_all(items, models_from_run(run_dir, max_tokens=4, progress=False, log=logs.append),
                            run_dir, log=logs.append)
    assert again["cached"].all() and list(again["response"]) == list(first["response"])


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_the_random_real_architecture_folder_is_served_by_its_card_name(qwen2_run):
    """The server's app built from the run's card name (as `--model qwen2-rand`), one chat completion."""
    from fastapi.testclient import TestClient

    from kokoro_helpers.local.serve_app import close_app, create_app

    run_dir, _ = qwen2_run
    app = create_app("qwen2-rand", run_dir=run_dir, max_tokens=4, temperature=0.0)
    try:
        with TestClient(app, base_url="http://127.0.0.1") as client:   # the loopback host guard
            listed = client.get("/v1/models")
            assert listed.status_code == 200, listed.text
            models = [m["id"] for m in listed.json()["data"]]
            assert models[0] == "qwen2-rand"
            resp = client.post("/v1/chat/completions", json={
                "model": "qwen2-rand", "max_tokens": 4,
                "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "こんにちは"}]})
            assert resp.status_code == 200, resp.text
            body = resp.json()
            choice = body["choices"][0]
            assert body["model"] == "qwen2-rand" and choice["message"]["role"] == "assistant"
            assert isinstance(choice["message"]["content"], str) and choice["finish_reason"] in ("stop", "length")
            assert 0 < body["usage"]["completion_tokens"] <= 4
    finally:
        close_app(app)


def test_local_mode_auto_explains_why_the_folder_does_not_train_on_a_cpu(qwen2_run, monkeypatch):
    from transformers import AutoModelForCausalLM

    import kokoro_helpers.local.train_plan as tl

    _, base = qwen2_run
    monkeypatch.setattr(tl, "_cuda_available", lambda: False)
    plan = make_plan(LoraTrainConfig(local_base_model=str(base), local_mode="auto"))
    assert plan.action == "skip"
    n = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(base).parameters()) / 1e6
    assert (f"local_mode 'auto' does not train {str(base)!r} (Qwen2ForCausalLM, {n:.1f} M parameters) on a "
            "CPU-only machine") in plan.reason
    assert "only the embedded smoke model trains on a CPU by default" in plan.reason
    assert "local_mode='train'" in plan.reason                        # and how to train it anyway
    monkeypatch.setattr(tl, "_cuda_available", lambda: True)
    import torch
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    gpu = make_plan(LoraTrainConfig(local_base_model=str(base), local_mode="auto"))
    assert gpu.action == "train" and "GPU" in gpu.reason


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_a_killed_cli_run_resumes_from_the_trainers_checkpoint(small_run, base_dir, tmp_path):
    """SIGKILL the CLI once a checkpoint exists; the same command continues from it (same run name)."""
    import signal
    import time

    params = tmp_path / "p.yaml"
    params.write_text(json.dumps(dict(run_dir=str(small_run), local_base_model=str(base_dir), local_mode="train",
                                      lora_r=4, lora_alpha=8, local_epochs=3, local_batch_size=2,
                                      learning_rate=5e-3, max_length=256, local_run_name="t-kill", save_steps=2,
                                      heldout_eval=False)), encoding="utf-8")
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", KOKORO_TIKTOKEN_OFFLINE="1")
    cmd = [sys.executable, "-m", "kokoro_helpers.train_lora", "--params", str(params), "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    root = small_run / "checkpoints" / "t-kill"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        done = [p for p in root.glob("checkpoint-*") if (p / "trainer_state.json").is_file()]
        if done:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if not done:
        pytest.skip("the run finished before a checkpoint could be caught")
    assert subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, timeout=600).returncode == 0
    card = cards.load_card(small_run / "models" / "t-kill.json")
    m = card["training_metrics"]
    assert m["resumed_from"] and m["resumed_from"][0].startswith("checkpoint-") and m["finished"]
    assert [r["step"] for r in card["loss_history"]["train"]] == list(range(1, m["total_steps"] + 1))


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_packing_keeps_dialogues_apart_and_trains(small_run, base_dir):
    run = LoraRun(config(small_run, base_dir, local_epochs=1, packing=True, save_checkpoints=False,
                         local_run_name="t-pack", max_length=512))
    result = run.train()
    m = result.metrics
    assert m["adapter_valid_loss"] < m["base_valid_loss"]
    rows = run.trainer.train_dataset
    assert "seq_lengths" in rows.column_names                  # each row knows where its dialogues start
    assert len(rows) < result.data["train"]["sequences"]          # fewer, fuller rows
    assert all(sum(n) <= 512 for n in rows["seq_lengths"])
