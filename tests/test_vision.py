"""Image classifiers (models/vision.py, models/hf.py): real photographs from scikit-image's bundled data, resized and
normalised by the model's own image processor (checked against a hand computation with PIL), the contract
(`kind == "image_classifier"`, pixel_values -> logits, `eval_inputs`), and what-ifs on a ViT and on a CNN (ConvNeXt)
whose conv kernels are cut in their out x in*kh*kw view."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from models import vision
from models.registry import runnable_model
from spectral.checkpoint import load_checkpoint, open_in_folder
from spectral.evaluation import EvalBatch, Evaluator
from spectral.matrices import find_matrices
from spectral.runtime import ModelRuntime
from spectral.whatif import Choice, WhatIfSession
from spectral.workspace import Workspace

transformers = pytest.importorskip("transformers", reason="transformers is an optional dependency")
SIDE = 32


def vit(folder, **extra):
    torch.manual_seed(0)
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                    image_size=SIDE, patch_size=8, num_labels=10, **extra)
    transformers.ViTForImageClassification(config).eval().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def vit_folder(tmp_path_factory):
    return vit(tmp_path_factory.mktemp("vit"))


@pytest.fixture(scope="module")
def vit_runnable(vit_folder):
    return runnable_model(load_checkpoint(vit_folder))


def by_hand(name: str, mean, std, mirror: bool = False) -> torch.Tensor:
    """A bundled photograph resized (bilinear) to SIDE x SIDE, scaled to [0, 1] and normalised, with PIL and numpy."""
    with Image.open(vision.photograph_folder() / name) as image:
        rgb = image.convert("RGB")
    if mirror:
        rgb = rgb.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    x = np.asarray(rgb.resize((SIDE, SIDE), Image.Resampling.BILINEAR), dtype=np.float64) / 255.0
    x = (x - np.asarray(mean)) / np.asarray(std)
    return torch.from_numpy(x.transpose(2, 0, 1)).float()


# ------------------------------------------------------------------------------------------------- the images

def test_evaluation_images_are_bundled_photographs_preprocessed_by_the_models_processor(vit_runnable):
    r = vit_runnable
    assert vision.photograph_folder() is not None, "scikit-image ships the evaluation photographs"
    assert r.eval_inputs.shape == (2 * len(vision.PHOTOGRAPHS), 3, SIDE, SIDE)
    assert "scikit-image" in r.eval_inputs_source and "ViTImageProcessor" in r.eval_inputs_source
    assert "\n" not in r.eval_inputs_source
    # ViT's default processor: bilinear resize, x/255, (x - 0.5) / 0.5
    torch.testing.assert_close(r.eval_inputs[0], by_hand("astronaut.png", 0.5, 0.5), atol=1e-5, rtol=0)
    torch.testing.assert_close(r.eval_inputs[3], by_hand("chelsea.png", 0.5, 0.5, mirror=True), atol=1e-5, rtol=0)
    assert not torch.equal(r.eval_inputs[2], r.eval_inputs[4])  # different photographs


def test_preprocessor_config_beside_the_weights_is_used(tmp_path, vit_runnable):
    folder = vit(tmp_path)
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "ViTImageProcessor", "do_resize": True, "size": {"height": SIDE, "width": SIDE},
        "resample": 2, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": mean, "image_std": std}))
    r = runnable_model(load_checkpoint(folder))
    assert "preprocessor_config.json" in r.eval_inputs_source
    torch.testing.assert_close(r.eval_inputs[0], by_hand("astronaut.png", mean, std), atol=1e-5, rtol=0)
    # the same resized photographs as with the defaults, normalised differently
    unit = vit_runnable.eval_inputs * 0.5 + 0.5
    torch.testing.assert_close(r.eval_inputs, (unit - torch.tensor(mean)[:, None, None])
                               / torch.tensor(std)[:, None, None], atol=1e-5, rtol=0)


def test_an_unreadable_preprocessor_config_falls_back_to_the_defaults_with_a_note(tmp_path, vit_runnable):
    folder = vit(tmp_path)
    (folder / "preprocessor_config.json").write_text("[1, 2")
    r = runnable_model(load_checkpoint(folder))
    assert torch.equal(r.eval_inputs, vit_runnable.eval_inputs)
    assert any("preprocessor_config.json" in note for note in r.notes)


def test_a_side_file_linked_out_of_the_server_folder_is_not_read(tmp_path, vit_runnable):
    # issue 17: every path the server opens resolves inside its folder, side files included
    root = tmp_path / "served"
    folder = vit(root / "vit")
    outside = tmp_path / "elsewhere.json"
    outside.write_text(json.dumps({"image_processor_type": "ViTImageProcessor", "size": {"height": SIDE,
                                   "width": SIDE}, "image_mean": [0.0] * 3, "image_std": [1.0] * 3}))
    (folder / "preprocessor_config.json").symlink_to(outside)
    r = runnable_model(open_in_folder(root, "vit/"))
    assert torch.equal(r.eval_inputs, vit_runnable.eval_inputs)  # the defaults, not the linked file's settings
    refused = [note for note in r.notes if "resolves outside" in note]
    assert len(refused) == 1 and "preprocessor_config.json" in refused[0]
    assert not any(str(tmp_path) in note for note in r.notes)  # no server path shown


def test_without_the_image_package_the_inputs_are_random_and_say_so(vit_folder, monkeypatch):
    monkeypatch.setattr(vision, "photograph_folder", lambda: None)  # as if scikit-image were not installed
    r = runnable_model(load_checkpoint(vit_folder))
    assert r.eval_inputs.shape == (vision.RANDOM_IMAGES, 3, SIDE, SIDE)
    assert "random pixels" in r.eval_inputs_source
    assert any("pip install scikit-image" in note for note in r.notes)


# --------------------------------------------------------------------------------------------------- contract

def test_image_classifier_contract(vit_runnable, vit_folder):
    r = vit_runnable
    assert r.kind == "image_classifier" and r.architecture == "hf-vit" and r.vocab_size is None
    assert r.block_size == SIDE
    x = r.eval_inputs[:5]
    logits = r.forward(x)
    assert logits.shape == (5, 10)
    reference = transformers.ViTForImageClassification.from_pretrained(vit_folder).eval()
    with torch.no_grad():
        torch.testing.assert_close(logits, reference(pixel_values=x).logits, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------- a CNN

@pytest.fixture(scope="module")
def convnext_folder(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("convnext")
    config = transformers.ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, image_size=SIDE,
                                         num_labels=5)
    transformers.ConvNextForImageClassification(config).eval().save_pretrained(folder)
    return folder


def test_a_cnn_runs_and_a_cut_conv_kernel_reaches_it_in_its_matrix_view(convnext_folder):
    ws = Workspace(load_checkpoint(convnext_folder))
    r = runnable_model(ws.checkpoint)
    assert r.kind == "image_classifier" and r.stages and r.eval_inputs.shape[1:] == (3, SIDE, SIDE)
    name = "convnext.encoder.stages.1.downsampling_layer.1.weight"  # a 2x2 conv, 16 x 8 x 2 x 2
    info = next(m for m in find_matrices(ws.checkpoint) if m.name == name)
    assert info.role == "conv" and info.shape == (16, 8 * 2 * 2) and info.source_shape == (16, 8, 2, 2)
    evaluator = Evaluator(r, EvalBatch(r.eval_inputs[:8], None, "images"))
    session = WhatIfSession(ModelRuntime(ws, runnable=r), evaluator=evaluator)
    assert session.run(Choice("none")).metrics.kl == 0.0
    others = tuple((m.name, "none", None) for m in ws.matrices if m.name != name)
    result = session.run(Choice("rank1", overrides=others))
    assert result.metrics.kl > 0.0
    (cut,) = session.pruner.overrides().values()
    assert cut.shape == (16, 8, 2, 2) and int(torch.linalg.matrix_rank(cut.reshape(16, -1))) == 1
    # the oracle: transformers' own model with the cut kernel copied in
    reference = transformers.ConvNextForImageClassification.from_pretrained(convnext_folder).eval()
    with torch.no_grad():
        reference.get_parameter(name).copy_(cut)
        expected = reference(pixel_values=r.eval_inputs[:8]).logits
    torch.testing.assert_close(r.forward(r.eval_inputs[:8], session.pruner.overrides()), expected,
                               rtol=1e-4, atol=1e-5)
