"""Which tensors are weight matrices, their roles and 2-D views (spectral/matrices.py)."""
import pytest
import torch
from safetensors.torch import save_file

from spectral.checkpoint import load_checkpoint
from spectral.matrices import ROLES, MatrixInfo, find_matrices, matrix_view, role_of, uses_conv1d_layout, why_not_matrix


def checkpoint_of(tmp_path, state: dict[str, torch.Tensor], config: dict | None = None):
    """A PyTorch checkpoint file (names keep their order), nanoGPT-style with model_args as its config."""
    path = tmp_path / "model.pt"
    torch.save({"model": state, "model_args": config} if config is not None else state, path)
    return load_checkpoint(path)


# ------------------------------------------------------------------------------------------------------------- roles

ROLE_TABLE = [
    # our demo (models/gpt.py)
    ("tok_emb.weight", "embedding"), ("pos_emb.weight", "embedding"),
    ("blocks.0.attn.c_attn.weight", "attn_qkv"), ("blocks.0.attn.c_proj.weight", "attn_out"),
    ("blocks.3.mlp.c_fc.weight", "mlp_up"), ("blocks.3.mlp.c_proj.weight", "mlp_down"), ("lm_head.weight", "head"),
    # nanoGPT
    ("transformer.wte.weight", "embedding"), ("transformer.wpe.weight", "embedding"),
    ("transformer.h.11.attn.c_attn.weight", "attn_qkv"), ("transformer.h.11.attn.c_proj.weight", "attn_out"),
    ("transformer.h.11.mlp.c_fc.weight", "mlp_up"), ("transformer.h.11.mlp.c_proj.weight", "mlp_down"),
    # Hugging Face GPT-2
    ("h.0.attn.c_attn.weight", "attn_qkv"), ("h.0.attn.c_proj.weight", "attn_out"), ("h.0.mlp.c_fc.weight", "mlp_up"),
    ("h.0.mlp.c_proj.weight", "mlp_down"), ("wte.weight", "embedding"), ("h.0.crossattention.q_attn.weight", "attn_q"),
    # Llama family
    ("model.embed_tokens.weight", "embedding"), ("model.layers.0.self_attn.q_proj.weight", "attn_q"),
    ("model.layers.0.self_attn.k_proj.weight", "attn_k"), ("model.layers.0.self_attn.v_proj.weight", "attn_v"),
    ("model.layers.0.self_attn.o_proj.weight", "attn_out"), ("model.layers.0.mlp.gate_proj.weight", "mlp_gate"),
    ("model.layers.0.mlp.up_proj.weight", "mlp_up"), ("model.layers.0.mlp.down_proj.weight", "mlp_down"),
    # Meta's original Llama layout
    ("tok_embeddings.weight", "embedding"), ("layers.0.attention.wq.weight", "attn_q"),
    ("layers.0.attention.wo.weight", "attn_out"), ("layers.0.feed_forward.w1.weight", "mlp_gate"),
    ("layers.0.feed_forward.w3.weight", "mlp_up"), ("layers.0.feed_forward.w2.weight", "mlp_down"),
    ("output.weight", "head"),
    # BERT family
    ("bert.embeddings.word_embeddings.weight", "embedding"),
    ("bert.embeddings.position_embeddings.weight", "embedding"),
    ("bert.embeddings.token_type_embeddings.weight", "embedding"),
    ("bert.encoder.layer.0.attention.self.query.weight", "attn_q"),
    ("bert.encoder.layer.0.attention.self.key.weight", "attn_k"),
    ("bert.encoder.layer.0.attention.self.value.weight", "attn_v"),
    ("bert.encoder.layer.0.attention.output.dense.weight", "attn_out"),
    ("bert.encoder.layer.0.intermediate.dense.weight", "mlp_up"),
    ("bert.encoder.layer.0.output.dense.weight", "mlp_down"),
    ("bert.pooler.dense.weight", "other"), ("cls.predictions.decoder.weight", "head"),
    ("cls.predictions.transform.dense.weight", "other"),
    # T5, GPT-NeoX, torch.nn.MultiheadAttention
    ("shared.weight", "embedding"), ("encoder.block.0.layer.0.SelfAttention.q.weight", "attn_q"),
    ("encoder.block.0.layer.0.SelfAttention.o.weight", "attn_out"),
    ("encoder.block.0.layer.1.DenseReluDense.wi.weight", "mlp_up"),
    ("encoder.block.0.layer.1.DenseReluDense.wo.weight", "mlp_down"),
    ("gpt_neox.layers.0.attention.query_key_value.weight", "attn_qkv"),
    ("gpt_neox.layers.0.attention.dense.weight", "attn_out"),
    ("gpt_neox.layers.0.mlp.dense_h_to_4h.weight", "mlp_up"),
    ("gpt_neox.layers.0.mlp.dense_4h_to_h.weight", "mlp_down"),
    ("embed_out.weight", "head"),
    ("layers.0.self_attn.in_proj_weight", "attn_qkv"), ("layers.0.self_attn.out_proj.weight", "attn_out"),
    # Phi-3 fuses gate and up; ResNet's head is classifier.1; ConvNeXt's MLP is two pointwise linears
    ("model.layers.0.mlp.gate_up_proj.weight", "mlp_gate_up"), ("classifier.1.weight", "head"),
    ("convnext.encoder.stages.0.layers.0.pwconv1.weight", "mlp_up"),
    ("convnext.encoder.stages.0.layers.0.pwconv2.weight", "mlp_down"),
    # anything else
    ("some.unrelated.projection.weight", "other"),
]


