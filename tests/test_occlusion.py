"""The tumour-occlusion test: healthy-brain fill, the control region, and a head that reads only the tumour."""

import torch

from scripts.occlusion import control_region, healthy_fill, occlude_model


def case(seed=0):
    gen = torch.Generator().manual_seed(seed)
    brain = torch.zeros(32, 32, 32, dtype=torch.bool)
    brain[4:28, 4:28, 4:28] = True
    tumour = torch.zeros_like(brain)
    tumour[6:12, 8:14, 10:16] = True
    image = torch.randn(2, 32, 32, 32, generator=gen) * brain + 3.0 * tumour
    return image, tumour, brain


def test_fill_touches_only_the_region_with_healthy_statistics():
    image, tumour, brain = case()
    healthy = brain & ~tumour
    out = healthy_fill(image, tumour, healthy, torch.Generator().manual_seed(1))
    assert torch.equal(out[:, ~tumour], image[:, ~tumour])
    assert abs(float(out[0][tumour].mean() - image[0][healthy].mean())) < 0.2   # was 3 above it
    assert abs(float(out[0][tumour].std() - image[0][healthy].std())) < 0.2


def test_control_region_is_healthy_brain_of_the_tumours_size():
    _, tumour, brain = case()
    region, share = control_region(tumour, brain)
    assert share == 1.0 and int(region.sum()) == int(tumour.sum())
    assert not (region & tumour).any() and (region <= brain).all()


class TumourReader(torch.nn.Module):
    """Class-1 logit of every task: the mean of channel 0 over the tumour's box."""

    def forward(self, x):
        score = x[:, 0, 6:12, 8:14, 10:16].mean((1, 2, 3))
        logits = torch.stack([torch.zeros_like(score), score], 1)
        return {"a": logits, "b": -logits}


def test_a_head_that_reads_the_tumour_moves_with_the_tumour_only():
    cases = []
    for seed in range(3):
        image, tumour, _ = case(seed)
        cases.append({"image": image, "seg": tumour[None].float()})
    rows = occlude_model(TumourReader(), cases, ["a", "b"])
    for row in rows:
        assert row["cases"] == 3 and row["dp_control"] == 0.0
        assert row["dp_tumour"] > 0.3 and row["tumour_moves_more"] == 1.0
