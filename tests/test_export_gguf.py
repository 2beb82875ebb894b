"""Exits exported as GGUF draft models (export/gguf.py): llama.cpp's layout and metadata, the exit's
logits back through transformers' GGUF loader (which un-permutes and de-quantises), refusals, the
CLI flag, and llama.cpp itself loading the file and decoding greedily as exitspec does."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import bytes_to_unicode

from conftest import EOS, save_tiny_model, tiny_loaded, tiny_model
from exitspec.bench.llama_cpp import ENV as LLAMA_SERVER_ENV
from exitspec.cli import main
from exitspec.decoding.api import encode_prompt
from exitspec.export.draft import ExportError, export_draft
from exitspec.export.gguf import export_gguf
from exitspec.heads.bundle import HeadBundle
from exitspec.loading import LoadedModel
from exitspec.runtime.sequences import teacher_pass

IDS = torch.tensor([[5, 17, 33, 2, 60, 41, 7, 9, 3, 3, 12]])
MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n")]
TEMPLATE = "{% for m in messages %}{{ m['content'] }}<eos>{% endfor %}"
F32, F16, Q8_0 = (gguf.GGMLQuantizationType[t] for t in ("F32", "F16", "Q8_0"))


def bpe_tokenizer() -> PreTrainedTokenizerFast:
    """A tiny byte-level BPE tokenizer (GPT-2 style, as llama.cpp's "gpt2" vocab needs): ids 0..90 the
    bytes 32..122 in the byte alphabet (space = "Ġ"), 91..94 the merges' results, 95 <eos>."""
    b2u = bytes_to_unicode()
    vocab = {b2u[b]: i for i, b in enumerate(range(32, 123))}
    for a, b in MERGES:
        vocab[a + b] = len(vocab)
    vocab["<eos>"] = EOS
    tk = Tokenizer(models.BPE(vocab=vocab, merges=MERGES))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>", pad_token="<eos>")
    tok.chat_template = TEMPLATE
    return tok


def loaded(family: str = "llama", model=None) -> LoadedModel:
    return LoadedModel.from_hf(model if model is not None else tiny_model(family), bpe_tokenizer(),
                               name=f"tiny-{family}")


def bundle_of(m, kind: str, layer: int = 3) -> HeadBundle:
    bundle = HeadBundle.create(m.lm, [layer], kind, base_model=m.name)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a tuned head: not the base's weights any more
        for p in bundle.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return bundle


def field(reader: gguf.GGUFReader, key: str):
    return reader.fields[key].contents()


@pytest.mark.parametrize("family,kind,qtype", [("llama", "norm_lm", "Q8_0"), ("llama", "lm_head", "F16"),
                                               ("qwen2", "norm_lm", "Q8_0")])
def test_the_gguf_has_llama_cpps_tensors_and_metadata(tmp_path, family, kind, qtype):
    m = loaded(family)
    r = gguf.GGUFReader(export_gguf(m, bundle_of(m, kind), 3, tmp_path / "d.gguf", qtype))
    arch, mat = family, gguf.GGMLQuantizationType[qtype]
    # Shapes in GGUF order (ne0 = the row length first): [in, out] for a matrix.
    block = {"attn_norm.weight": (F32, [64]), "ffn_norm.weight": (F32, [64]), "attn_q.weight": (mat, [64, 64]),
             "attn_k.weight": (mat, [64, 32]), "attn_v.weight": (mat, [64, 32]),
             "attn_output.weight": (mat, [64, 64]), "ffn_gate.weight": (mat, [64, 128]),
             "ffn_up.weight": (mat, [64, 128]), "ffn_down.weight": (mat, [128, 64])}
    if family == "qwen2":
        block |= {"attn_q.bias": (F32, [64]), "attn_k.bias": (F32, [32]), "attn_v.bias": (F32, [32])}
    want = {f"blk.{i}.{n}": v for i in range(3) for n, v in block.items()}
    want |= {"token_embd.weight": (mat, [64, 96]), "output_norm.weight": (F32, [64])}
    if kind == "lm_head" or family == "qwen2":  # tuned, or the base's head is untied: its own output
        want["output.weight"] = (mat, [64, 96])
    assert {t.name: (t.tensor_type, t.shape.tolist()) for t in r.tensors} == want

    assert field(r, "general.architecture") == arch
    expect = {"block_count": 3, "context_length": 512, "embedding_length": 64, "feed_forward_length": 128,
              "attention.head_count": 4, "attention.head_count_kv": 2, "rope.freq_base": 10000.0,
              "rope.dimension_count": 16, "vocab_size": 96}
    assert {k: field(r, f"{arch}.{k}") for k in expect} == expect
    assert field(r, f"{arch}.attention.layer_norm_rms_epsilon") == pytest.approx(m.config.rms_norm_eps)
    assert field(r, "general.file_type") == gguf.LlamaFileType["MOSTLY_" + qtype]
    # The tokenizer: byte-level BPE, every id, the merges, <eos> a control token, no BOS added.
    tokens = field(r, "tokenizer.ggml.tokens")
    assert field(r, "tokenizer.ggml.model") == "gpt2" and field(r, "tokenizer.ggml.pre") == "gpt-2"
    assert len(tokens) == 96 and tokens[0] == "Ġ" and tokens[93] == "Ġthe" and tokens[EOS] == "<eos>"
    types = field(r, "tokenizer.ggml.token_type")
    assert types[EOS] == gguf.TokenType.CONTROL and set(types[:EOS]) == {gguf.TokenType.NORMAL}
    assert field(r, "tokenizer.ggml.merges") == [" ".join(p) for p in MERGES]
    assert field(r, "tokenizer.ggml.eos_token_id") == EOS and field(r, "tokenizer.ggml.padding_token_id") == EOS
    assert "tokenizer.ggml.bos_token_id" not in r.fields and field(r, "tokenizer.ggml.add_bos_token") is False
    assert field(r, "tokenizer.chat_template") == TEMPLATE


def rounded_like(draft: torch.nn.Module, qtype: str) -> torch.nn.Module:
    """The HF draft with every matrix rounded as the GGUF stores it (F16 / Q8_0 blocks, de-quantised)."""
    with torch.no_grad():
        for p in draft.parameters():
            if p.ndim == 2:
                q = gguf.quants.quantize(p.numpy(), gguf.GGMLQuantizationType[qtype])
                p.copy_(torch.from_numpy(gguf.quants.dequantize(q, gguf.GGMLQuantizationType[qtype]).copy()))
    return draft


@pytest.mark.parametrize("qtype", ["F16", "Q8_0"])
@pytest.mark.parametrize("family,kind", [("llama", "norm_lm"), ("llama", "lm_head"), ("qwen2", "lm_head")])
def test_transformers_reads_the_gguf_back_as_the_exit(tmp_path, family, kind, qtype):
    m = loaded(family)
    bundle = bundle_of(m, kind)
    path = export_gguf(m, bundle, 3, tmp_path / f"draft-{qtype}.gguf", qtype)
    got_model = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name).eval()
    assert got_model.config.num_hidden_layers == 3
    same = rounded_like(AutoModelForCausalLM.from_pretrained(export_draft(m, bundle, 3, tmp_path / "hf")), qtype)
    with torch.no_grad():
        got = got_model(IDS).logits
        ref = bundle.head(3)(teacher_pass(m.lm, IDS, [3]).hidden[3])
        exact = same.eval()(IDS).logits
    scale = float(ref.abs().max())
    # Exact: the same rounded weights give the same logits (names, Q/K row order, metadata all right).
    assert float((got - exact).abs().max()) < 1e-5 * scale
    # Against the exit itself: F16 rounding (2^-11 relative per weight) through 3 layers; Q8_0 (one
    # int8 step of a 32-weight block's max) much coarser, so also: the same argmax almost everywhere.
    err = float((got - ref).abs().max()) / scale
    agree = float((got.argmax(-1) == ref.argmax(-1)).float().mean())
    assert (err < 1e-2 and agree == 1.0) if qtype == "F16" else (err < 0.15 and agree >= 0.9), (err, agree)


