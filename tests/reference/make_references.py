#!/usr/bin/env python3
"""tests/reference/make_references.py — the reference outputs cpet's io / nn tests compare against.

Run once by a developer (needs PyPI torch, transformers, safetensors; peft for the adapter files); its outputs are
committed, so the C++ tests need no Python:

  python3 tests/reference/make_references.py [--minilm DIR] [--only minilm,wordpiece,llama]

  minilm     minilm_reference.safetensors: for a dozen varied sentences the token ids (HF tokenizer, truncated to
             64 tokens), the last hidden states and the mean-pooled sentence embedding of all-MiniLM-L6-v2
             (transformers BertModel, fp32). DIR defaults to $CPET_MINILM_DIR, else build*/models/all-MiniLM-L6-v2
             (cmake/fetch_minilm.sh puts it there).
  wordpiece  wordpiece_reference.json: token ids of ~60 tricky strings by the HF BertTokenizer (slow, Python) and
             BertTokenizerFast (Rust), which must agree; cpet's WordPiece is checked token for token against them.
  bert       tiny-bert/ (save_pretrained of a seeded 2-layer BertForSequenceClassification, 3 labels) and
             tiny_bert_reference.safetensors (padded ids with token types, last hidden states, logits).
  peft       peft_<name>/ (PEFT save_pretrained: adapter_config.json + adapter_model.safetensors) for LoRA (BERT with
             rank_pattern / alpha_pattern, LLaMA rsLoRA with a regex target), IA3 and prefix tuning on both tiny
             models, adapter weights randomised; peft_<name>_reference.safetensors holds the adapted outputs.
  --check-cpet-adapter DIR...  loads adapters cpet wrote (tests/io/test_peft.cpp and test_peft_write.cpp write
             them when CPET_WRITE_ADAPTERS=dir is set: LoRA, IA3, prefix tuning) in PEFT and compares PEFT's outputs
             with cpet's, and with the committed reference of the PEFT adapter they came from where cpet names it.
  llama      tiny-llama/ (save_pretrained of a seeded 2-layer LlamaForCausalLM with GQA and RoPE, ~450 KB) and
             tiny_llama_reference.safetensors (its input ids and logits).
"""
import argparse
import glob
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A man is playing a guitar.",
    "Someone is playing an instrument on stage.",
    "Café, naïve façade: résumé déjà vu à Zürich!",
    "東京は日本の首都です。",
    "I love 北京烤鸭 and dim sum.",
    "Hello!!! How are you??? (fine, thanks) -- ok...",
    "unaffable unbelievably antidisestablishmentarianism",
    "E-mail me at someone@example.com or call +1 (555) 010-9999.",
    "The stock market fell 3.5% on Monday; analysts weren't surprised.",
    "ÀÉÎÕÜ ŠČŘŽ ÅÆØ ß œ",
    " ".join(["This long sentence repeats to be truncated at the maximum length."] * 8),
]

WORDPIECE_EXTRA = [
    "", " ", "   leading and trailing   ", "UPPER lower MiXeD", "tab\tnew\nline\r\nreturn",
    "don't won't can't y'all", "a.b,c;d:e!f?g", "[CLS] [SEP] [PAD] [MASK] [UNK] literal specials",
    "#hashtag ##subword", "unaffable", "xyzzyqwertyplugh", "supercalifragilisticexpialidocious",
    "naïve coöperate Ångström Øresund Łódź İstanbul", "crème brûlée", "Ça va? Où est-ce?",
    "ñandú pingüino", "Straße Maße", "ﬁnance ﬂow", "１２３ ＡＢＣ", "…—–‘’“”", "€100 £50 ¥1000 $5",
    "1,000,000.50", "3.14159 2.71828", "emoji 😀 🎉 👍🏽", "中文分词测试", "日本語のテキスト", "한국어 텍스트",
    "mixed中文and English", "Ελληνικά κείμενο", "Русский текст", "עברית", "العربية", "हिन्दी",
    "ภาษาไทย", "\u00a0non\u00a0breaking\u00a0space", "zero\u200bwidth", "control\u0007char", "a\u0301 combining",
    "e\u0300\u0301\u0302 stacked", "ABC\u00ad soft hyphen", "http://example.com/path?query=1&b=2",
    "C++ is not C#", "snake_case and kebab-case", "\"quoted\" 'single'", "(parentheses) {braces} <angle>",
    "@mention ~tilde `backtick` ^caret |pipe \\backslash", "ⅷ ① ²³", "ǅ ǈ ǋ titlecase",
    "Ⅻ roman", "x" * 120, "a " * 40, "ﬀ ﬃ ligatures", "İ ı dotted", "Ω Å K signs",
    "ÆØÅ æøå", "ĳ Ĳ", "ǲ", "tokens\u3000ideographic space",
]


