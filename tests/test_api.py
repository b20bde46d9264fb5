"""The Python API: one verb for every method config, returning the summary; with ``out`` it owns the folders."""

import json

import pytest
import torch
from tiny import tiny_ids, tiny_model, tiny_tokenizer

from qatlm import BlockAPConfig, E2EQPConfig, QatlmError, RTNConfig, load_quantized, quantize


def test_quantize_returns_the_summary_and_writes_out(tmp_path):
    model = tiny_model("llama", num_hidden_layers=2)
    g = torch.Generator().manual_seed(0)
    calib = (torch.randint(3, 320, (8, 24), generator=g), torch.randint(3, 320, (2, 24), generator=g))
    s = quantize(model, BlockAPConfig(bits=2, group_size=32, epochs=1), calib=calib, progress=False, out=tmp_path / "q",
                 tokenizer=tiny_tokenizer())
    assert s.method == "block-ap" and len(s.block_ap.blocks) == 2 and all(b.trained_rel_error < b.rtn_rel_error for b in s.block_ap.blocks)
    assert not (tmp_path / "q.work").exists()  # the work folder is the API's, removed when done
    assert json.loads((tmp_path / "q" / "training_summary.json").read_text())["block_ap"]["blocks"] == json.loads(json.dumps(s.to_dict()["block_ap"]["blocks"]))
    ids = tiny_ids()
    with torch.no_grad():
        torch.testing.assert_close(load_quantized(tmp_path / "q")(ids).logits, model(ids).logits, rtol=0, atol=1e-5)
    with pytest.raises(QatlmError, match="exists"):
        quantize(tiny_model("llama"), RTNConfig(4, 32), out=tmp_path / "q")


def test_an_end_to_end_config_trains_a_packed_model(tmp_path):
    model = tiny_model("llama", num_hidden_layers=2)
    quantize(model, RTNConfig(2, 32))
    before = {n: b.clone() for n, b in model.state_dict().items() if n.endswith(".scales")}
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"the cat sat on the mat number {i}" for i in range(400)))
    s = quantize(model, E2EQPConfig(data=str(text), samples=8, seqlen=32, val_samples=2, epochs=1, batch_size=4, lr=1e-3),
                 tokenizer=tiny_tokenizer(), progress=False, cache_dir=tmp_path / "c")
    assert s.method == "e2e-qp" and s.e2e_qp.steps == 2
    after = {n: b for n, b in model.state_dict().items() if n.endswith(".scales")}
    assert any(not torch.equal(before[n], after[n]) for n in before)  # it trained
    with pytest.raises(QatlmError, match="tokenizer"):
        quantize(model, E2EQPConfig(data=str(text)))
