"""IGRegNet: output shapes, TorchScript export, configuration checks, per-sample independence."""

import pytest
import torch
from conftest import TINY_NET as TINY

from scripts.networks import IGRegNet


@pytest.mark.parametrize("tasks", [("idh", "grade"), ("1p19q", "idh", "grade", "mgmt")])
@pytest.mark.parametrize("batch, size", [(1, (16, 16, 16)), (3, (32, 16, 48)), (2, (48, 32, 16))])
def test_output_shapes(tasks, batch, size):
    torch.manual_seed(0)
    net = IGRegNet(tasks=tasks, **TINY).eval()
    out = net(torch.randn(batch, 2, *size))
    assert list(out) == ["seg", *tasks]
    assert out["seg"].shape == (batch, 2, *size)
    for t in tasks:
        assert out[t].shape == (batch, 2)
    assert all(torch.isfinite(v).all() for v in out.values())


def test_class_counts_per_task_and_input_channels():
    net = IGRegNet(in_channels=3, tasks=("a", "b"), num_classes=(2, 4), **TINY)
    out = net(torch.randn(2, 3, 16, 16, 16))
    assert out["a"].shape == (2, 2) and out["b"].shape == (2, 4)
    assert net.tasks == ["a", "b"] and net.feature_dim == 8


@pytest.mark.parametrize("pooling", ["avg", "max"])
def test_torchscript_matches_eager(pooling):
    torch.manual_seed(0)
    net = IGRegNet(tasks=("1p19q", "idh"), pooling=pooling, **TINY).eval()
    scripted = torch.jit.script(net)
    x = torch.randn(2, 2, 32, 16, 16)
    eager, script = net(x), scripted(x)
    assert set(eager) == set(script)
    for k in eager:
        torch.testing.assert_close(script[k], eager[k])


def test_rejects_bad_configuration():
    with pytest.raises(ValueError, match="cardinality"):
        IGRegNet(num_channels=4, widths=(8, 16, 16, 16), depths=(1, 1, 1, 1), cardinality=3)
    with pytest.raises(ValueError, match="even"):
        IGRegNet(**{**TINY, "num_channels": 5})
    with pytest.raises(ValueError, match="unique"):
        IGRegNet(tasks=("idh", "idh"), **TINY)
    with pytest.raises(ValueError, match="num_classes"):
        IGRegNet(tasks=("idh", "grade"), num_classes=(2, 2, 2), **TINY)


def test_deep_supervision_heads_and_embedding():
    torch.manual_seed(0)
    net = IGRegNet(**TINY)
    x = torch.randn(2, 2, 32, 32, 16)
    scales, fused = net.neck(net.encoder(x))
    embedding = net.decoder.embed(scales)
    assert embedding.shape == (2, 4, 8, 8, 4)                 # M_t at stride 4
    heads = net.decoder.segment(embedding, scales, fused, [32, 32, 16], deep_supervision=True)
    assert len(heads) == 3 and all(h.shape == (2, 2, 32, 32, 16) for h in heads)
    net.eval()
    with torch.no_grad():
        scales, fused = net.neck(net.encoder(x))
        main = net.decoder.segment(net.decoder.embed(scales), scales, fused, [32, 32, 16])[0]
        torch.testing.assert_close(main, net(x)["seg"])


def test_classification_path_treats_rows_independently():
    """The surrogates run each task's rows on their own: neck and classification branch must give a
    row the same output alone as inside a batch."""
    torch.manual_seed(0)
    net = IGRegNet(**TINY)
    with torch.no_grad():
        feats = net.encoder(torch.randn(3, 2, 16, 16, 32))
        feature, logits = net.classifier(net.neck(feats)[0])
        alone, alone_logits = net.classifier(net.neck([f[1:2] for f in feats])[0])
    torch.testing.assert_close(alone, feature[1:2])
    torch.testing.assert_close(alone_logits[2], logits[2][1:2])


@pytest.mark.parametrize("pooling, reduce", [("avg", torch.mean), ("max", torch.amax)])
def test_classification_feature_pools_the_stride_16_maps(pooling, reduce):
    """F_t is the global average (reference) or maximum of the gated stride-16 maps, channel by channel."""
    torch.manual_seed(0)
    net = IGRegNet(tasks=("idh",), pooling=pooling, **TINY).eval()
    maps = {}
    net.classifier.gate16.register_forward_hook(lambda m, i, o: maps.update(gated=o))
    scales, _ = net.neck(net.encoder(torch.randn(2, 2, 32, 32, 32)))
    feature = net.classifier.features(scales)
    expected = reduce(torch.cat((maps["gated"], scales[3]), 1), dim=(2, 3, 4))
    torch.testing.assert_close(feature, expected)
    with pytest.raises(ValueError, match="pooling must be 'avg' or 'max'"):
        IGRegNet(pooling="sum", **TINY)