def find_minilm(arg):
    cands = [arg, os.environ.get("CPET_MINILM_DIR")] + sorted(glob.glob(os.path.join(ROOT, "build*", "models",
                                                                                   "all-MiniLM-L6-v2")))
    for c in cands:
        if c and os.path.isfile(os.path.join(c, "model.safetensors")):
            return c
    sys.exit("all-MiniLM-L6-v2 not found: run cmake/fetch_minilm.sh or pass --minilm DIR")


def make_minilm(model_dir):
    import torch
    from safetensors.torch import save_file
    from transformers import BertModel, BertTokenizer, BertTokenizerFast

    slow = BertTokenizer(os.path.join(model_dir, "vocab.txt"), do_lower_case=True)
    fast = BertTokenizerFast(os.path.join(model_dir, "vocab.txt"), do_lower_case=True)
    model = BertModel.from_pretrained(model_dir, torch_dtype=torch.float32, add_pooling_layer=False).eval()
    out, meta = {}, {"max_length": "64", "sentences": str(len(SENTENCES))}
    for i, s in enumerate(SENTENCES):
        enc = slow(s, truncation=True, max_length=64)
        assert enc["input_ids"] == fast(s, truncation=True, max_length=64)["input_ids"], s
        ids = torch.tensor([enc["input_ids"]])
        with torch.no_grad():
            h = model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state[0]
        out[f"ids.{i}"] = ids[0].to(torch.int32).contiguous()
        out[f"hidden.{i}"] = h.contiguous()
        out[f"mean.{i}"] = h.mean(dim=0).contiguous()
        meta[f"sentence.{i}"] = s
    # A padded batch of all sentences: the masked mean must equal the per-sentence mean (HF pads on the right).
    batch = slow(SENTENCES, truncation=True, max_length=64, padding=True, return_tensors="pt")
    with torch.no_grad():
        hb = model(**batch).last_hidden_state
    m = batch["attention_mask"].unsqueeze(-1).float()
    pooled = (hb * m).sum(1) / m.sum(1)
    for i in range(len(SENTENCES)):
        assert torch.nn.functional.cosine_similarity(pooled[i], out[f"mean.{i}"], dim=0) > 0.99999
    path = os.path.join(HERE, "minilm_reference.safetensors")
    save_file(out, path, metadata=meta)
    print(f"wrote {path} ({os.path.getsize(path)} bytes)")


def make_wordpiece(model_dir):
    from transformers import BertTokenizer, BertTokenizerFast

    slow = BertTokenizer(os.path.join(model_dir, "vocab.txt"), do_lower_case=True)
    fast = BertTokenizerFast(os.path.join(model_dir, "vocab.txt"), do_lower_case=True)
    cases = []
    for s in SENTENCES + WORDPIECE_EXTRA:
        a = slow(s, truncation=True, max_length=32)["input_ids"]
        b = fast(s, truncation=True, max_length=32)["input_ids"]
        full = slow(s)["input_ids"]
        if a != b or full != fast(s)["input_ids"]:
            print(f"note: slow and fast HF tokenizers disagree on {s!r}: {a} vs {b}; keeping the slow one")
        cases.append({"text": s, "ids_max32": a, "ids": full})
    pairs = []
    texts = SENTENCES + WORDPIECE_EXTRA
    for i in range(0, len(texts) - 1, 3):
        a, b = texts[i], texts[i + 1]
        enc = slow(a, b, truncation="longest_first", max_length=24)
        pairs.append({"a": a, "b": b, "ids_max24": enc["input_ids"], "type_ids_max24": enc["token_type_ids"]})
    path = os.path.join(HERE, "wordpiece_reference.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"vocab": "all-MiniLM-L6-v2 vocab.txt (bert-base-uncased)", "do_lower_case": True,
                   "cases": cases, "pairs": pairs}, f, ensure_ascii=False, indent=0)
    print(f"wrote {path} ({os.path.getsize(path)} bytes)")


def make_llama():
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6,
                      rope_theta=10000.0, tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # HF initialises norms to 1: perturb them so a wrong norm weight would show
        for n, p in model.named_parameters():
            if "norm" in n:
                p.copy_(1 + 0.2 * torch.randn_like(p))
    d = os.path.join(HERE, "tiny-llama")
    model.save_pretrained(d, safe_serialization=True)
    for extra in ("generation_config.json",):
        if os.path.exists(os.path.join(d, extra)):
            os.remove(os.path.join(d, extra))
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 256, (2, 11), generator=g)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    path = os.path.join(HERE, "tiny_llama_reference.safetensors")
    save_file({"ids": ids.to(torch.int32).contiguous(), "logits": logits.contiguous()}, path)
    print(f"wrote {d} and {path} ({os.path.getsize(path)} bytes)")


