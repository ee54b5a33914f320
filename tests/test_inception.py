"""The FID Inception v3 against pytorch-fid's (random weights in its layout, full size: the real network)."""
import pytest
import torch

from metrics import inception
from fid_reference import inception_file, inception_state, pytorch_fid_inception  # noqa: F401 (fixtures)
from model.weights import save_file


@pytest.fixture(scope="module")
def ours(inception_file):
    return inception.load_inception(inception_file)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@torch.no_grad()
def test_features_match_pytorch_fid_at_every_dims(inception_state, ours, monkeypatch):
    x = torch.rand(2, 3, 64, 80)  # not 299: the bilinear resize is part of what is compared
    got = ours.features(inception.preprocess(x), inception.DIMS)
    for dims in inception.DIMS:
        ref = pytorch_fid_inception(inception_state, dims, monkeypatch)(x)[0].mean((2, 3))
        assert got[dims].shape == (2, dims)
        assert ref.abs().max() > 1  # activations neither vanished nor saturated through the random network
        assert rel_err(got[dims], ref) < 1e-5, dims


@torch.no_grad()
def test_logits_match_pytorch_fids_full_network(inception_state, ours, monkeypatch):
    import pytorch_fid.inception as pfi

    monkeypatch.setattr(pfi, "load_state_dict_from_url", lambda *a, **k: dict(inception_state))
    reference = pfi.fid_inception_v3().eval()
    x = torch.rand(2, 3, 299, 299) * 2 - 1
    ref = reference(x)
    got = ours.logits(ours.features(x)[2048])
    assert got.shape == (2, 1008)
    assert rel_err(got, ref) < 1e-5


@torch.no_grad()
def test_safetensors_copy_loads_the_same_network(inception_state, ours, tmp_path):
    path = tmp_path / "pt_inception.safetensors"
    save_file(inception_state, path)
    copy = inception.load_inception(path)
    x = inception.preprocess(torch.rand(1, 3, 40, 40))
    assert torch.equal(copy.features(x, (192,))[192], ours.features(x, (192,))[192])


def test_preprocess_scales_to_minus_one_one_and_resizes_bilinearly():
    x = torch.rand(1, 3, 10, 20)
    y = inception.preprocess(x)
    assert y.shape == (1, 3, 299, 299)
    assert -1 <= y.min() and y.max() <= 1
    flat = torch.full((1, 3, 7, 9), 0.25)
    assert torch.allclose(inception.preprocess(flat), torch.full((1, 3, 299, 299), -0.5))


def test_features_refuses_unknown_dims(ours):
    with pytest.raises(ValueError, match=r"\[100\].*64, 192, 768, 2048"):
        ours.features(torch.zeros(1, 3, 299, 299), (64, 100))


def test_wrong_network_is_refused_with_a_listing(tmp_path):
    import torchvision

    path = tmp_path / "torchvision_inception.pth"
    torch.save(torchvision.models.inception_v3(weights=None, init_weights=False).state_dict(), path)
    with pytest.raises(ValueError, match=r"(?s)torchvision_inception.pth.*unexpected keys.*AuxLogits.*fc.weight: file \(1000, 2048\)"):
        inception.load_inception(path)


def test_bad_files_get_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pth: no such Inception weights file"):
        inception.load_inception(tmp_path / "missing.pth")
    not_tensors = tmp_path / "not_tensors.pth"
    torch.save({"Conv2d_1a_3x3.conv.weight": [1, 2]}, not_tensors)
    with pytest.raises(ValueError, match="not_tensors.pth: expected a dict of tensors"):
        inception.load_inception(not_tensors)
    code = tmp_path / "code.pth"
    torch.save({"w": torch.nn.ReLU()}, code)  # a pickled module: refused by weights_only unpickling
    with pytest.raises(ValueError, match="code.pth: not a weights-only torch file"):
        inception.load_inception(code)
