"""Real model configs, LoRA, the KL reference, export and the GPU check, all offline on CPU.

The Qwen configs are checked on random-initialised 2-layer models of their real architecture:
each test writes the model's config.json (literal numbers from the hub) and the project's byte
tokenizer into a folder and sets ``model.path`` to it, with ``model.random_init_layers=2``.
"""
import contextlib
import copy
import json
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import compose
from safetensors.torch import load_file

from mgrpo_cli.algo.loss import completion_logps
from mgrpo_cli.cli import build
from mgrpo_cli.grading.grader import Grader
from mgrpo_cli.grading.rewards import Scored
from mgrpo_cli.models.loading import apply_lora, export, is_peft, load_policy, reference_policy
from mgrpo_cli.models.tiny import build_byte_tokenizer, build_tiny_model
from mgrpo_cli.rollout.engine import HFEngine

# config.json of each hub model, the numbers that fix its architecture
QWEN = {
    "qwen0.5b": ("Qwen/Qwen2.5-0.5B-Instruct", {
        "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
        "num_key_value_heads": 2, "vocab_size": 151936, "tie_word_embeddings": True,
        "max_position_embeddings": 32768, "rope_theta": 1000000.0, "sliding_window": 32768,
        "max_window_layers": 21, "bos_token_id": 151643, "eos_token_id": 151645}),
    "qwen1.5b": ("Qwen/Qwen2.5-Math-1.5B", {
        "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28, "num_attention_heads": 12,
        "num_key_value_heads": 2, "vocab_size": 151936, "tie_word_embeddings": True,
        "max_position_embeddings": 4096, "rope_theta": 10000.0, "sliding_window": 4096,
        "max_window_layers": 21, "bos_token_id": 151643, "eos_token_id": 151643}),
    "qwen7b": ("Qwen/Qwen2.5-Math-7B", {
        "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
        "num_key_value_heads": 4, "vocab_size": 152064, "tie_word_embeddings": False,
        "max_position_embeddings": 4096, "rope_theta": 10000.0, "sliding_window": 4096,
        "max_window_layers": 28, "bos_token_id": 151643, "eos_token_id": 151643}),
}
COMMON = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
          "rms_norm_eps": 1e-06, "use_sliding_window": False, "attention_dropout": 0.0,
          "initializer_range": 0.02, "torch_dtype": "bfloat16"}


def model_folder(path: Path, numbers: dict) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({**COMMON, **numbers}))
    build_byte_tokenizer().save_pretrained(path)
    return path


def qwen2_parameters(c: dict, layers: int) -> int:
    h, i, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    kv = c["num_key_value_heads"] * h // c["num_attention_heads"]
    per_layer = (h * h + h) + 2 * (h * kv + kv) + h * h + 3 * h * i + 2 * h  # q, k, v (biased), o, MLP, norms
    return v * h * (1 if c["tie_word_embeddings"] else 2) + layers * per_layer + h


def test_every_model_config_composes_with_its_hub_name():
    for name, (hub, _) in QWEN.items():
        m = compose("train", [f"model={name}"]).model
        assert (m.name, m.path, m.dtype, m.prompt_template) == (name, hub, "auto", "chat")
        assert m.gradient_checkpointing and m.attn_implementation == "sdpa" and m.max_completion_length > 0
    tiny = compose("train", ["model=tiny"]).model
    assert tiny.path is None and tiny.dtype == "float32"


