"""IGRegNet with the reference Backbone's (seeded) weights gives the reference's outputs."""

import pytest
import torch
from parity.registry import load
from parity.seeded import seeded_input, seeded_state, unpack_names_and_shapes

from scripts.networks import IGRegNet, load_reference_weights
from scripts.networks.reference_weights import backbone_state_from_checkpoint

TOL = 1e-4  # relative to the largest reference value


@pytest.fixture(scope="module")
def fixture():
    return load("backbone")


@pytest.fixture(scope="module")
def reference_state(fixture):
    return seeded_state(unpack_names_and_shapes(fixture), int(fixture["weight_seed"]))


@pytest.fixture(scope="module")
def outputs(fixture, reference_state):
    net = IGRegNet(num_channels=24, depths=(3, 4, 6, 3), widths=(128, 256, 512, 512), cardinality=32,
                   pooling="avg").eval()
    load_reference_weights(net, reference_state)
    x = seeded_input((2, 2, *fixture["size"]), int(fixture["input_seed"]))
    assert x.double().sum().item() == pytest.approx(float(fixture["input_sum"]), rel=1e-9)
    with torch.no_grad():
        return net(x), net


def _rel(a: torch.Tensor, b) -> float:
    b = torch.as_tensor(b)
    return ((a - b).abs().max() / b.abs().max()).item()


def test_task_logits_match(fixture, outputs):
    out, net = outputs
    for t, name in enumerate(net.tasks):
        assert _rel(out[name], fixture["logits"][t]) <= TOL, name


def test_segmentation_matches(fixture, outputs):
    # the bundle returns logits and runs its 1x1 heads before the final upsampling (they commute)
    out, _ = outputs
    prob = torch.softmax(out["seg"], 1)[:, 1]
    assert prob.shape == fixture["tumor_prob"].shape
    assert _rel(prob, fixture["tumor_prob"]) <= TOL


def test_shared_bottleneck_prelu_loaded_everywhere(outputs, reference_state):
    _, net = outputs
    block = net.encoder.stages[2][1]
    slope = reference_state["backbone.layer3.1.relu.weight"]
    assert block.body[2] is block.body[5] is block.act
    assert torch.equal(block.act.weight, slope)


def test_strict_mapping_names_bad_keys(reference_state):
    net = IGRegNet(num_channels=24)
    broken = dict(reference_state)
    broken.pop("ASA2.refine.3.bias")
    broken["surplus.weight"] = torch.zeros(1)
    broken["CLSmodel.0.weight"] = torch.zeros(3, 48)
    with pytest.raises(ValueError) as err:
        load_reference_weights(net, broken)
    msg = str(err.value)
    assert "neck.asa.2.refine.1.0.bias" in msg and "surplus.weight" in msg and "classifier.heads.0.weight" in msg


def test_whole_model_checkpoint_prefix(reference_state):
    whole = {f"IGReg_DPA.BranchMain.{k}": v for k, v in reference_state.items()}
    whole["G1.CLSmodel.0.bias"] = torch.zeros(2)
    assert backbone_state_from_checkpoint(whole).keys() == reference_state.keys()