def make_bert():
    import torch
    from safetensors.torch import save_file
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=40, type_vocab_size=2, num_labels=3,
                     hidden_act="gelu", layer_norm_eps=1e-12)
    model = BertForSequenceClassification(cfg).eval()
    with torch.no_grad():  # HF initialises LayerNorms to (1, 0) and biases to 0: perturb so a wrong one shows
        for n, p in model.named_parameters():
            if "LayerNorm.weight" in n:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif n.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    d = os.path.join(HERE, "tiny-bert")
    model.save_pretrained(d, safe_serialization=True)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(1, 120, (3, 9), generator=g)
    mask = torch.tensor([[1] * 9, [1] * 5 + [0] * 4, [1] * 7 + [0] * 2])
    types = torch.tensor([[0] * 4 + [1] * 5, [0] * 3 + [1] * 2 + [0] * 4, [0] * 9])
    ids = ids * mask  # pad id 0
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, token_type_ids=types, output_hidden_states=True)
    hidden = out.hidden_states[-1] * mask.unsqueeze(-1)
    path = os.path.join(HERE, "tiny_bert_reference.safetensors")
    save_file({"ids": ids.to(torch.int32).contiguous(), "type_ids": types.to(torch.int32).contiguous(),
               "lengths": mask.sum(1).to(torch.int32).contiguous(), "hidden": hidden.contiguous(),
               "logits": out.logits.contiguous()}, path)
    print(f"wrote {d} and {path} ({os.path.getsize(path)} bytes)")


def _randomize_peft(model, seed):
    """PEFT initialises LoRA B to zero and IA3 vectors to one (the adapter adds nothing): randomise them so the
    reference outputs depend on every adapter tensor."""
    import torch
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n or "lora_A" in n:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
            elif "ia3_l" in n:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            elif "prompt_encoder" in n or "prompt_embeddings" in n:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))


