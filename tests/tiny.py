"""Tiny random models of many families, built from configs (no download)."""

from __future__ import annotations

import importlib
import sys
from contextlib import contextmanager
from pathlib import Path

import torch
import transformers

BENCH = Path(__file__).resolve().parents[1] / "bench"

COMMON = dict(
    vocab_size=320,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)

FAMILIES = {
    "llama": ("LlamaConfig", {}),
    "qwen2": ("Qwen2Config", {}),
    "qwen3": ("Qwen3Config", dict(head_dim=16)),
    "mistral": ("MistralConfig", dict(sliding_window=None)),
    "gemma2": ("Gemma2Config", dict(head_dim=256, query_pre_attn_scalar=256, sliding_window=8, num_hidden_layers=3)),
    "gemma3": ("Gemma3TextConfig", dict(head_dim=256, query_pre_attn_scalar=256, sliding_window=8, num_hidden_layers=3)),
    "phi3": ("Phi3Config", {}),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=64),
    ),
    "qwen3_moe": ("Qwen3MoeConfig", dict(head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)),
    "mixtral": ("MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2)),
}
MOE_FAMILIES = ("qwen2_moe", "qwen3_moe", "mixtral")


def tiny_model(family: str = "llama", seed: int = 0, **overrides):
    cls_name, extra = FAMILIES[family]
    kw = dict(COMMON)
    kw.update(extra)
    kw.update(overrides)
    config = getattr(transformers, cls_name)(**kw)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()


def tiny_ids(batch: int = 2, length: int = 24, vocab: int = 320, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, length), generator=g)


_CORPUS = [
    "the cat sat on the mat and looked at the door",
    "a man is sitting on a roof and he starts pulling up roofing",
    "question: which technology was developed most recently? answer: cellular telephone",
    "how do i ready a guinea pig cage with paper strips and a water bottle",
    "sarah was a much better surgeon than maria so she always got the easier cases",
] * 20


def tiny_tokenizer(vocab_size: int = 320):
    """A byte-level BPE trained here on a few sentences, wrapped as a HF fast tokenizer (no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def tree_hash(folder) -> str:
    """One hash over every file (name and bytes) under ``folder``: equal before and after = untouched."""
    import hashlib
    from pathlib import Path

    h = hashlib.sha256()
    for f in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        h.update(str(f.relative_to(folder)).encode() + f.read_bytes())
    return h.hexdigest()


def tensor_bytes(model) -> int:
    """Bytes of a model's parameters and buffers, each storage counted once (tied weights share one)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def tiny_spm_tokenizer(vocab_size: int = 600, prefix: bool = True):
    """A SentencePiece-style BPE with byte fallback (the HF form of Llama-2 / Mistral / Phi-3 / Gemma tokenizers),
    trained here; ``prefix``: '▁' before the first word (Llama's add_dummy_prefix; Gemma has none). Adds BOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first" if prefix else "never", split=True)
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
                                    + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"] + byte_tokens, show_progress=False)
    tok.train_from_iterator(_CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>")


def need_llama_cpp():
    """llama-cpp-python, or a skip where it is not installed; under QATLM_RUNTIMES=required (`.ci/run`, which builds it)
    its absence fails the test."""
    import os

    import pytest

    if os.environ.get("QATLM_RUNTIMES") == "required":
        import llama_cpp

        return llama_cpp
    return pytest.importorskip("llama_cpp")


def llama_cpp_logits(gguf_file, ids: torch.Tensor) -> torch.Tensor:
    """llama.cpp's own logits for one sequence (llama-cpp-python, loaded as bench/kquant.py loads it)."""
    import importlib.util
    from pathlib import Path

    import numpy as np

    spec = importlib.util.spec_from_file_location("bench_kquant", Path(__file__).parents[1] / "bench" / "kquant.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    lc = bench.llama_cpp()
    n = ids.shape[-1]
    llm = lc.Llama(model_path=str(gguf_file), n_ctx=max(32, n), logits_all=True, verbose=False, n_threads=1)
    try:
        llm.eval(ids.reshape(-1).tolist())
        return torch.from_numpy(np.array(llm.scores[:n], dtype=np.float32))
    finally:
        llm.close()


def check_one_clear_line(argv, message, src, tmp_path, capsys, monkeypatch):
    """The bad-input rule: ``qatlm ARGV`` (``{src}``/``{tmp}`` filled in) ends with exit code 2 and exactly one
    ``qatlm: error:`` line holding ``message``, no traceback, no output, work folder or lock left behind, and the
    sources untouched."""
    from qatlm.cli import main

    monkeypatch.setenv("QATLM_CACHE", str(tmp_path / "cache"))
    before = tree_hash(src)
    args = [a.format(src=src, tmp=tmp_path / "runs") for a in argv]
    (tmp_path / "runs").mkdir()
    code = main(args)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("qatlm: error:")]
    assert code == 2, err
    assert len(lines) == 1 and message in lines[0], err
    assert "Traceback" not in err
    assert list((tmp_path / "runs").iterdir()) == []  # no output, work folder or lock left behind
    leftovers = [p.name for p in src.iterdir() if p.name.startswith(".") or p.name.endswith(".work")]
    assert leftovers == []
    assert tree_hash(src) == before  # the sources are untouched


@contextmanager
def bench_module(name: str):
    """A script of ``bench/`` imported as a module (``bench/`` on the import path only meanwhile)."""
    sys.path.insert(0, str(BENCH))
    try:
        yield importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCH))