def test_llama3_rope_scaling_is_written_as_rope_freqs(tmp_path):
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                       "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                       "original_max_position_embeddings": 64})
    m = loaded("llama", LlamaForCausalLM(cfg))
    r = gguf.GGUFReader(export_gguf(m, bundle_of(m, "norm_lm", 2), 2, tmp_path / "d.gguf", "F16"))
    (freqs,) = [t for t in r.tensors if t.name == "rope_freqs.weight"]
    assert freqs.tensor_type == F32
    # llama.cpp divides each base frequency by its factor; HF's scaled frequencies must come out.
    base = 500000.0 ** -(torch.arange(0, 16, 2, dtype=torch.float64) / 16)
    scaled = m.model.model.rotary_emb.inv_freq.double()
    got = base / torch.from_numpy(np.asarray(freqs.data, dtype=np.float64))
    assert torch.allclose(got, scaled, rtol=1e-5) and not torch.allclose(base, scaled)  # scaling did something


def test_what_gguf_cannot_express_is_refused_and_nothing_is_overwritten(tmp_path):
    gpt2 = tiny_loaded("gpt2")
    with pytest.raises(ExportError, match=r"supports the model types \['llama', 'mistral', 'qwen2'\]"):
        export_gguf(gpt2, HeadBundle.create(gpt2.lm, [3], "norm_lm"), 3, tmp_path / "a.gguf")
    chars = tiny_loaded("llama")  # conftest's character tokenizer: BPE but not byte-level, no merges
    with pytest.raises(ExportError, match="byte-level BPE"):
        export_gguf(chars, HeadBundle.create(chars.lm, [3], "norm_lm"), 3, tmp_path / "b.gguf")
    m = loaded()
    bundle = HeadBundle.create(m.lm, [3], "norm_lm")
    with pytest.raises(ExportError, match="use one of Q8_0, F16"):
        export_gguf(m, bundle, 3, tmp_path / "c.gguf", "Q4_0")
    with pytest.raises(ExportError, match="exportable kinds"):
        export_gguf(m, HeadBundle.create(m.lm, [3], "swiglu"), 3, tmp_path / "d.gguf")
    for name in ("notes.txt", "notes.gguf"):  # an existing file that is not GGUF, whatever its name
        (tmp_path / name).write_text("mine")
        with pytest.raises(ExportError, match="not a .gguf file"):
            export_gguf(m, bundle, 3, tmp_path / name)
        assert (tmp_path / name).read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.gguf", "notes.txt"]  # no half files
    export_gguf(m, bundle, 3, tmp_path / "e.gguf")
    export_gguf(m, bundle, 3, tmp_path / "e.gguf", "F16")  # an earlier export is replaced
    assert field(gguf.GGUFReader(tmp_path / "e.gguf"), "general.file_type") == gguf.LlamaFileType.MOSTLY_F16


