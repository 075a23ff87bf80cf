"""Bytes, FLOPs and bounds of decoding and of the loss pass (scripts/perf.py), against numbers worked out by hand."""
import perf
import pytest
from perf import GPU, ModelShape

# hidden 8, intermediate 16, 2 layers, 2 heads and 1 key/value head of width 4, vocabulary 10, tied
SMALL = ModelShape(hidden=8, intermediate=16, layers=2, heads=2, kv_heads=1, head_dim=4, vocab=10)
SMALL_CONFIG = {"model_type": "qwen2", "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 2,
                "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 10, "tie_word_embeddings": True}
QWEN25_1P5B = {"model_type": "qwen2", "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
               "num_attention_heads": 12, "num_key_value_heads": 2, "vocab_size": 151936,
               "tie_word_embeddings": True}


def test_shape_from_config_dict_and_object():
    from transformers import Qwen2Config

    assert ModelShape.from_config(SMALL_CONFIG) == SMALL
    assert ModelShape.from_config(Qwen2Config(**SMALL_CONFIG)) == SMALL
    llama = ModelShape.from_config({**SMALL_CONFIG, "model_type": "llama", "tie_word_embeddings": False})
    assert not llama.qkv_bias and not llama.tied


def test_parameter_counts_by_hand():
    # q 8x8 + k,v 2 x 8x4 + o 8x8 + MLP 3 x 8x16 = 64 + 64 + 64 + 384
    assert perf.layer_matmul_params(SMALL) == 576
    # embedding 80 + 2 x (576 + biases 16 + norms 16) + final norm 8
    assert perf.parameters(SMALL) == 1304
    assert perf.parameters(ModelShape(**{**SMALL.__dict__, "tied": False})) == 1384  # + lm_head 80
    assert perf.kv_elements_per_position(SMALL) == 16  # k and v, 2 layers, 1 head of 4


@pytest.mark.parametrize("config", [SMALL_CONFIG, QWEN25_1P5B,
                                    {**SMALL_CONFIG, "model_type": "llama", "tie_word_embeddings": False}])
def test_parameter_count_equals_the_transformers_model(config):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    hf = AutoConfig.for_model(**config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf)
    assert perf.parameters(ModelShape.from_config(config)) == sum(p.numel() for p in model.parameters())


def test_flops_and_bytes_by_hand():
    # matmuls 2 x 2 layers x 576 x 3 tokens = 6912; lm_head 2 x 80 x 2 = 320; attention 4 x 2 x 2 x 4 x 5 = 320
    assert perf.forward_flops(SMALL, tokens=3, logit_tokens=2, attended_pairs=5) == 7552
    assert perf.causal_pairs(3) == 6
    # 3 rows attending 5 positions: 6912 + 480 + 960
    assert perf.decode_step_flops(SMALL, batch=3, context=5) == 8352
    # bf16 weights 2 x 1304, keys/values 3 x 5 x 16 x 2 bytes
    assert perf.decode_step_bytes(SMALL, batch=3, context=5) == 3088
    untied = ModelShape(**{**SMALL.__dict__, "tied": False})  # the embedding read as the 3 rows looked up
    assert perf.decode_step_bytes(untied, batch=3, context=5) == 2 * (1384 - 80 + 24) + 480
    assert perf.decode_step_bytes(SMALL, batch=3, context=5, weight_bytes=4, kv_bytes=4) == 2 * 3088


def test_generation_bound_by_hand():
    # 1 prompt of 3 tokens x 2 samples x 3 new tokens: a prefill, then 2 steps of 2 rows at contexts 4 and 5
    memory_bound = perf.generation_bound(SMALL, GPU("toy", bandwidth=1000.0, peak_flops=10000.0),
                                         prompts=1, n=2, prompt_len=3, new_tokens=3)
    assert memory_bound["prefill_flops"] == 6912 + 160 + 384 and memory_bound["prefill_bytes"] == 2608 + 96
    assert memory_bound["decode_bytes"] == 2864 + 2928 and memory_bound["decode_flops"] == 5440 + 5568
    assert memory_bound["decode_memory_bound_s"] == pytest.approx(5.792)
    assert memory_bound["decode_compute_bound_s"] == pytest.approx(1.1008)
    assert memory_bound["bound_s"] == pytest.approx(2.704 + 5.792)
    assert memory_bound["bound_tokens_per_s"] == pytest.approx(6 / 8.496)
    # a slower chip: the prefill becomes compute-bound (7456 / 2000), the steps stay memory-bound
    mixed = perf.generation_bound(SMALL, GPU("toy", 1000.0, 2000.0), prompts=1, n=2, prompt_len=3, new_tokens=3)
    assert mixed["bound_s"] == pytest.approx(3.728 + 2.864 + 2.928)


def test_loss_pass_flops_by_hand():
    # shared prompts: the prompt as the prefill (7456); 2 rows x 2 completion tokens through the model and
    # lm_head (9216 + 640), attending 3 + causal: 2 x (2 x 3 + 3) = 18 pairs x 64
    shared = 7456 + 9216 + 640 + 64 * 18
    assert perf.logps_forward_flops(SMALL, groups=1, n=2, prompt_len=3, completion_len=3) == shared
    # one sequence per row: 2 x 6 tokens (27648), 2 x 4 positions through lm_head (1280), 2 x 21 pairs
    per_row = 2 * 2 * 576 * 12 + 2 * 80 * 8 + 64 * 42
    assert perf.logps_forward_flops(SMALL, 1, 2, 3, 3, shared_prompts=False) == per_row
    got = perf.loss_pass_flops(SMALL, groups=1, n=2, prompt_len=3, completion_len=3)
    assert got["flops"] == 4 * shared and got["tokens"] == 9
    assert perf.loss_pass_flops(SMALL, 1, 2, 3, 3, reference=False)["flops"] == 3 * shared
    assert perf.loss_pass_flops(SMALL, 1, 2, 3, 3, policy_shared_prompts=False)["flops"] == 3 * per_row + shared


def test_the_issues_decode_step_at_qwen25_1p5b_on_an_h200():
    """Batch 256 at ~700 positions: ~3.1 GB of bf16 weights + ~5.1 GB of cache, ~1.7 ms at 4.8 TB/s."""
    shape = ModelShape.from_config(QWEN25_1P5B)
    assert perf.parameters(shape) == 1_543_714_304
    kv = 256 * 700 * perf.kv_elements_per_position(shape) * 2
    assert kv == pytest.approx(5.14e9, rel=1e-3)
    h200 = perf.gpu_spec("NVIDIA H200")
    seconds = perf.decode_step_bytes(shape, 256, 700) / h200.bandwidth
    assert seconds == pytest.approx(1.714e-3, rel=1e-3)
    assert 256 / seconds == pytest.approx(149_000, rel=0.01)
    # bandwidth-bound, but the matmuls already need half that time at the dense bf16 peak
    assert perf.decode_step_flops(shape, 256, 700) / h200.peak_flops == pytest.approx(0.83e-3, rel=0.01)


def test_gpu_table_and_overrides():
    assert perf.gpu_spec("NVIDIA H100 80GB HBM3").name == "H100 SXM"
    assert perf.gpu_spec("NVIDIA H100 PCIe").bandwidth == 2.0e12
    assert perf.gpu_spec("NVIDIA A100-SXM4-80GB").bandwidth == pytest.approx(2.039e12)
    assert perf.gpu_spec("NVIDIA A100-SXM4-40GB").bandwidth == pytest.approx(1.555e12)
    assert perf.gpu_spec("NVIDIA H200").peak_flops == pytest.approx(989.4e12)
    assert perf.gpu_spec("NVIDIA H200", bandwidth=4.0).bandwidth == 4.0e12
    assert perf.gpu_spec("cpu", bandwidth=0.05, peak_tflops=1.0) == GPU("cpu", 0.05e12, 1.0e12)
    with pytest.raises(ValueError, match="--bandwidth"):
        perf.gpu_spec("Some Future GPU")
    assert perf.fraction(50.0, 200.0) == 0.25


def test_forward_flops_equal_torchs_flop_counter():
    """torch's FlopCounterMode over a real forward (eager attention multiplies every query with every
    key, so the pairs are L x L here) counts what forward_flops says."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import AutoConfig, AutoModelForCausalLM

    for config in (SMALL_CONFIG, {**SMALL_CONFIG, "vocab_size": 300, "num_key_value_heads": 2}):
        hf = AutoConfig.for_model(**config)
        hf._attn_implementation = "eager"
        model = AutoModelForCausalLM.from_config(hf).eval()
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            model(torch.zeros(2, 6, dtype=torch.long))
        assert counter.get_total_flops() == perf.forward_flops(ModelShape.from_config(config), 12, 12, 2 * 36)