@pytest.mark.parametrize("name", list(QWEN))
def test_model_config_loads_a_random_init_model_of_the_real_architecture(name, tmp_path):
    _, numbers = QWEN[name]
    folder = model_folder(tmp_path / name, numbers)
    cfg = compose("train", [f"model={name}", f"model.path={folder}", "model.random_init_layers=2"])
    # 7B's two layers and untied 152064 x 3584 embeddings would be 6 GB of fp32: its shapes are
    # checked on the meta device; the others are really built, and run forward
    real = name != "qwen7b"
    with contextlib.nullcontext() if real else torch.device("meta"):
        model, tok = load_policy(build.model_spec(cfg.model), "cpu", seed=0)
    c = model.config
    assert (c.model_type, c.num_hidden_layers, c.hidden_size, c.intermediate_size) == (
        "qwen2", 2, numbers["hidden_size"], numbers["intermediate_size"])
    assert (c.num_attention_heads, c.num_key_value_heads, c.vocab_size, c.tie_word_embeddings) == (
        numbers["num_attention_heads"], numbers["num_key_value_heads"], numbers["vocab_size"],
        numbers["tie_word_embeddings"])
    assert sum(p.numel() for p in model.parameters()) == qwen2_parameters(numbers, layers=2)
    assert model.dtype == torch.float32  # dtype auto: fp32 on CPU (bf16 on a GPU)
    assert model.is_activation_checkpointing and c._attn_implementation == "sdpa"
    assert tok.decode(tok("a b\nc", add_special_tokens=False)["input_ids"]) == "a b\nc"
    if real:
        from mgrpo_cli.rollout.prompts import PromptRenderer

        prompt = PromptRenderer(tok, cfg.model.prompt_template, cfg.system_prompt, "continue", "", "").render(
            "What is 2+3?")
        ids = tok(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model.eval()(input_ids=ids).logits
        assert logits.shape == (1, ids.shape[1], numbers["vocab_size"]) and torch.isfinite(logits).all()
        again, _ = load_policy(build.model_spec(cfg.model), "cpu", seed=0)  # the seed fixes the random weights
        assert torch.equal(next(again.parameters()), next(model.parameters()))


class ParityReward:
    """A reward with variance on a random model: 1 when the first character's code is even."""

    def __init__(self):
        self.grader = Grader(timeout_s=2.0, last_number_fallback=False)

    def reseed(self, seed):  # draws nothing at random
        pass

    def __call__(self, completions, golds, **fields):
        ok = [bool(c) and ord(c[0]) % 2 == 0 for c in completions]
        return Scored(rewards=[float(x) for x in ok], correct=ok)


def test_reference_policy_by_beta_and_lora(small_cfg):
    cfg = small_cfg()
    tok = build_byte_tokenizer()
    policy = build_tiny_model(build.model_spec(cfg.model), tok)
    assert reference_policy(policy, beta=0.0) is None
    ref = reference_policy(policy, beta=0.04)
    assert ref is not policy and not any(p.requires_grad for p in ref.parameters())
    assert reference_policy(apply_lora(policy, build.lora_spec(small_cfg("lora=default").lora)), beta=0.04) is None


def test_lora_steps_train_only_the_adapter_and_the_reference_is_the_base(small_cfg):
    cfg = small_cfg("lora=default", "grpo.beta=0.1", "model.max_completion_length=8", "trainer.max_steps=2")
    tok = build_byte_tokenizer()
    base = build_tiny_model(build.model_spec(cfg.model), tok, seed=0)
    pristine = copy.deepcopy(base).eval()
    policy = apply_lora(base, build.lora_spec(cfg.lora))
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    reward = ParityReward()
    module = build.module(cfg, policy, tok, reward)
    assert module.reference is None  # no second copy: the adapter is disabled instead
    train_dl = build.train_loader(build.problem_stream(cfg), module)
    trainer = L.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        limit_val_batches=0, enable_model_summary=False)
    trainer.fit(module, train_dataloaders=train_dl)
    changed = {n for n, p in policy.named_parameters() if not torch.equal(before[n], p)}
    assert changed and all("lora_" in n for n in changed)
    assert any("lora_B" in n for n in changed)  # B starts at zero: the adapter now does something
    assert trainer.callback_metrics["train/layer1/kl"] > 0

    policy.eval()
    rollout = HFEngine(policy, tok, max_prompt_length=512, seed=1).generate(["3+4=\n", "12-5=\n"], n=3, max_new_tokens=10, temperature=1.0)
    rows = torch.arange(len(rollout.texts))
    ref = module._ref_logps(rollout, rows)
    torch.testing.assert_close(ref, completion_logps(pristine, rollout, rows, 1.0), rtol=0, atol=1e-6)
    assert not torch.allclose(ref, completion_logps(policy, rollout, rows, 1.0), atol=1e-4)
    reward.grader.close()


@pytest.mark.parametrize("mode", ["full", "merged", "adapter"])
def test_export_then_reload_gives_identical_logps(mode, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = build_byte_tokenizer()
    cfg = compose("train", ["lora=default" if mode != "full" else "lora=none", f"lora.export={'adapter' if mode == 'adapter' else 'merged'}"])
    base_dir = tmp_path / "base"
    build_tiny_model(build.model_spec(cfg.model), tok, seed=0).save_pretrained(base_dir)
    tok.save_pretrained(base_dir)
    policy, tok = load_policy(build.model_spec(cfg.model), "cpu", path=str(base_dir))
    gen = torch.Generator().manual_seed(0)
    if mode == "full":
        for p in policy.parameters():
            p.data.add_(0.02 * torch.randn(p.shape, generator=gen))
    else:
        policy = apply_lora(policy, build.lora_spec(cfg.lora))
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.data.copy_(0.05 * torch.randn(p.shape, generator=gen))
    policy.eval()
    rollout = HFEngine(policy, tok, max_prompt_length=512, seed=0).generate(["3+4=\n", "12-5+1=\n"], n=2, max_new_tokens=12, temperature=1.0)
    rows = torch.arange(len(rollout.texts))
    want = completion_logps(policy, rollout, rows, 1.0)

    folder = export(policy, tok, tmp_path / "export", merge_lora=mode != "adapter")
    assert (folder / "adapter_config.json").is_file() == (mode == "adapter")
    assert is_peft(policy) == (mode != "full")  # merging worked on a copy
    loaded = [load_policy(build.model_spec(cfg.model), "cpu", path=str(folder))[0],  # what `mgrpo eval model.path=<folder>` does
              AutoModelForCausalLM.from_pretrained(folder)]  # plain transformers (peft loads an adapter's base)
    for model in loaded:
        got = completion_logps(model.eval(), rollout, rows, 1.0)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5 if mode == "merged" else 1e-6)
    reloaded_tok = AutoTokenizer.from_pretrained(folder)
    assert reloaded_tok("1 + 2\n")["input_ids"] == tok("1 + 2\n")["input_ids"]