def test_cli_writes_the_gguf_next_to_the_hf_folder(tmp_path, capsys):
    folder = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(folder)
    bpe_tokenizer().save_pretrained(folder)
    from exitspec.loading import load

    HeadBundle.create(load(str(folder)).lm, [2], "lm_head").save(tmp_path / "lh")
    args = ["export-draft", "--model", str(folder), "--heads", str(tmp_path / "lh"), "--exit-layer", "2"]
    assert main([*args, "--out", str(tmp_path / "o"), "--gguf", "Q8_0"]) == 0
    out = capsys.readouterr().out
    assert str(tmp_path / "o") in out and str(tmp_path / "o" / "draft-Q8_0.gguf") in out
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "o").config.num_hidden_layers == 2
    assert field(gguf.GGUFReader(tmp_path / "o" / "draft-Q8_0.gguf"), "llama.block_count") == 2
    # A model GGUF cannot hold is refused before the HF folder is written.
    g2 = save_tiny_model(tmp_path / "g2", "gpt2")
    HeadBundle.create(load(str(g2)).lm, [2], "norm_lm").save(tmp_path / "g2h")
    assert main(["export-draft", "--model", str(g2), "--heads", str(tmp_path / "g2h"), "--exit-layer", "2",
                 "--out", str(tmp_path / "o2"), "--gguf", "F16"]) == 2
    assert "supports the model types" in capsys.readouterr().err and not (tmp_path / "o2").exists()


# ---------------------------------------------------------------------------------------------------
# llama.cpp itself: its server loads the GGUF, tokenizes, and decodes greedily from token ids.

def llama_cpp_bin(name: str) -> str | None:
    """A llama.cpp binary: beside $EXITSPEC_LLAMA_SERVER (the bench's llama-server) where set, else on PATH."""
    server = os.environ.get(LLAMA_SERVER_ENV)
    return shutil.which(name, path=str(Path(server).parent)) if server else shutil.which(name)


needs_llama_cpp = pytest.mark.skipif(
    llama_cpp_bin("llama-server") is None,
    reason=f"no llama.cpp `llama-server` binary: set {LLAMA_SERVER_ENV} to one (README, 'llama.cpp as a peer')")


