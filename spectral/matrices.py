"""Which tensors of a checkpoint are weight matrices, what role each plays, and their 2-D views.

Roles come from parameter names (our demo, nanoGPT, Hugging Face GPT-2, Llama-family, BERT-family, T5) and shapes:
tensors of three or more dimensions are convolution kernels, analysed as out x in*kh*kw. Hugging Face GPT-2 stores its
Conv1D weights as in x out; those are transposed to out x in, the layout of every other matrix here (nanoGPT's
`from_pretrained` lists the same four: c_attn, c_proj, c_fc and the cross-attention q_attn).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from spectral.checkpoint import Checkpoint

ROLES = ("embedding", "attn_qkv", "attn_q", "attn_k", "attn_v", "attn_out",
         "mlp_up", "mlp_gate", "mlp_gate_up", "mlp_down", "head", "conv", "other")  # input to output


@dataclass(frozen=True)
class MatrixInfo:
    name: str  # canonical name (the first of its tied group)
    shape: tuple[int, int]  # (rows, cols) as analysed: out x in for linear layers, out x in*kh*kw for conv
    role: str  # one of ROLES
    tied_with: tuple[str, ...] = ()  # the other names of the same matrix
    source_shape: tuple[int, ...] = ()  # the shape as stored in the checkpoint
    transposed: bool = False  # stored in x out (Hugging Face GPT-2 Conv1D), analysed as its transpose

    @property
    def n_params(self) -> int:
        return self.shape[0] * self.shape[1]


# ------------------------------------------------------------------------------------------------------------ roles

_ATTENTION_PARENT = re.compile(r"(^|\.)(attn|attention|self_attn|self_attention|selfattention|encdecattention|"
                               r"cross_attn|crossattention|encoder_attn|mixer)(\.|$)", re.IGNORECASE)
_MLP_PARENT = re.compile(r"(^|\.)(mlp|ffn|feed_forward|feedforward|densereludense|intermediate|ff)(\.|$)",
                         re.IGNORECASE)

# (role, regex on the module path, i.e. the name without its trailing ".weight"); the first match wins.
_MLP_ROLES: list[tuple[str, re.Pattern]] = [(role, re.compile(pattern, re.IGNORECASE)) for role, pattern in [
    ("mlp_gate_up", r"(^|\.)(gate_up_proj)$"),  # Phi-3: gate and up projections fused
    ("mlp_gate", r"(^|\.)(gate_proj|w1|wi_0|gate|ff_gate)$"),
    ("mlp_up", r"(^|\.)(c_fc|up_proj|fc1|w3|wi|wi_1|dense_h_to_4h|lin1|fc_in|up|pwconv1)$"),
    ("mlp_down", r"(^|\.)(c_proj|down_proj|fc2|w2|wo|dense_4h_to_h|lin2|fc_out|down|pwconv2)$"),
]]
_ATTENTION_ROLES: list[tuple[str, re.Pattern]] = [(role, re.compile(pattern, re.IGNORECASE)) for role, pattern in [
    ("attn_qkv", r"(^|\.)(c_attn|qkv|qkv_proj|query_key_value|wqkv|in_proj|w_pack)$"),
    ("attn_q", r"(^|\.)(q_proj|query|q|wq|q_lin|q_attn|to_q)$"),
    ("attn_k", r"(^|\.)(k_proj|key|k|wk|k_lin|to_k)$"),
    ("attn_v", r"(^|\.)(v_proj|value|v|wv|v_lin|to_v)$"),
    ("attn_out", r"(^|\.)(o_proj|out_proj|o|wo|out_lin|c_proj|dense|to_out(\.0)?)$|(^|\.)output\.dense$"),
]]
# Layers outside any attn/mlp parent, with names that say which they are.
_STANDALONE_ROLES: list[tuple[str, re.Pattern]] = [(role, re.compile(pattern, re.IGNORECASE)) for role, pattern in [
    ("attn_qkv", r"(^|\.)(query_key_value|qkv_proj|wqkv)$"),
    ("attn_q", r"(^|\.)(q_proj)$"),
    ("attn_k", r"(^|\.)(k_proj)$"),
    ("attn_v", r"(^|\.)(v_proj)$"),
    ("attn_out", r"(^|\.)(o_proj|out_proj)$"),
    ("mlp_gate_up", r"(^|\.)(gate_up_proj)$"),
    ("mlp_gate", r"(^|\.)(gate_proj)$"),
    ("mlp_up", r"(^|\.)(up_proj|fc1|dense_h_to_4h|c_fc|pwconv1)$"),
    ("mlp_down", r"(^|\.)(down_proj|fc2|dense_4h_to_h|pwconv2)$"),
    ("mlp_up", r"(^|\.)layer\.\d+\.intermediate\.dense$"),  # BERT: layer.N.intermediate.dense
    ("mlp_down", r"(^|\.)layer\.\d+\.output\.dense$"),  # BERT: layer.N.output.dense (not attention.output.dense)
]]
_HEAD = re.compile(r"(^|\.)(lm_head|embed_out|classifier|score)(\.decoder|\.\d+)?$|(^|\.)predictions\.decoder$|"
                   r"^output$", re.IGNORECASE)  # classifier.1: ResNet's Sequential(Flatten, Linear)
_PATCH_EMBEDDING = re.compile(r"(^|\.)(patch_embeddings?(\.projection)?|patch_embed(\.proj)?)$", re.IGNORECASE)
_EMBEDDING = re.compile(r"(^|\.)(tok_emb|pos_emb|wte|wpe|embed_tokens|embed_positions|embed_in|word_embeddings|"
                        r"position_embeddings|token_type_embeddings|tok_embeddings|token_embedding|"
                        r"position_embedding|shared|pos_embed|embedding|embeddings)$", re.IGNORECASE)
_POOLER = re.compile(r"(^|\.)pooler(\.|$)", re.IGNORECASE)


def module_path(name: str) -> str:
    """The parameter name without its last component when that is "weight" (also `in_proj_weight` -> `in_proj`)."""
    if name.endswith(".weight"):
        return name[: -len(".weight")]
    if name.endswith("_weight"):  # nn.MultiheadAttention: in_proj_weight, q_proj_weight, ...
        return name[: -len("_weight")]
    return name


def role_of(name: str, ndim: int = 2) -> str:
    """The role of the weight `name` from the naming conventions of GPT-2/nanoGPT, Llama, BERT, T5 and our demo."""
    path = module_path(name)
    if _PATCH_EMBEDDING.search(path):  # ViT's patch projection is a conv kernel that embeds image patches
        return "embedding"
    if ndim >= 3:
        return "conv"
    if _HEAD.search(path):
        return "head"
    if _EMBEDDING.search(path):
        return "embedding"
    if _POOLER.search(path):
        return "other"
    # the parent decides ambiguous leaves: c_proj, wo and dense are attention outputs under attn, down projections
    # under mlp; BERT's layer.N.attention.output.dense is under attention, layer.N.output.dense is not
    parent = path.rsplit(".", 1)[0] if "." in path else ""
    if _ATTENTION_PARENT.search(parent):
        for role, pattern in _ATTENTION_ROLES:
            if pattern.search(path):
                return role
    if _MLP_PARENT.search(parent):
        for role, pattern in _MLP_ROLES:
            if pattern.search(path):
                return role
    for role, pattern in _STANDALONE_ROLES:
        if pattern.search(path):
            return role
    return "other"


# -------------------------------------------------------------------------------------------------- which matrices

_CONV1D_LEAVES = re.compile(r"(^|\.)(attn\.c_attn|attn\.q_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight$")
_C_ATTN = re.compile(r"(^|\.)attn\.c_attn\.weight$")


def uses_conv1d_layout(checkpoint: Checkpoint) -> bool:
    """Hugging Face GPT-2 layout (Conv1D weights stored in x out) rather than nanoGPT's nn.Linear (out x in).

    Decided by the shapes of c_attn where present (in x 3*in for Conv1D, 3*in x in for Linear), else by the
    config's model_type."""
    for name, shape in checkpoint.shapes.items():
        if _C_ATTN.search(name) and len(shape) == 2 and shape[0] != shape[1]:
            return shape[1] == 3 * shape[0]
    config = checkpoint.config or {}
    return str(config.get("model_type", "")).lower() == "gpt2"