def make_peft():
    """PEFT adapters on the tiny BERT and tiny LLaMA (peft_<name>/ as save_pretrained writes them) and the outputs
    of the adapted models (peft_<name>_reference.safetensors)."""
    import torch
    from peft import IA3Config, LoraConfig, PrefixTuningConfig, get_peft_model
    from safetensors.torch import save_file
    from transformers import BertModel, LlamaForCausalLM

    bert_ref = safe_load(os.path.join(HERE, "tiny_bert_reference.safetensors"))
    llama_ref = safe_load(os.path.join(HERE, "tiny_llama_reference.safetensors"))
    cases = {
        "bert_lora": ("bert", LoraConfig(r=4, lora_alpha=8, target_modules=["query", "key", "value",
                                                                             "attention.output.dense",
                                                                             "intermediate.dense"],
                                         rank_pattern={"key": 2}, alpha_pattern={"value": 3.0})),
        "llama_lora": ("llama", LoraConfig(r=4, lora_alpha=6, use_rslora=True,
                                           target_modules=r".*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)",
                                           rank_pattern={"layers.1.mlp.down_proj": 2})),
        "llama_ia3": ("llama", IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                         feedforward_modules=["down_proj"])),
        "bert_ia3": ("bert", IA3Config(target_modules=r".*\.(key|value)|.*layer\.\d+\.output\.dense",
                                       feedforward_modules=r".*layer\.\d+\.output\.dense")),
        "bert_prefix": ("bert", PrefixTuningConfig(num_virtual_tokens=3, task_type="FEATURE_EXTRACTION")),
        "llama_prefix": ("llama", PrefixTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM")),
    }
    for i, (name, (family, cfg)) in enumerate(cases.items()):
        torch.manual_seed(0)
        if family == "bert":
            base = BertModel.from_pretrained(os.path.join(HERE, "tiny-bert"), add_pooling_layer=False).eval()
        else:
            base = LlamaForCausalLM.from_pretrained(os.path.join(HERE, "tiny-llama")).eval()
        model = get_peft_model(base, cfg)
        _randomize_peft(model, 10 + i)
        model.eval()
        d = os.path.join(HERE, f"peft_{name}")
        model.save_pretrained(d)
        for extra in ("README.md",):
            if os.path.exists(os.path.join(d, extra)):
                os.remove(os.path.join(d, extra))
        with torch.no_grad():
            if family == "bert":
                ids, types, lengths = bert_ref["ids"].long(), bert_ref["type_ids"].long(), bert_ref["lengths"]
                mask = (torch.arange(ids.shape[1])[None, :] < lengths[:, None]).long()
                out = model(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
                out = out * mask.unsqueeze(-1)
                save_file({"hidden": out.contiguous()}, os.path.join(HERE, f"peft_{name}_reference.safetensors"))
            else:
                out = model(input_ids=llama_ref["ids"].long()).logits
                save_file({"logits": out.contiguous()}, os.path.join(HERE, f"peft_{name}_reference.safetensors"))
        print(f"wrote {d} ({sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d))} bytes)")


def check_cpet_adapter(d):
    """Loads an adapter cpet wrote (with cpet's own outputs beside it, cpet_outputs.safetensors) in PEFT and
    compares: the proof that cpet's adapter files are PEFT's."""
    import torch
    from peft import PeftModel
    from transformers import BertModel, LlamaForCausalLM

    from safetensors import safe_open

    cfg = json.load(open(os.path.join(d, "adapter_config.json")))
    outs = safe_load(os.path.join(d, "cpet_outputs.safetensors"))
    with safe_open(os.path.join(d, "cpet_outputs.safetensors"), "pt") as f:
        meta = f.metadata() or {}
    # A prefix adapter acts only through the task classes (PeftModelForFeatureExtraction / ForCausalLM), which
    # from_pretrained picks from task_type: without one PEFT would run the bare base model and this check would
    # compare the wrong thing.
    if cfg["peft_type"] == "PREFIX_TUNING" and cfg.get("task_type") not in ("FEATURE_EXTRACTION", "CAUSAL_LM"):
        sys.exit(f"{d}: a prefix adapter for this check needs task_type FEATURE_EXTRACTION or CAUSAL_LM, "
                 f"has {cfg.get('task_type')!r}")
    if "hidden" in outs:
        base = BertModel.from_pretrained(os.path.join(HERE, "tiny-bert"), add_pooling_layer=False).eval()
        ref = safe_load(os.path.join(HERE, "tiny_bert_reference.safetensors"))
        model = PeftModel.from_pretrained(base, d).eval()
        ids, types, lengths = ref["ids"].long(), ref["type_ids"].long(), ref["lengths"]
        mask = (torch.arange(ids.shape[1])[None, :] < lengths[:, None]).long()
        with torch.no_grad():
            got = model(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state * mask.unsqueeze(-1)
        want = outs["hidden"]
    else:
        base = LlamaForCausalLM.from_pretrained(os.path.join(HERE, "tiny-llama")).eval()
        ref = safe_load(os.path.join(HERE, "tiny_llama_reference.safetensors"))
        model = PeftModel.from_pretrained(base, d).eval()
        with torch.no_grad():
            got = model(input_ids=ref["ids"].long()).logits
        want = outs["logits"]
    if cfg["peft_type"] == "PREFIX_TUNING":
        assert type(model).__name__ in ("PeftModelForFeatureExtraction", "PeftModelForCausalLM"), type(model)
        assert model.peft_config["default"].num_virtual_tokens == cfg["num_virtual_tokens"]
    want = want.reshape(got.shape)  # cpet writes [B·S, d]
    err = ((got - want).norm() / want.norm()).item()
    print(f"{d}: {cfg['peft_type']} adapter written by cpet, loaded by PEFT ({type(model).__name__}): relative "
          f"difference from cpet's outputs {err:.3e}")
    if err > 1e-4:
        sys.exit(f"{d}: PEFT's output differs from cpet's (relative {err:.3e})")
    if "reference" in meta:  # the outputs of the PEFT-made adapter cpet read before writing this one
        src = safe_load(os.path.join(HERE, meta["reference"]))[next(iter(outs))].reshape(got.shape)
        err = ((got - src).norm() / src.norm()).item()
        print(f"{d}: relative difference from {meta['reference']} (PEFT on the adapter cpet read) {err:.3e}")
        if err > 1e-4:
            sys.exit(f"{d}: PEFT's output on cpet's file differs from PEFT's on the original (relative {err:.3e})")


def safe_load(path):
    from safetensors.torch import load_file
    return load_file(path)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--minilm")
    ap.add_argument("--only", default="minilm,wordpiece,llama,bert,peft")
    ap.add_argument("--check-cpet-adapter", nargs="*", default=[])
    a = ap.parse_args()
    if a.check_cpet_adapter:
        for d in a.check_cpet_adapter:
            check_cpet_adapter(d)
        return
    parts = a.only.split(",")
    if "minilm" in parts or "wordpiece" in parts:
        md = find_minilm(a.minilm)
        if "minilm" in parts:
            make_minilm(md)
        if "wordpiece" in parts:
            make_wordpiece(md)
    if "llama" in parts:
        make_llama()
    if "bert" in parts:
        make_bert()
    if "peft" in parts:
        make_peft()


if __name__ == "__main__":
    main()