@contextmanager
def llama_server(path: Path, log: Path):
    """llama-server on `path` at a free local port; yields post(endpoint, body) -> the JSON answer."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"

    def post(endpoint: str, body: dict) -> dict:
        req = urllib.request.Request(url + endpoint, json.dumps(body).encode(), {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            return json.loads(r.read())

    with open(log, "w") as out:
        proc = subprocess.Popen([llama_cpp_bin("llama-server"), "-m", str(path), "--host", "127.0.0.1", "--port",
                                 str(port), "-c", "512", "-np", "1", "-t", "2", "--no-webui", "--no-warmup"],
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while True:  # up once /health answers 200 (503 while loading); a load error ends the process
            assert proc.poll() is None, f"llama-server exited: {log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"llama-server did not come up: {log.read_text()[-3000:]}"
            try:
                with urllib.request.urlopen(url + "/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.3)
        yield post
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def exit_greedy(m: LoadedModel, bundle: HeadBundle, layer: int, ids: list[int], n: int) -> list[int]:
    """exitspec's greedy decode of the exit alone (what the draft computes): the argmax of the exit's
    logits appended, n times or until EOS (which llama.cpp does not return)."""
    ids, new = list(ids), []
    with torch.no_grad():
        for _ in range(n):
            h = teacher_pass(m.lm, torch.tensor([ids + new]), [layer], logits=False).hidden[layer]
            new.append(int(bundle.head(layer)(h[:, -1:]).argmax(-1)))
            if new[-1] == m.tokenizer.eos_token_id:
                return new[:-1]
    return new


def llama_cpp_greedy(post, ids: list[int], n: int) -> list[int]:
    answer = post("/completion", {"prompt": ids, "n_predict": n, "temperature": 0, "return_tokens": True,
                                  "cache_prompt": False})
    return answer["tokens"]


@needs_llama_cpp
@pytest.mark.parametrize("qtype", ["F16", "Q8_0"])
def test_llama_cpp_decodes_the_tiny_draft_as_exitspec_does(tmp_path, qtype):
    m = loaded("llama")
    bundle = bundle_of(m, "lm_head")
    path = export_gguf(m, bundle, 3, tmp_path / "d.gguf", qtype)
    text = "the cat in the hat"  # merges at work: "the" -> t|he, " the" -> Ġthe
    seqs = (m.tokenizer.encode(text), IDS[0].tolist())
    with llama_server(path, tmp_path / "server.log") as post:
        assert post("/tokenize", {"content": text})["tokens"] == m.tokenizer.encode(text)
        # Next token after every prefix, llama.cpp's vs the exit's argmax.
        got = [llama_cpp_greedy(post, ids[:i], 1)[0] for ids in seqs for i in range(1, len(ids) + 1)]
        greedy = [(llama_cpp_greedy(post, ids, 16), exit_greedy(m, bundle, 3, ids, 16)) for ids in seqs]
    with torch.no_grad():
        want = [int(t) for ids in seqs for t in bundle.head(3)(teacher_pass(m.lm, torch.tensor([ids]), [3])
                                                              .hidden[3])[0].argmax(-1)]
    agree = sum(g == w for g, w in zip(got, want, strict=True)) / len(want)
    if qtype == "F16":  # fp16 weights (llama.cpp also rounds activations to fp16 for the products): exact
        assert agree == 1.0 and all(a == b for a, b in greedy), greedy
    else:  # Q8_0 weights and llama.cpp's int8 activations: an argmax may flip where the top two are close
        assert agree >= 0.8, (agree, got, want)


@pytest.mark.slow
@needs_llama_cpp
def test_llama_cpp_decodes_a_default_model_exit_as_exitspec_does(default_model, tmp_path):
    m, layer = default_model, 24
    bundle = HeadBundle.create(m.lm, [layer], "norm_lm")  # the plain truncation: 24 of 30 layers
    path = export_gguf(m, bundle, layer, tmp_path / "smollm2-24.gguf", "F16")
    with llama_server(path, tmp_path / "server.log") as post:
        for prompt in ("The capital of France is", "Why do cats purr? Because"):
            assert post("/tokenize", {"content": prompt})["tokens"] == m.tokenizer.encode(prompt)
        for ids in (m.tokenizer.encode("The capital of France is"), encode_prompt(m.tokenizer, "Why do cats purr?")):
            assert llama_cpp_greedy(post, ids, 16) == exit_greedy(m, bundle, layer, ids, 16)