@pytest.mark.parametrize("name,role", ROLE_TABLE)
def test_role_from_name(name, role):
    assert role_of(name) == role


def test_every_role_in_the_table_is_a_declared_role():
    assert {role for _, role in ROLE_TABLE} | {"conv"} == set(ROLES)


def test_four_dimensional_kernel_is_conv_whatever_its_name():
    assert role_of("features.0.weight", ndim=4) == "conv"


def test_a_vision_transformers_patch_projection_is_its_embedding_though_a_kernel():
    assert role_of("vit.embeddings.patch_embeddings.projection.weight", ndim=4) == "embedding"
    assert role_of("patch_embed.proj.weight", ndim=4) == "embedding"


# ------------------------------------------------------------------------------------------------ what is a matrix

@pytest.mark.parametrize("name,shape,reason", [
    ("ln_f.weight", (8,), "1-D"), ("blocks.0.attn.c_attn.bias", (24,), "1-D"), ("scale", (), "scalar"),
    ("row.weight", (1, 64), "vector"), ("col.weight", (64, 1), "vector"),
    ("attn.bias", (1, 1, 16, 16), "bias"), ("mask", (1, 1, 16, 16), "vector"), ("empty.weight", (0, 4), "empty"),
])
def test_not_a_matrix_says_why(name, shape, reason):
    assert reason in why_not_matrix(name, shape)


def test_integer_tensor_is_not_a_matrix():
    assert "not floating point" in why_not_matrix("position_ids", (4, 4), "int64")


@pytest.mark.parametrize("shape", [(3, 5), (5, 3), (2, 2), (4, 3, 3, 3)])
def test_weight_with_two_dimensions_above_one_is_a_matrix(shape):
    assert why_not_matrix("w.weight", shape, "float32") is None


def test_find_matrices_skips_biases_norms_and_masks(tmp_path):
    ckpt = checkpoint_of(tmp_path, {"tok_emb.weight": torch.randn(20, 4), "ln.weight": torch.ones(4),
                                    "ln.bias": torch.zeros(4), "attn.bias": torch.ones(1, 1, 8, 8),
                                    "ids": torch.arange(16).reshape(4, 4)})
    assert [m.name for m in find_matrices(ckpt)] == ["tok_emb.weight"]


def test_find_matrices_keeps_checkpoint_order(tmp_path):
    state = {"tok_emb.weight": torch.randn(20, 4), "blocks.0.attn.c_attn.weight": torch.randn(12, 4),
             "blocks.0.mlp.c_fc.weight": torch.randn(16, 4), "lm_head.weight": torch.randn(20, 4)}
    assert [m.name for m in find_matrices(checkpoint_of(tmp_path, state))] == list(state)


def test_find_matrices_reports_a_tied_group_once_under_its_embedding_name(tmp_path):
    value = torch.randn(20, 4)
    path = tmp_path / "model.safetensors"
    save_file({"tok_emb.weight": value, "lm_head.weight": value.clone(),
               "blocks.0.mlp.c_fc.weight": torch.randn(16, 4)}, str(path))
    matrices = find_matrices(load_checkpoint(path))
    tied = [m for m in matrices if m.tied_with]
    assert len(matrices) == 2
    assert tied == [MatrixInfo(name="tok_emb.weight", shape=(20, 4), role="embedding", tied_with=("lm_head.weight",),
                               source_shape=(20, 4), transposed=False)]


def test_matrix_info_counts_its_parameters():
    assert MatrixInfo("w", (3, 5), "other", (), (3, 5), False).n_params == 15


