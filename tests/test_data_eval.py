"""Text sources, calibration samples and perplexity, offline on tiny fixtures."""

import json
import math

import pytest
import torch
from tiny import tiny_model, tiny_tokenizer

from qatlm.data.text import calibration_samples, read_text, token_ids
from qatlm.errors import QatlmError
from qatlm.eval.perplexity import perplexity


class CharTokenizer:
    """A deterministic stand-in tokenizer: one token per byte."""

    backend_tokenizer = None

    def get_vocab(self):
        return {chr(i): i for i in range(256)}

    def __call__(self, text, **_):
        return {"input_ids": list(text.encode("utf-8"))}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QATLM_CACHE", str(tmp_path / "cache"))
    return tmp_path


def test_sources_txt_jsonl_parquet_dataset_dir(cache):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (cache / "a.txt").write_text("hello world")
    (cache / "a.jsonl").write_text(json.dumps({"text": "one"}) + "\n" + json.dumps({"text": "two"}) + "\n")
    pq.write_table(pa.table({"text": ["x", "y"]}), cache / "a.parquet")
    ds = cache / "ds"
    ds.mkdir()
    with pa.ipc.new_stream(str(ds / "data-00000-of-00001.arrow"), pa.schema([("text", pa.string())])) as w:
        w.write_table(pa.table({"text": ["p", "q"]}))
    assert read_text(cache / "a.txt") == "hello world"
    assert read_text(cache / "a.jsonl") == "one\n\ntwo"
    assert read_text(cache / "a.parquet") == "x\n\ny"
    assert read_text(ds) == "p\n\nq"


def test_bad_sources_are_clear_errors(cache):
    (cache / "empty.txt").write_text("  \n")
    (cache / "bad.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(QatlmError, match="empty"):
        read_text(cache / "empty.txt")
    with pytest.raises(QatlmError, match="'text' string field"):
        read_text(cache / "bad.jsonl")
    with pytest.raises(QatlmError, match="does not exist"):
        read_text(cache / "nope.txt")


def test_calibration_reproducible_disjoint_and_cached(cache):
    src = cache / "t.txt"
    src.write_text("".join(chr(97 + (i * 7) % 26) for i in range(5000)))
    tok = CharTokenizer()
    tr, va = calibration_samples(tok, src, n=8, seqlen=50, seed=3, n_val=4)
    tr2, va2 = calibration_samples(tok, src, n=8, seqlen=50, seed=3, n_val=4)
    assert torch.equal(tr, tr2) and torch.equal(va, va2)
    assert tr.shape == (8, 50) and va.shape == (4, 50)
    # windows are taken from the stream at multiples of seqlen: recover their offsets, check disjointness
    ids = token_ids(tok, src)
    def offsets(x):
        return {next(o for o in range(0, 5000, 50) if torch.equal(ids[o:o + 50], row)) for row in x}
    assert not offsets(tr) & offsets(va)
    other, _ = calibration_samples(tok, src, n=8, seqlen=50, seed=4)
    assert not torch.equal(other, tr)
    assert len(list((cache / "cache" / "tokens").glob("*.npy"))) == 1
    with pytest.raises(QatlmError, match="only 100 windows"):
        calibration_samples(tok, src, n=100, seqlen=50, n_val=1)


def test_perplexity_matches_direct_computation():
    model = tiny_model("llama")
    ids = torch.randint(3, 320, (1000,), generator=torch.Generator().manual_seed(0))
    L = 64
    got = perplexity(model, ids, seqlen=L, batch_size=3)
    # direct: every window scored token by token with log_softmax
    total, n = 0.0, 0
    with torch.no_grad():
        for w in range(1000 // L):
            x = ids[w * L:(w + 1) * L]
            logp = torch.log_softmax(model(x[None]).logits[0].double(), -1)
            total -= sum(logp[t, x[t + 1]].item() for t in range(L - 1))
            n += L - 1
    assert math.isclose(got, math.exp(total / n), rel_tol=1e-5)
    assert math.isclose(perplexity(model, ids, seqlen=L, max_windows=2), perplexity(model, ids[: 2 * L], seqlen=L), rel_tol=1e-6)


def _bos_tokenizer():
    """The tiny tokenizer made to put <s> in front of every text, as Llama-2/3 or Gemma tokenizers do."""
    from tokenizers.processors import TemplateProcessing

    tok = tiny_tokenizer()
    tok.backend_tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.bos_token_id)])
    return tok


def test_bos_is_read_from_the_tokenizers_own_behaviour():
    from qatlm.data.text import bos_token

    assert bos_token(tiny_tokenizer()) is None  # has a BOS token but does not add it
    tok = _bos_tokenizer()
    assert tok("a cat")["input_ids"][0] == tok.bos_token_id
    assert bos_token(tok) == tok.bos_token_id


