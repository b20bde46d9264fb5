"""Lazy loading: blocks read from the shards one at a time and dropped once packed; the streamed checkpoint
equals the one made with the whole model in memory, bit for bit."""

import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from tiny import FAMILIES, tiny_model, tiny_tokenizer

from qatlm import RTNConfig, quantize, save_quantized
from qatlm.methods.block_ap import BlockAPConfig, quantize_block_ap
from qatlm.model import lazy
from qatlm.model.arch import capture_layer_inputs, find_parts
from qatlm.model.lazy import load_lazy_model


def _saved(family, tmp_path, **over):
    d = tmp_path / family
    tiny_model(family, **over).save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    return d


@pytest.mark.parametrize("family", list(FAMILIES))
def test_lazy_skeleton_records_the_same_layer_inputs(family, tmp_path):
    d = _saved(family, tmp_path)
    full, lz = tiny_model(family), load_lazy_model(d)
    assert all(p.device.type == "meta" for p in find_parts(lz).layers.parameters())
    ids = torch.randint(3, 300, (1, 12), generator=torch.Generator().manual_seed(0))
    (h0, kw0), (h1, kw1) = capture_layer_inputs(full, ids), capture_layer_inputs(lz, ids)
    assert torch.equal(h0, h1)
    for a, b in zip(kw0, kw1):
        assert a.keys() == b.keys()
        for k in a:
            if isinstance(a[k], torch.Tensor):
                assert torch.equal(a[k], b[k]), k


def test_block_ap_streams_one_block_at_a_time_and_equals_the_in_memory_run(tmp_path, monkeypatch):
    d = _saved("llama", tmp_path, num_hidden_layers=4)
    ids = torch.randint(3, 320, (10, 24), generator=torch.Generator().manual_seed(0))
    calib = (ids[:8], ids[8:])
    cfg = BlockAPConfig(bits=2, group_size=32, epochs=1)
    ref = tiny_model("llama", num_hidden_layers=4)
    quantize_block_ap(ref, cfg, calib=calib, progress=False)
    save_quantized(ref, tmp_path / "ref", cfg.spec)

    model = load_lazy_model(d)
    layers = find_parts(model).layers
    loaded_at_once = []
    real = lazy.materialize_block

    def watch(m, i, dtype, device):
        real(m, i, dtype, device)
        loaded_at_once.append(sum(any(p.device.type != "meta" for p in b.parameters()) for b in layers))

    monkeypatch.setattr("qatlm.model.sequential.materialize_block", watch)
    quantize_block_ap(model, cfg, calib=calib, progress=False, work_dir=tmp_path / "work")
    assert loaded_at_once == [1, 1, 1, 1]  # never more than the block being trained
    assert all(t.device.type == "meta" for t in layers.state_dict().values())
    save_quantized(model, tmp_path / "lazy", cfg.spec, block_files=tmp_path / "work")
    a, b = load_file(tmp_path / "ref" / "model.safetensors"), load_file(tmp_path / "lazy" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_streamed_checkpoint_is_sharded_and_reloads(tmp_path):

    d = _saved("qwen2", tmp_path, num_hidden_layers=3)
    r = subprocess.run([sys.executable, "-c", "import sys\nfrom qatlm.model import checkpoint\ncheckpoint.STREAM_SHARD_BYTES = 60_000\n"
                        "from qatlm.cli import main\nsys.exit(main(sys.argv[1:]))", "quantize", "--model", str(d), "--bits", "4",
                        "--group-size", "32", "--out", str(tmp_path / "q")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "block by block" in r.stderr
    shards = sorted((tmp_path / "q").glob("model-*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "q" / "model.safetensors.index.json").exists()
    ref = tiny_model("qwen2", num_hidden_layers=3)
    quantize(ref, RTNConfig(4, 32))
    from qatlm import load_quantized

    ids = torch.randint(3, 300, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(load_quantized(tmp_path / "q")(ids).logits, ref(ids).logits, rtol=0, atol=1e-5)