def test_adapter_export_needs_a_base_on_disk(small_cfg):
    tok = build_byte_tokenizer()
    with pytest.raises(ValueError, match="lora.export=adapter"):
        apply_lora(build_tiny_model(build.model_spec(small_cfg().model), tok), build.lora_spec(small_cfg("lora=default", "lora.export=adapter").lora))


def test_lora_run_exports_merged_and_eval_exports_the_same_from_its_checkpoint(small_cfg, tmp_path):
    from mgrpo_cli.cli.evaluate import run_eval
    from mgrpo_cli.cli.train import run_train

    run_train(small_cfg("lora=default", "model.max_completion_length=16", "eval.limit=4"))
    run = next((tmp_path / "train" / "runs").iterdir())
    assert (run / "export" / "model.safetensors").is_file() and not (run / "export" / "adapter_config.json").exists()
    common = ["logger=none", f"paths.outputs={tmp_path}", "dataset=arith", "eval.limit=4", "trainer.threads=2"]
    run_eval(compose("eval", common + [f"checkpoint={run / 'checkpoints' / 'last.ckpt'}",
                                       f"export_to={tmp_path / 'from_ckpt'}"]))
    a, b = load_file(run / "export" / "model.safetensors"), load_file(tmp_path / "from_ckpt" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    summary = run_eval(compose("eval", common + [f"model.path={run / 'export'}"]))
    assert summary["n"] == 4 and "acc_t2" in summary


def test_disable_dropout_makes_train_mode_log_probs_deterministic():
    from mgrpo_cli.models.loading import disable_dropout

    tok = build_byte_tokenizer()
    model = build_tiny_model(build.model_spec(compose("train").model), tok, seed=0)
    model.config.attention_dropout = 0.5
    for m in model.modules():
        if hasattr(m, "attention_dropout"):
            m.attention_dropout = 0.5
    model = apply_lora(model, build.lora_spec(compose("train", ["lora=default"]).lora))  # LoRA's nn.Dropout, p = 0.05
    model.train()
    ids = torch.tensor([[65, 66, 67, 68, 69, 70]])
    with torch.no_grad():
        noisy = [model(input_ids=ids).logits for _ in range(2)]
    assert not torch.equal(*noisy)
    assert disable_dropout(model) > 0
    with torch.no_grad():
        same = [model(input_ids=ids).logits for _ in range(2)]
    assert torch.equal(*same)


def test_fp32_head_keeps_the_tie_and_runs_in_float32_under_bf16():
    from mgrpo_cli.models.loading import Fp32Head, cast_lm_head_to_fp32

    tok = build_byte_tokenizer()
    model = build_tiny_model(build.model_spec(compose("train").model), tok, seed=0).to(torch.bfloat16)
    cast_lm_head_to_fp32(model)
    head = model.get_output_embeddings()
    assert type(head) is Fp32Head and head.weight is model.get_input_embeddings().weight  # still tied
    assert head.weight.dtype == torch.float32 and model.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    ids = torch.tensor([[65, 66, 67]])
    logits = model(input_ids=ids).logits
    assert logits.dtype == torch.float32
    model.to(torch.bfloat16)  # a precision plugin's cast: re-applying restores the fp32 head
    cast_lm_head_to_fp32(model)
    assert head.weight.dtype == torch.float32 and model(input_ids=ids).logits.dtype == torch.float32
    ref = copy.deepcopy(model)  # the KL reference's copy computes with its own head
    with torch.no_grad():
        ref.get_output_embeddings().weight.mul_(0)
    assert not torch.equal(ref(input_ids=ids).logits, model(input_ids=ids).logits)