def analysed_shape(shape: tuple[int, ...]) -> tuple[int, int] | None:
    """(rows, cols) of the 2-D view of a stored shape, before any transpose; None for 0-D and 1-D tensors."""
    if len(shape) < 2:
        return None
    cols = 1
    for d in shape[1:]:
        cols *= int(d)
    return int(shape[0]), cols


def why_not_matrix(name: str, shape: tuple[int, ...], dtype: str | None = None) -> str | None:
    """None when `name` is a weight matrix worth a spectrum, otherwise the reason in a few words."""
    if dtype is not None and not _is_float(dtype):
        return f"{dtype} values, not floating point"
    if len(shape) == 0:
        return "a scalar"
    if len(shape) == 1:
        return "a 1-D tensor (bias, norm or scale)"
    if re.search(r"(^|[._])bias$", name):
        return "a bias or mask buffer, not a weight"
    rows, cols = analysed_shape(tuple(shape))
    if rows == 0 or cols == 0:
        return f"empty ({rows} x {cols})"
    if rows == 1 or cols == 1:
        return f"a vector in matrix form ({rows} x {cols}): a single singular value"
    return None


def find_matrices(checkpoint: Checkpoint) -> list[MatrixInfo]:
    """One MatrixInfo per weight matrix (one per tied group, under its canonical name), in checkpoint order."""
    conv1d = uses_conv1d_layout(checkpoint)
    alias_of = {n: group for group in checkpoint.tied_groups for n in group}
    found = []
    for name in checkpoint.names():
        group = alias_of.get(name, (name,))
        if group[0] != name:
            continue  # a tied alias: reported with its canonical name
        source_shape = tuple(checkpoint.shapes[name])
        if why_not_matrix(name, source_shape, checkpoint.dtypes.get(name)) is not None:
            continue
        rows, cols = analysed_shape(source_shape)
        transposed = conv1d and len(source_shape) == 2 and bool(_CONV1D_LEAVES.search(name))
        if transposed:
            rows, cols = cols, rows
        found.append(MatrixInfo(name=name, shape=(rows, cols), role=role_of(name, len(source_shape)),
                                tied_with=tuple(group[1:]), source_shape=source_shape, transposed=transposed))
    return found