def test_perplexity_with_bos_scores_every_text_token_after_a_bos():
    model = tiny_model("llama")
    ids = torch.randint(3, 320, (1000,), generator=torch.Generator().manual_seed(1))
    L, bos = 64, 1
    got = perplexity(model, ids, seqlen=L, bos=bos)
    total, n = 0.0, 0
    with torch.no_grad():
        for w in range(1000 // (L - 1)):  # each window: BOS then the next L-1 text tokens, all of them predicted
            x = torch.cat([torch.tensor([bos]), ids[w * (L - 1):(w + 1) * (L - 1)]])
            logp = torch.log_softmax(model(x[None]).logits[0].double(), -1)
            total -= sum(logp[t, x[t + 1]].item() for t in range(L - 1))
            n += L - 1
    assert math.isclose(got, math.exp(total / n), rel_tol=1e-5)
    assert not math.isclose(got, perplexity(model, ids, seqlen=L), rel_tol=1e-3)


def test_calibration_windows_start_with_bos_where_the_tokenizer_adds_it(tmp_path):
    src = tmp_path / "t.txt"
    src.write_text(" ".join(f"the cat sat on the mat {i}" for i in range(400)))
    tok = _bos_tokenizer()
    tr, va = calibration_samples(tok, src, n=6, seqlen=40, n_val=2, cache_dir=tmp_path / "c")
    stream = token_ids(tok, src, cache_dir=tmp_path / "c")
    assert stream[0] != tok.bos_token_id  # the stream itself is tokenized without special tokens
    for row in torch.cat([tr, va]):
        assert row[0] == tok.bos_token_id
        body = row[1:]
        starts = [o for o in range(0, stream.numel() - 39, 39) if torch.equal(stream[o:o + 39], body)]
        assert len(starts) == 1  # the rest is one aligned, contiguous piece of the text
    plain_tr, _ = calibration_samples(tiny_tokenizer(), src, n=6, seqlen=40, n_val=2, cache_dir=tmp_path / "c")
    assert (plain_tr[:, 0] != tiny_tokenizer().bos_token_id).all()


def _big_sources(folder, docs):
    """The same documents as .txt (blank-line separated), .jsonl, .parquet (several row groups) and a dataset folder."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (folder / "big.txt").write_text("\n\n".join(docs))
    (folder / "big.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    pq.write_table(pa.table({"text": docs}), folder / "big.parquet", row_group_size=7)
    ds = folder / "bigds"
    ds.mkdir()
    with pa.ipc.new_stream(str(ds / "data-00000-of-00001.arrow"), pa.schema([("text", pa.string())])) as w:
        for i in range(0, len(docs), 9):
            w.write_table(pa.table({"text": docs[i : i + 9]}))
    return [folder / "big.txt", folder / "big.jsonl", folder / "big.parquet", ds]


def test_large_sources_stream_in_pieces_with_the_same_tokens(cache, monkeypatch):
    """Above WHOLE_TEXT_LIMIT a source is read and tokenized piece by piece: no tokenizer call sees more than a
    piece, the ids come back memory-mapped, and (with a tokenizer that has no merges across pieces: one token a
    byte) they are exactly the UTF-8 bytes of the whole text, for every file kind; calibration windows equal the
    whole-text ones."""
    import numpy as np

    import qatlm.data.text as text

    rng = np.random.default_rng(0)
    docs = [" ".join("wörd%d" % rng.integers(1000) for _ in range(rng.integers(5, 60))) + ("\nline two" if i % 3 else "")
            for i in range(120)]
    expected = "\n\n".join(docs).encode("utf-8")
    sources = _big_sources(cache, docs)

    class Recording(CharTokenizer):
        longest = 0

        def __call__(self, t, **kw):
            Recording.longest = max(Recording.longest, len(t.encode("utf-8")))
            return super().__call__(t, **kw)

    whole = {str(s): calibration_samples(CharTokenizer(), s, n=20, seqlen=64, seed=1, n_val=5) for s in sources}
    monkeypatch.setattr(text, "WHOLE_TEXT_LIMIT", 0)
    monkeypatch.setattr(text, "PIECE_BYTES", 500)
    for s in sources:
        pieces = list(text.text_pieces(s))
        assert len(pieces) > 5 and "".join(pieces).encode("utf-8") == expected
        Recording.longest = 0
        ids = text.token_stream(Recording(), s)
        assert isinstance(ids, np.memmap) and ids.dtype == np.int32
        assert ids.tobytes() == np.frombuffer(expected, dtype=np.uint8).astype(np.int32).tobytes()
        assert 0 < Recording.longest < 2 * 500 + 600  # a piece (cut at a line end), never the whole text
        tr, va = calibration_samples(CharTokenizer(), s, n=20, seqlen=64, seed=1, n_val=5)
        assert torch.equal(tr, whole[str(s)][0]) and torch.equal(va, whole[str(s)][1])


def test_streamed_source_errors_are_named(cache, monkeypatch):
    import qatlm.data.text as text

    monkeypatch.setattr(text, "WHOLE_TEXT_LIMIT", 0)
    monkeypatch.setattr(text, "PIECE_BYTES", 64)
    bad = cache / "bad.txt"
    bad.write_bytes(("a line\n" * 40).encode() + b"\xff\xfe tail\n")
    with pytest.raises(QatlmError, match=r"not UTF-8 text \(invalid byte at offset 280\)"):
        text.token_stream(CharTokenizer(), bad)
    rec = cache / "rec.jsonl"
    rec.write_text(json.dumps({"text": "fine"}) + "\n" + "{broken\n")
    with pytest.raises(QatlmError, match=r"rec.jsonl:2: not a JSON record"):
        text.token_stream(CharTokenizer(), rec)
    assert not list((cache / "cache" / "tokens").glob("*partial*"))  # nothing half-written left in the cache
