"""E2E-QP: trains step sizes of a packed model, 2 gloo processes = 1 process, resume after kill, instruction masking."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from tiny import tensor_bytes, tiny_model, tiny_tokenizer

from qatlm import E2EQPConfig, RTNConfig, load_quantized, quantize, save_quantized, train_e2e_qp
from qatlm.data.instruct import IGNORE, encode_record, instruction_examples
from qatlm.errors import QatlmError
from qatlm.quant.linear import PackedLinear


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("e2e")
    text = d / "t.txt"
    text.write_text(" ".join(f"the cat sat on the mat number {i} and a man is sitting on a roof" for i in range(600)))
    model = tiny_model("llama")
    quantize(model, RTNConfig(2, 32))
    save_quantized(model, d / "q", RTNConfig(2, 32).spec, tokenizer=tiny_tokenizer())
    return d, text


def args(d, text, out, *extra):
    lr = [] if "dl-qat" in extra else ["--lr", "1e-3"]  # DL-QAT has its own rates (--lr-lora, --lr-magnitude)
    return ["train", "--from", str(d / "q"), "--data", str(text), "--samples", "16", "--seqlen", "32", "--val-samples", "4",
            "--epochs", "2", "--batch-size", "4", *lr, "--out", str(out), *extra]


def run(argv, env, **kw):
    return subprocess.run([sys.executable, "-m", "qatlm.cli", *argv], env=env, capture_output=True, text=True, **kw)


def scales(path):
    sd = load_file(path / "model.safetensors")
    return {k: v for k, v in sd.items() if k.endswith((".scales", ".qzeros", ".qweight"))}


def test_trains_scales_only_and_saved_model_matches(setup, tmp_path):
    d, text = setup
    model = load_quantized(d / "q")
    before = {n: m.qweight.clone() for n, m in model.named_modules() if isinstance(m, PackedLinear)}
    s = train_e2e_qp(model, E2EQPConfig(data=str(text), samples=16, seqlen=32, val_samples=4, epochs=2, batch_size=4, lr=1e-3),
                     tiny_tokenizer(), progress=False, cache_dir=tmp_path)
    assert s.val_losses[-1] < s.val_loss_before
    assert s.trainable_params == sum(m.scales.numel() for m in model.modules() if isinstance(m, PackedLinear))
    after = {n: m for n, m in model.named_modules() if isinstance(m, PackedLinear)}
    assert all(torch.equal(after[n].qweight, before[n]) for n in before)  # integers frozen
    ids = torch.randint(3, 320, (2, 16))
    with torch.no_grad():
        ref = model(ids).logits
    save_quantized(model, tmp_path / "out", RTNConfig(2, 32).spec)
    with torch.no_grad():
        torch.testing.assert_close(load_quantized(tmp_path / "out")(ids).logits, ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("method", ["e2e-qp", "dl-qat"])
def test_two_gloo_processes_equal_one_process(setup, tmp_path, method):
    d, text = setup
    env = {**os.environ, "QATLM_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    one = run(args(d, text, tmp_path / "one", "--method", method), env)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "qatlm.cli",
                          *args(d, text, tmp_path / "two", "--method", method)], env=env, capture_output=True, text=True)
    assert two.returncode == 0, two.stderr
    assert json.loads((tmp_path / "two" / "training_summary.json").read_text())[method.replace("-", "_")]["processes"] == 2
    a, b, src = scales(tmp_path / "one"), scales(tmp_path / "two"), scales(d / "q")
    assert max((a[k].float() - src[k].float()).abs().max().item() for k in a if k.endswith(".scales")) > 1e-4  # it trained
    for k in a:
        torch.testing.assert_close(a[k].float(), b[k].float(), rtol=0, atol=1e-3)


@pytest.mark.parametrize("method", ["e2e-qp", "dl-qat"])
def test_kill_then_resume_equals_uninterrupted(setup, tmp_path, method):
    """Bit for bit after kill -9, for both end-to-end methods (DL-QAT's LoRA init is seeded from --seed, so two
    runs and a resumed one all start from the same A)."""
    d, text = setup
    env = {**os.environ, "QATLM_CACHE": str(tmp_path / "cache")}
    extra = ("--epochs", "4", "--save-every", "2", "--method", method)
    ref = run(args(d, text, tmp_path / "ref", *extra), env)
    assert ref.returncode == 0, ref.stderr
    out = tmp_path / "out"
    ck = tmp_path / "out.work" / "checkpoint" / "state.json"
    p = subprocess.Popen([sys.executable, "-m", "qatlm.cli", *args(d, text, out, *extra)], env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (ck.exists() and json.loads(ck.read_text())["step"] >= 6):
        time.sleep(0.01)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert not (out / "config.json").exists()
    refused = run(args(d, text, out, *extra), env)
    assert refused.returncode == 2 and "--resume" in refused.stderr
    done = run(args(d, text, out, *extra, "--resume"), env)
    assert done.returncode == 0, done.stderr
    a, b = scales(tmp_path / "ref"), scales(out)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the killed attempt's steps past the checkpoint are not logged twice
    steps = lambda p: [json.loads(x)["step"] for x in (p / "training_log.jsonl").read_text().splitlines() if '"loss"' in x]
    assert steps(out) == steps(tmp_path / "ref") == list(range(16))


def test_one_epoch_still_checkpoints_by_time(setup, tmp_path):
    """--save-every defaults to once per epoch, which never fires in a 1-epoch run: the time trigger does."""
    d, text = setup
    env = {**os.environ, "QATLM_CACHE": str(tmp_path / "cache")}
    out = tmp_path / "out"
    ck = tmp_path / "out.work" / "checkpoint" / "state.json"
    p = subprocess.Popen([sys.executable, "-m", "qatlm.cli", *args(d, text, out, "--epochs", "1", "--save-minutes", "0.0001")],
                         env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not ck.exists() and p.poll() is None:
        time.sleep(0.005)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert ck.exists() and 1 <= json.loads(ck.read_text())["step"] < 4


def test_alpaca_and_chat_records_mask_the_prompt():
    tok = tiny_tokenizer()
    ids, labels = encode_record({"instruction": "name the cat", "input": "", "output": "the cat"}, tok, 512)
    n_prompt = sum(1 for x in labels if x == IGNORE)
    assert n_prompt > 0 and labels[n_prompt:] == ids[n_prompt:]
    assert ids[-1] == tok.eos_token_id and tok.decode(ids[n_prompt:-1]) == "the cat"
    tok.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
    msgs = [{"role": "user", "content": "who sat?"}, {"role": "assistant", "content": "the cat"}]
    ids, labels = encode_record({"messages": msgs}, tok, 512)
    resp = [i for i, lab in zip(ids, labels) if lab != IGNORE]
    assert tok.decode(resp) == "the cat"
    with pytest.raises(QatlmError, match="'instruction' and 'output'"):
        encode_record({"question": "x", "answer": "y"}, tok, 512)


def test_instruction_encoding_follows_the_reference_bos_and_separate_truncation():
    """Reference (EfficientQAT's instruction data): BOS where the tokenizer adds one, prompt truncated to 384
    and answer to 128 tokens of a 512 window, each on its own; rebuilt here from plain tokenizer calls."""
    from tokenizers.processors import TemplateProcessing

    from qatlm.data.instruct import ALPACA_PROMPT

    tok = tiny_tokenizer()
    tok.backend_tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.bos_token_id)])
    rec = {"instruction": " ".join(["name the cat"] * 300), "input": "", "output": " ".join(["the cat sat"] * 100)}
    prompt = ALPACA_PROMPT.format(ctx="", instruction=rec["instruction"], input="")
    p_ref = ([tok.bos_token_id] + tok(prompt, add_special_tokens=False)["input_ids"])[:384]
    r_ref = (tok(rec["output"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id])[:128]
    assert len(p_ref) == 384 and len(r_ref) == 128  # both sides really are cut
    ids, labels = encode_record(rec, tok, 512)
    assert ids == p_ref + r_ref
    assert labels == [IGNORE] * 384 + r_ref
    # a prompt that alone fills the window no longer drops the record: its answer keeps a quarter of it
    ids, labels = encode_record(rec, tok, 64)
    assert len(ids) == 64 and sum(x != IGNORE for x in labels) == 16 and ids[0] == tok.bos_token_id
    # no BOS for a tokenizer that adds none (SmolLM2, Qwen)
    ids, _ = encode_record(rec, tiny_tokenizer(), 512)
    assert ids[0] != tok.bos_token_id


def test_bad_inputs_are_one_line_errors(setup, tmp_path):
    d, text = setup
    env = {**os.environ, "QATLM_CACHE": str(tmp_path / "cache")}
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "x", "completion": "y"}) + "\n")
    fp = tmp_path / "fp"
    tiny_model("llama").save_pretrained(fp)
    cases = [
        (["--from", str(fp)], "not a qatlm/GPTQ checkpoint"),
        (["--data", str(bad)], "'instruction' and 'output' fields"),
        (["--seqlen", "100000"], "above the model's limit"),
    ]
    for change, message in cases:
        argv = args(d, text, tmp_path / "o")
        for i in range(0, len(change), 2):
            argv[argv.index(change[i]) + 1] = change[i + 1]
        r = run(argv, env)
        errors = [ln for ln in r.stderr.splitlines() if ln.startswith("qatlm: error")]
        assert r.returncode == 2 and len(errors) == 1 and message in errors[0], r.stderr
        assert "Traceback" not in r.stderr and not (tmp_path / "o").exists()
    shutil.rmtree(tmp_path / "cache", ignore_errors=True)


def test_instruction_tuning_runs_on_response_tokens(setup, tmp_path):
    d, _ = setup
    data = tmp_path / "inst.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"what sat on mat {i}?", "output": "the cat sat"}) + "\n" for i in range(24)))
    assert len(instruction_examples(data, tiny_tokenizer(), 256)) == 24
    model = load_quantized(d / "q")
    s = train_e2e_qp(model, E2EQPConfig(data=str(data), samples=16, seqlen=256, val_samples=4, batch_size=4, epochs=2, lr=1e-3),
                     tiny_tokenizer(), progress=False)
    assert s.mode == "instruct" and s.val_losses[-1] < s.val_loss_before


def test_efficientqat_recipe_runs_block_ap_then_e2e(setup, tmp_path):
    d, text = setup
    fp = tmp_path / "fp"
    tiny_model("llama").save_pretrained(fp)
    tiny_tokenizer().save_pretrained(fp)
    env = {**os.environ, "QATLM_CACHE": str(tmp_path / "cache")}
    r = run(["quantize", "--model", str(fp), "--method", "efficientqat", "--bits", "2", "--group-size", "32", "--calib", str(text),
             "--calib-samples", "8", "--calib-seqlen", "32", "--val-samples", "2", "--epochs", "1", "--out", str(tmp_path / "o")], env)
    assert r.returncode == 0, r.stderr
    s = json.loads((tmp_path / "o" / "training_summary.json").read_text())
    assert s["method"] == "efficientqat" and len(s["block_ap"]["blocks"]) == 2 and s["e2e_qp"]["steps"] == 2
    assert json.loads((tmp_path / "o" / "config.json").read_text())["quantization_config"]["meta"]["qatlm"]["method"] == "efficientqat"
    assert not (tmp_path / "o.work").exists()


@pytest.mark.parametrize("train_zeros", [False, True])
def test_static_training_memory_on_a_packed_model(tmp_path, train_zeros):
    """Tensor bytes while training (weights, buffers, gradients, AdamW state) <= packed model + 16 bytes per
    quantization group (fp32 step size, its gradient, two AdamW moments) + 5 %; trained zero points add
    their own 16 bytes per group, frozen ones stay packed integers (no float copy, no optimizer state)."""
    from qatlm.methods.e2e_qp import scale_trainable

    model = tiny_model("llama", hidden_size=256, intermediate_size=512)
    quantize(model, RTNConfig(2, 64))
    save_quantized(model, tmp_path / "q", RTNConfig(2, 64).spec)
    model = load_quantized(tmp_path / "q")
    packed = tensor_bytes(model)
    groups = sum(m.scales.numel() for m in model.modules() if isinstance(m, PackedLinear))
    t = scale_trainable(model, E2EQPConfig(train_zeros=train_zeros), total_steps=1)
    params = [p for g in t.groups for p in g["params"]]
    assert sum(p.numel() for p in params) == groups * (2 if train_zeros else 1)
    opt = torch.optim.AdamW(t.groups)
    ids = torch.randint(3, 320, (1, 16))
    model(ids, labels=ids).loss.backward()
    opt.step()
    static = tensor_bytes(model) + sum(p.grad.numel() * p.grad.element_size() for p in params) + sum(
        v.numel() * v.element_size() for st in opt.state.values() for v in st.values() if torch.is_tensor(v) and v.dim())
    assert static <= 1.05 * (packed + 16 * groups * (2 if train_zeros else 1)), (static, packed, groups)
    if not train_zeros:
        assert not any(n.endswith(".zero") for n, _ in model.named_parameters())



@pytest.mark.parametrize("chunk", [1 << 22, 72 * 3])  # one chunk; three output rows per chunk
@pytest.mark.parametrize("group", [32, 48])  # input width 72: the last group is ragged either way
def test_scale_only_backward_matches_autograd(monkeypatch, chunk, group):
    """The hand-written backward (chunked over output rows) against autograd through the plain formula
    ``y = x · (fp16(s) ⊙ (q − round(z)))ᵀ`` (round and clamp of z straight through)."""
    import qatlm.quant.linear as lin
    from qatlm.quant.grid import MIN_SCALE, QuantSpec, expand_groups, fp16_ste

    monkeypatch.setattr(lin, "CHUNK_WEIGHTS", chunk)
    spec = QuantSpec(4, group)
    g = torch.Generator().manual_seed(0)
    fq = lin.FakeQuantLinear(torch.nn.Linear(72, 16, bias=False), spec)
    fq.weight.data = torch.randn(16, 72, generator=g)
    fq.scale.data, fq.zero.data = lin.minmax_init(fq.weight.data, spec)
    layer = lin.ScaleTrainLinear(fq.to_packed(), train_zeros=True)
    with torch.no_grad():
        layer.zero.add_(0.3 * torch.randn(layer.zero.shape, generator=g))  # off-integer zero points
    x = torch.randn(2, 5, 72, generator=g, requires_grad=True)
    w_up = torch.randn(2, 5, 16, generator=g)
    (layer(x) * w_up).sum().backward()
    got = (x.grad.clone(), layer.log_scale.grad.clone(), layer.zero.grad.clone())  # trained as log s (scale-free)

    q = layer.codes_rows(0, 16).float()
    s = layer.scale.detach().clone().requires_grad_(True)
    z = layer.zero.detach().clone().requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    z_ste = z + (torch.round(z).clamp(spec.zero_min, spec.qmax) - z).detach()
    w = expand_groups(fp16_ste(s.clamp_min(MIN_SCALE)), spec, 72) * (q - expand_groups(z_ste, spec, 72))
    (torch.nn.functional.linear(x2, w) * w_up).sum().backward()
    for a, b in zip(got, (x2.grad, s.grad * s.detach(), z.grad)):  # d/d(log s) = s · d/ds
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