def to_analysed(stored: torch.Tensor, info: MatrixInfo) -> torch.Tensor:
    """The analysed 2-D view of a tensor in its stored layout: conv kernels flattened to out × in·kh·kw, Conv1D
    weights transposed. A view (no copy, dtype kept); the inverse of `to_stored`. The one place layouts convert."""
    if tuple(stored.shape) != tuple(info.source_shape or stored.shape):
        raise ValueError(f"{info.name}: tensor has shape {tuple(stored.shape)}, expected {info.source_shape}")
    matrix = stored.reshape(stored.shape[0], -1) if stored.dim() != 2 else stored
    return matrix.T if info.transposed else matrix


def to_stored(matrix: torch.Tensor, info: MatrixInfo) -> torch.Tensor:
    """An analysed-layout matrix back in the checkpoint's stored layout and shape (a view when possible)."""
    t = matrix.T if info.transposed else matrix
    shape = tuple(info.source_shape or t.shape)
    return t if tuple(t.shape) == shape else t.reshape(shape)


def matrix_view(tensor: torch.Tensor, info: MatrixInfo) -> torch.Tensor:
    """The 2-D floating-point matrix that `info` describes (`to_analysed`), for the analysis.

    fp16/bf16/fp8 become float32 (a copy); float32 and float64 stay as they are (a view, no copy)."""
    matrix = to_analysed(tensor, info)
    if matrix.dtype not in (torch.float32, torch.float64):
        matrix = matrix.to(torch.float32)
    return matrix


def _is_float(dtype: str) -> bool:
    return dtype.startswith(("float", "bfloat"))