# --------------------------------------------------------------------------------------------------------- 2-D views

def test_conv_kernel_is_viewed_as_out_by_in_kh_kw(tmp_path):
    kernel = torch.randn(6, 3, 2, 5)
    info, = find_matrices(checkpoint_of(tmp_path, {"conv1.weight": kernel}))
    assert info.role == "conv" and info.shape == (6, 30) and info.source_shape == (6, 3, 2, 5)
    view = matrix_view(kernel, info)
    for out, cin, kh, kw in [(0, 0, 0, 0), (5, 2, 1, 4), (3, 1, 0, 2)]:
        assert view[out, cin * 10 + kh * 5 + kw] == kernel[out, cin, kh, kw]


def test_gpt2_conv1d_weights_are_transposed_to_out_by_in(tmp_path):
    d = 8
    state = {"h.0.attn.c_attn.weight": torch.randn(d, 3 * d), "h.0.attn.c_proj.weight": torch.randn(d, d),
             "h.0.mlp.c_fc.weight": torch.randn(d, 4 * d), "h.0.mlp.c_proj.weight": torch.randn(4 * d, d),
             "wte.weight": torch.randn(50, d)}
    matrices = {m.name: m for m in find_matrices(checkpoint_of(tmp_path, state))}
    assert matrices["h.0.attn.c_attn.weight"].shape == (3 * d, d)
    assert matrices["h.0.mlp.c_fc.weight"].shape == (4 * d, d)
    assert matrices["h.0.mlp.c_proj.weight"].shape == (d, 4 * d)
    assert all(matrices[n].transposed for n in state if n != "wte.weight")
    assert not matrices["wte.weight"].transposed


def test_gpt2_conv1d_layout_is_recognised_from_model_type_without_c_attn(tmp_path):
    ckpt = checkpoint_of(tmp_path, {"h.0.mlp.c_fc.weight": torch.randn(8, 32)}, config={"model_type": "gpt2"})
    assert uses_conv1d_layout(ckpt)
    assert find_matrices(ckpt)[0].shape == (32, 8)


def test_nanogpt_linear_weights_with_gpt2_names_are_not_transposed(tmp_path):
    d = 8
    state = {"transformer.h.0.attn.c_attn.weight": torch.randn(3 * d, d),
             "transformer.h.0.mlp.c_fc.weight": torch.randn(4 * d, d)}
    matrices = find_matrices(checkpoint_of(tmp_path, state, config={"n_embd": d}))
    assert [m.shape for m in matrices] == [(3 * d, d), (4 * d, d)]
    assert not any(m.transposed for m in matrices)


def test_transposed_view_is_the_transpose_of_the_stored_weight(tmp_path):
    weight = torch.randn(8, 24)
    info, = find_matrices(checkpoint_of(tmp_path, {"h.0.attn.c_attn.weight": weight}))
    assert torch.equal(matrix_view(weight, info), weight.T)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_views_are_float32(dtype):
    weight = torch.randn(4, 3).to(dtype)
    view = matrix_view(weight, MatrixInfo("w", (4, 3), "other", (), (4, 3), False))
    assert view.dtype == torch.float32 and torch.equal(view, weight.float())


def test_float64_view_stays_float64():
    weight = torch.randn(4, 3, dtype=torch.float64)
    assert matrix_view(weight, MatrixInfo("w", (4, 3), "other", (), (4, 3), False)).dtype == torch.float64


def test_float32_view_shares_memory_with_the_weight():
    weight = torch.randn(4, 3)
    view = matrix_view(weight, MatrixInfo("w", (4, 3), "other", (), (4, 3), False))
    assert view.data_ptr() == weight.data_ptr()


def test_view_of_a_tensor_with_the_wrong_shape_is_refused():
    with pytest.raises(ValueError, match="expected"):
        matrix_view(torch.randn(3, 4), MatrixInfo("w", (4, 3), "other", (), (4, 3), False))


def test_demo_matrices_have_their_roles_and_the_tied_embedding():
    from spectral import checkpoint
    if not (checkpoint.DEMO_DIR / "model.safetensors").is_file():
        pytest.skip("the demo model has not been built yet")
    matrices = find_matrices(load_checkpoint("demo"))
    embedding = next(m for m in matrices if m.name == "tok_emb.weight")
    assert embedding.tied_with == ("lm_head.weight",) and embedding.role == "embedding"
    assert not any(m.name == "lm_head.weight" for m in matrices)
    assert {m.role for m in matrices} >= {"embedding", "attn_qkv", "attn_out", "mlp_up", "mlp_down"}
